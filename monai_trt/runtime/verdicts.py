"""What the first use of an engine taught, remembered per machine in the cache (`verdicts/<key>.json`).

- The speed gate: engine and PyTorch timed on the same call; an engine that is not at least `min_speedup` times as
  fast is not used for its shapes on this machine, in this process and later ones (nothing is rebuilt or re-measured).
  Measured per way of running the engine (`runtime`: plain launches, or CUDA graph replays).
- Passed validations: the module-weights fingerprints an engine was validated against PyTorch with (and the autocast
  dtype, with PyTorch's output dtypes under it), so that a cache hit costs a load, not a load plus a PyTorch
  forward, with or without autocast. Engines built for `refit: refit` are validated after every refit regardless.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch

from monai_trt.cache import EngineCache
from monai_trt.runtime.calls import dtype_name

__all__ = ["Verdicts", "machine_id", "per_call_seconds", "sample_seconds"]

RECORD = "verdicts"
TIMING = "back_to_back"  # how the speed gate times calls (per_call_seconds)


@lru_cache(maxsize=None)
def machine_id(device_type: str, index: int | None = None) -> str:
    """The machine an engine was measured on: GPU model (or CPU model) and platform."""
    if device_type == "cuda":
        name = torch.cuda.get_device_name(index if index is not None else torch.cuda.current_device())
    else:
        name = _cpu_model()
    return f"{device_type}:{name}|{platform.system()}-{platform.machine()}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def sample_seconds(run: Callable[[], Any], device: torch.device, repeats: int) -> list[float]:
    """Wall time of each of `repeats` calls of `run()` (CUDA synchronised before and after each)."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return times


def per_call_seconds(run: Callable[[], Any], device: torch.device, warmup: int = 1, rounds: int = 3,
                     round_s: float = 0.02, max_calls: int = 20) -> float:
    """Median seconds per call of `run()` called back to back, as a sliding window or a data loader calls a network:
    the host queues the next call while the device still works on the last one (CUDA synchronised once per round).

    After `warmup` calls, one synchronised call sets how many calls make a round (about `round_s` seconds, 1 to
    `max_calls`); then `rounds` rounds are timed. A slow network is timed one call per round, as a synchronised
    call; a fast one, whose per-call host cost the device hides in a sliding window, back to back."""
    for _ in range(warmup):
        run()
    calls = max(1, min(max_calls, int(round_s / max(sample_seconds(run, device, 1)[0], 1e-9))))
    per_call = [seconds / calls for seconds in sample_seconds(lambda: [run() for _ in range(calls)], device, rounds)]
    return sorted(per_call)[len(per_call) // 2]


class Verdicts:
    """The record of one cache key on one machine (`runtime`: "plain" or "cuda_graph", for the speed gate)."""

    def __init__(self, cache: EngineCache, key: str, device: torch.device, runtime: str = "plain") -> None:
        self._cache, self._key = cache, key
        self._speed = "speed" if runtime == "plain" else f"speed_{runtime}"
        self.machine = machine_id(device.type, device.index)
        record = cache.read_record(RECORD, key) or {}
        machines = record.get("machines")
        self._machines: dict[str, Any] = dict(machines) if isinstance(machines, dict) else {}
        mine = self._machines.get(self.machine)
        self._mine: dict[str, Any] = dict(mine) if isinstance(mine, dict) else {}

    @property
    def speed(self) -> dict[str, Any] | None:
        """The recorded measurement (`engine_s`, `pytorch_s`, `serve`), or None when not measured here yet (with
        this runtime)."""
        speed = self._mine.get(self._speed)
        if isinstance(speed, dict) and isinstance(speed.get("serve"), bool) and speed.get("timing") == TIMING:
            return speed
        return None  # a measurement made another way (before calls were timed back to back) is made again

    def validated(self, fingerprint: str) -> bool:
        return fingerprint in (self._mine.get("validated") or ())

    def output_types(self, call_key: str) -> tuple[int | None, ...] | None:
        """The remembered output-type rule (see :class:`monai_trt.runtime.calls.OutputTypes`) for a call pattern."""
        sources = self._keyed("output_types", call_key)
        if isinstance(sources, list) and all(s is None or isinstance(s, int) for s in sources):
            return tuple(sources)
        return None

    def record_output_types(self, call_key: str, sources: tuple[int | None, ...]) -> None:
        self._record_keyed("output_types", call_key, list(sources))

    def autocast_dtypes(self, mode: str) -> list[torch.dtype] | None:
        """PyTorch's output dtypes under autocast to `mode` (a dtype name), learned when the engine was validated."""
        names = self._keyed("autocast_dtypes", mode)
        if not isinstance(names, list):
            return None
        dtypes = [getattr(torch, n, None) if isinstance(n, str) else None for n in names]
        return dtypes if all(isinstance(d, torch.dtype) for d in dtypes) else None

    def record_autocast_dtypes(self, mode: str, dtypes: list[torch.dtype]) -> None:
        self._record_keyed("autocast_dtypes", mode, [dtype_name(d) for d in dtypes])

    def record_speed(self, engine_s: float, pytorch_s: float, min_speedup: float) -> bool:
        """Record a measurement; returns whether the engine serves (PyTorch takes >= min_speedup × its time)."""
        serve = pytorch_s >= min_speedup * engine_s
        self._mine[self._speed] = {"engine_s": engine_s, "pytorch_s": pytorch_s, "min_speedup": min_speedup,
                                   "serve": serve, "timing": TIMING, "time": time.time()}
        self._save()
        return serve

    def record_validated(self, fingerprint: str) -> None:
        done = [f for f in (self._mine.get("validated") or []) if isinstance(f, str) and f != fingerprint]
        self._mine["validated"] = (done + [fingerprint])[-8:]  # a few recent weights, not an unbounded list
        self._save()

    def _keyed(self, section: str, key: str) -> Any:
        """The value recorded under `key` in a section of keyed records (None when absent or malformed)."""
        records = self._mine.get(section)
        return records.get(key) if isinstance(records, dict) else None

    def _record_keyed(self, section: str, key: str, value: Any) -> None:
        records = self._mine.get(section)
        self._mine[section] = {**(records if isinstance(records, dict) else {}), key: value}
        self._save()

    def _save(self) -> None:
        self._machines[self.machine] = self._mine
        self._cache.write_record(RECORD, self._key, {"machines": self._machines})
