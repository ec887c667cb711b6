"""The modes `bench` compares and which of them run by default: eager PyTorch (`fp32`, `tf32`, `amp`, `eager_fp16`),
engines (`<method>_<precision>`; `_x<N>`: split across N GPUs) and torch.compile (`compile_<precision>`, `_ro` =
reduce-overhead, `_ma` = max-autotune)."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from typing import Any

import torch

from monai_trt.backends import BACKENDS, get_backend
from monai_trt.errors import UsageError
from monai_trt.patch.spec import PRECISIONS

__all__ = ["Mode", "plan_modes", "COMPILE_VARIANTS", "GROUPS"]

# torch.compile modes by name suffix. max-autotune is never a default (FACTS.md: a W1 compile ran past 7 minutes) nor
# in the `compile` group: only its exact name selects it.
COMPILE_VARIANTS = {"": "default", "_ro": "reduce-overhead", "_ma": "max-autotune"}
GROUPS = ("eager", "compile", "engines")


@dataclass(frozen=True)
class Mode:
    """One column of the comparison.

    Attributes:
        name: `fp32`, `tf32`, `amp`, `eager_fp16`, `compile_<precision>[_ro|_ma]` or `<method>_<precision>`.
        kind: `eager`, `compile` or `engine`.
        precision: fp32 / tf32 / fp16 / bf16 (`amp` for autocast).
        method: the engine method (engines only).
        skip: why the mode cannot run here (it is then listed as skipped).
        compile_mode: torch.compile's `mode` (compile modes only).
        devices: engines only: N for `<method>_<precision>_x<N>`, whose entry gets `devices` [0..N-1] (each window
            batch split across N GPUs; `_x1` is `devices: [0]`, the split path's overhead on one GPU); None: plain.
    """

    name: str
    kind: str
    precision: str
    method: str | None = None
    skip: str | None = None
    compile_mode: str | None = None
    devices: int | None = None


def _names(value: Any, what: str) -> list[str] | None:
    """A comma-separated string or a list (fire gives either) → names; None when not given."""
    if value is None:
        return None
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
    elif isinstance(value, (list, tuple)):
        items = [str(v).strip() for v in value]
    else:
        raise UsageError(f"--{what} must be a comma-separated list, got {value!r}")
    items = [v for v in items if v and v.lower() != "none"]
    return items


def _compile_skip(device: torch.device, precision: str, compile_mode: str) -> str | None:
    cuda = device.type == "cuda"
    if precision == "tf32" and not cuda:
        return "TF32 is a CUDA setting (same as fp32 on CPU)"
    if compile_mode == "reduce-overhead" and not cuda:
        return "reduce-overhead is CUDA graphs: CUDA only"
    if cuda and importlib.util.find_spec("triton") is None:
        return "torch.compile on CUDA needs triton, which is not installed"
    return None


def plan_modes(device: torch.device, modes: Any = None, methods: Any = None, precisions: Any = None) -> list[Mode]:
    """The modes to run, in order: eager (fp32 first: it is the accuracy reference), engines, torch.compile (engines
    before their peers, so that a --budget is spent on them first).

    Defaults: eager fp32, tf32 and eager_fp16 (CUDA only) and amp; on CUDA torch.compile default and reduce-overhead
    at --precisions (fp16 when not given); engines for every method available on `device` × precisions (fp32, fp16 on
    CUDA; fp32 on CPU). On CPU, compile modes run only when named (`--modes compile` or a mode name): Inductor's CPU
    compile takes minutes. With more than one CUDA device each engine mode is followed by `<engine mode>_x<N>` (its
    entry split across all N devices). Requested combinations that cannot run here (e.g. `onnxruntime_fp32_x2`
    without two GPUs) are kept with a `skip` reason.

    Raises:
        UsageError: an unknown method, precision or mode name (listing the valid ones).
    """
    cuda = device.type == "cuda"
    gpus = torch.cuda.device_count() if cuda else 0
    method_list = _names(methods, "methods")
    if method_list is None:
        method_list = [m for m in BACKENDS if get_backend(m).unavailable_reason(device) is None]
    unknown = sorted(set(method_list) - set(BACKENDS))
    if unknown:
        raise UsageError(f"--methods {unknown} unknown; valid methods: {list(BACKENDS)}")
    precision_list = _names(precisions, "precisions")
    compile_precisions = precision_list if precision_list is not None else ["fp16" if cuda else "fp32"]
    if precision_list is None:
        precision_list = ["fp32", "fp16"] if cuda else ["fp32"]
    bad = sorted(set(precision_list) - set(PRECISIONS))
    if bad:
        raise UsageError(f"--precisions {bad} unknown; valid precisions: {list(PRECISIONS)}")
    candidates = [Mode("fp32", "eager", "fp32"),
                  Mode("tf32", "eager", "tf32", skip=None if cuda else "TF32 is a CUDA setting (same as fp32 on CPU)"),
                  Mode("amp", "eager", "amp"),
                  Mode("eager_fp16", "eager", "fp16")]
    for method in method_list:
        backend = get_backend(method)
        reason = backend.unavailable_reason(device)
        for precision in precision_list:
            why = (f"{method} is not available on {device}: {reason}" if reason else
                   None if precision in backend.precisions else f"{method} does not support {precision}")
            candidates.append(Mode(f"{method}_{precision}", "engine", precision, method, why))
            if gpus > 1:
                candidates.append(Mode(f"{method}_{precision}_x{gpus}", "engine", precision, method, why, devices=gpus))
    for precision in compile_precisions:
        for suffix, compile_mode in COMPILE_VARIANTS.items():
            candidates.append(Mode(f"compile_{precision}{suffix}", "compile", precision,
                                   skip=_compile_skip(device, precision, compile_mode), compile_mode=compile_mode))
    wanted = _names(modes, "modes")
    if wanted is None:  # the defaults: no max-autotune anywhere; CPU: no CUDA-only modes and no (slow) compiles
        return [m for m in candidates if m.compile_mode != "max-autotune"
                and (cuda or (m.kind != "compile" and m.name not in ("tf32", "eager_fp16")))]
    for extra in _multi_device_modes(wanted, candidates, gpus):  # beside its single-device mode
        base = extra.name.rsplit("_x", 1)[0]
        candidates.insert(max(i for i, m in enumerate(candidates) if m.name.startswith(base)) + 1, extra)
    valid = {m.name for m in candidates} | set(method_list) | set(GROUPS)
    unknown = [w for w in wanted if w not in valid]
    if unknown:
        raise UsageError(f"--modes {unknown} unknown; valid: {sorted(valid)} (compile modes come from --precisions: "
                         f"{compile_precisions}; engine modes from --methods × --precisions: {method_list} × "
                         f"{precision_list}; + `_x<N>`: split across N GPUs)")
    return [m for m in candidates if m.name in wanted
            or ((m.method in wanted or (m.kind == "engine" and "engines" in wanted)) and not (m.devices and m.skip))
            or (m.kind == "eager" and "eager" in wanted)
            or (m.kind == "compile" and "compile" in wanted and m.compile_mode != "max-autotune")]


def _multi_device_modes(wanted: list[str], candidates: list[Mode], gpus: int) -> list[Mode]:
    """Requested `<engine mode>_x<N>` modes not planned by default (N other than the GPU count)."""
    known = {m.name for m in candidates}
    extra = []
    for name in wanted:
        match = re.fullmatch(r"(.+)_x(\d+)", name)
        base = next((m for m in candidates if match and m.name == match.group(1) and m.kind == "engine"), None)
        if name in known or base is None or base.devices or int(match.group(2)) < 1:
            continue
        count = int(match.group(2))
        why = base.skip or (f"needs {count} CUDA device(s), {gpus} visible to the bench" if count > gpus else None)
        extra.append(Mode(name, "engine", base.precision, base.method, why, devices=count))
    return extra
