"""AOTInductor without Inductor's per-process CPU vector-ISA probe where its answer is not needed, per thread.

Inductor's `pick_vec_isa` compiles a test library per ISA and dlopens each in a fresh Python subprocess (subclasses
re-probe even with `cpp.vec_isa_ok`), once per process: measured 39-47 s on an H100 machine, 38-46 s in a W1 build on
an H200 (a third of the build), 3-21 s on a 2-core CPU machine.

- **Loads** (:func:`probe_skipped`): `aoti_load_package` asks `codecache.get_device_information` for the machine's
  facts only to warn on a mismatch, and the cache key already pins the CPU capability
  (see `monai_trt.cache.keys.device_info`), so monai_trt's loads answer without the ISA.
- **GPU builds** (:func:`gpu_build_probe_skipped`): a CUDA engine's CPU-side code is its C++ wrapper (kernel launches,
  no vector loops) and, rarely, a CPU kernel of the graph. Inside the block Inductor's `valid_vec_isa_list` answers
  with what this process already knows, or with no ISA: that code is compiled without vector flags (scalar CPU
  kernels, still correct and validated like every engine), code generation and compile flags see one answer for the
  whole build, and the package records no CPU ISA. CPU engines always get the real probe.

Both are per thread: Inductor's function is replaced once by one that differs only on a thread inside the block and
calls Inductor's own everywhere else (a compile on another thread still sees the real ISA). A replacement is
installed only when the installed torch's function has the shape this module knows; otherwise that path runs torch's
probe and one warning says why.
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

__all__ = ["probe_skipped", "gpu_build_probe_skipped", "bypass_status", "build_bypass_status"]

logger = logging.getLogger(__name__)
KNOWN_FACTS = frozenset({"AOTI_PLATFORM", "AOTI_MACHINE", "AOTI_CPU_ISA", "AOTI_COMPUTE_CAPABILITY"})
_MARK = "_monai_trt_isa_bypass"
_local = threading.local()
_install_lock = threading.Lock()
_statuses: dict[str, str] = {}  # per path ("loads", "GPU builds"): "installed", or why not
_real_isa_list: Callable[[], list] | None = None  # Inductor's own (cached) valid_vec_isa_list, once replaced


def bypass_status() -> str:
    """"installed" when loads skip the probe, else the reason they do not (installs on first use)."""
    return _status("loads", _install, "slow first load per process")


def build_bypass_status() -> str:
    """"installed" when GPU builds skip the probe, else the reason they do not (installs on first use)."""
    return _status("GPU builds", _install_isa_list, "slower first build per process")


def _status(path: str, install: Callable[[], str], cost: str) -> str:
    with _install_lock:
        if path not in _statuses:
            _statuses[path] = install()
            if _statuses[path] != "installed":
                logger.warning("AOTInductor %s will run torch's CPU ISA probe (%s): %s", path, cost, _statuses[path])
        return _statuses[path]


@contextlib.contextmanager
def gpu_build_probe_skipped() -> Iterator[bool]:
    """Inside the block, a GPU build on this thread does not run the ISA probe (see the module's docstring): one
    answer for the whole block, this process's known ISA list or none. Yields whether it does."""
    active = build_bypass_status() == "installed"
    previous = getattr(_local, "isa_list", None)
    if active:
        _local.isa_list = _known_isa_list()
    try:
        with probe_skipped():  # the package's device facts then omit AOTI_CPU_ISA rather than record no ISA
            yield active
    finally:
        _local.isa_list = previous


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


def _install_isa_list() -> str:
    global _real_isa_list
    try:
        from torch._inductor import cpu_vec_isa
    except ImportError as err:
        return f"torch {torch.__version__} has no torch._inductor.cpu_vec_isa ({err})"
    real = getattr(cpu_vec_isa, "valid_vec_isa_list", None)
    pick = getattr(cpu_vec_isa, "pick_vec_isa", None)
    if real is None or pick is None:
        return f"torch {torch.__version__} has no cpu_vec_isa.valid_vec_isa_list / pick_vec_isa"
    if getattr(real, _MARK, False):
        _real_isa_list = real.__wrapped__
        return "installed"
    try:
        asks_the_list = "valid_vec_isa_list()" in inspect.getsource(pick)
    except (OSError, TypeError) as err:
        return f"the source of cpu_vec_isa.pick_vec_isa is unreadable ({err})"
    if not asks_the_list or not hasattr(real, "cache_info"):
        return (f"torch {torch.__version__}'s cpu_vec_isa.pick_vec_isa does not ask a cached valid_vec_isa_list(), "
                "which monai_trt knows how to answer")
    _real_isa_list = real
    cpu_vec_isa.valid_vec_isa_list = _per_thread_isa_list(real)
    return "installed"


def _known_isa_list() -> list:
    """The ISA list this process has already probed (free to ask), else none: the answer for a GPU build."""
    real = _real_isa_list
    return list(real()) if real is not None and real.cache_info().currsize else []


def _per_thread_isa_list(real: Callable[[], list]) -> Callable[[], list]:
    def valid_vec_isa_list() -> list:
        answer = getattr(_local, "isa_list", None)
        return _real_isa_list() if answer is None else list(answer)  # _real_isa_list: set before this is installed

    setattr(valid_vec_isa_list, _MARK, True)
    valid_vec_isa_list.__wrapped__ = real
    return valid_vec_isa_list
