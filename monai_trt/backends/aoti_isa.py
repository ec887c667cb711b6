"""Loading a `.pt2` without Inductor's per-process CPU vector-ISA probe, safely for other threads.

`aoti_load_package` asks `torch._inductor.codecache.get_device_information` for the machine's facts, and its
`pick_vec_isa` compiles a test library per ISA and dlopens each in a fresh Python subprocess (subclasses re-probe even
with `cpp.vec_isa_ok`): measured 39-47 s on an H100 machine and 3-21 s on a 2-core CPU machine, in every fresh
process. At load its only use is a "device information mismatch" warning, and the cache key already pins the CPU
capability (see `monai_trt.cache.keys.device_info`), so monai_trt's loads skip it.

The skip is per thread: `get_device_information` is replaced once by a function that answers without the ISA only
on a thread inside :func:`probe_skipped`, and calls Inductor's own function everywhere else (a compile on another
thread still sees the real ISA). The replacement is installed only when the installed torch's function reports
exactly the facts this module knows; otherwise loads run torch's probe and one warning says why.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import platform
import re
import sys
import threading
from collections.abc import Callable, Iterator

import torch

__all__ = ["probe_skipped", "bypass_status"]

logger = logging.getLogger(__name__)
KNOWN_FACTS = frozenset({"AOTI_PLATFORM", "AOTI_MACHINE", "AOTI_CPU_ISA", "AOTI_COMPUTE_CAPABILITY"})
_MARK = "_monai_trt_isa_bypass"
_local = threading.local()
_install_lock = threading.Lock()
_status: str | None = None  # "installed", or why not


def bypass_status() -> str:
    """"installed" when loads skip the probe, else the reason they do not (installs on first use)."""
    global _status
    with _install_lock:
        if _status is None:
            _status = _install()
            if _status != "installed":
                logger.warning("AOTInductor loads will run torch's CPU ISA probe (slow first load per process): %s",
                               _status)
        return _status


@contextlib.contextmanager
def probe_skipped() -> Iterator[bool]:
    """Inside the block, this thread's `get_device_information` skips the ISA probe. Yields whether it does."""
    active = bypass_status() == "installed"
    previous = getattr(_local, "skip", False)
    _local.skip = active
    try:
        yield active
    finally:
        _local.skip = previous


def _install() -> str:
    try:
        from torch._inductor import codecache
    except ImportError as err:
        return f"torch {torch.__version__} has no torch._inductor.codecache ({err})"
    real = getattr(codecache, "get_device_information", None)
    if real is None:
        return f"torch {torch.__version__} has no codecache.get_device_information"
    if getattr(real, _MARK, False):
        return "installed"
    try:
        facts = set(re.findall(r"AOTI_[A-Z_]+", inspect.getsource(real)))
    except (OSError, TypeError) as err:
        return f"the source of codecache.get_device_information is unreadable ({err})"
    if facts != KNOWN_FACTS or not hasattr(codecache, "get_interface_for_device"):
        return (f"torch {torch.__version__}'s codecache.get_device_information reports {sorted(facts)}, "
                f"monai_trt knows {sorted(KNOWN_FACTS)}")
    codecache.get_device_information = _per_thread(real, codecache.get_interface_for_device)
    return "installed"


def _per_thread(real: Callable[[str], dict[str, str]], interface: Callable[[str], object]) -> Callable:
    def get_device_information(device_type: str) -> dict[str, str]:
        if not getattr(_local, "skip", False):
            return real(device_type)
        _local.skipped = getattr(_local, "skipped", 0) + 1
        return {  # Inductor's facts except AOTI_CPU_ISA: not compared, rather than compared with a placeholder
            "AOTI_PLATFORM": sys.platform,
            "AOTI_MACHINE": platform.machine(),
            "AOTI_COMPUTE_CAPABILITY": str(interface(device_type).get_compute_capability()),
        }

    setattr(get_device_information, _MARK, True)
    get_device_information.__wrapped__ = real
    return get_device_information
