"""Ahead-of-time build (drive the patched network once per shape the run will use) and verification of entries.

`build` does not compute cache keys itself: it applies the bundle's patch and calls the network on synthetic inputs
of the run's shapes, so each wrapper builds exactly the entry (same key) that the run will look up.
"""

from __future__ import annotations

import ast
import logging
import re
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monai_trt.backends import BACKENDS
from monai_trt.bundle.load import Bundle, dtype_of, network_input, random_tensor, sw_batch_size
from monai_trt.cache.inventory import EntryInfo, entry_device, scan, staged_files
from monai_trt.errors import MonaiTrtError, UsageError
from monai_trt.patch.spec import PatchEntry, parse_switch
from monai_trt.runtime.calls import capture_call, engine_float_dtype, flatten_outputs, forward_signature
from monai_trt.runtime.hook import apply, module_device, wrappers
from monai_trt.runtime.refit import engine_weights
from monai_trt.runtime.stamps import WeightsHasher, architecture_fingerprint
from monai_trt.runtime.validate import compare_outputs

__all__ = ["BuiltEngine", "Verdict", "build_engines", "plan_calls", "verify_entries"]

logger = logging.getLogger(__name__)
_LAYOUT_FIELDS = ("in_tree", "names", "dtypes", "ndims", "constants")


@dataclass
class BuiltEngine:
    """An engine `build` left in the cache: `built` False when the entry was already there."""

    label: str
    key: str
    path: Path
    built: bool
    meta: Mapping[str, Any]


@dataclass
class Verdict:
    """`verify`'s result for one entry: outcome pass | fail | skip, with the error measured per input shape."""

    info: EntryInfo
    outcome: str
    detail: str = ""
    errors: list[tuple[list[list[int]], float]] = field(default_factory=list)


def _batches(entries: Sequence[PatchEntry], batch: Any, bundle: Bundle) -> list[int]:
    """Batch sizes to call the network with: --batch, else one inside every dynamic_batchsize (any gives the same
    key), else the inferer's sw_batch_size, else 1."""
    ranges = [e.dynamic_batchsize for e in entries if e.dynamic_batchsize is not None]
    if batch is not None:
        values = [batch] if isinstance(batch, int) else list(batch) if isinstance(batch, (list, tuple)) else None
        if not values or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in values):
            raise UsageError(f"--batch must be a positive integer or a list of them, got {batch!r}")
        for b in values:
            for entry in entries:
                lo, _, hi = entry.dynamic_batchsize or (b, b, b)
                if not lo <= b <= hi:
                    raise UsageError(f"--batch {b} is outside {entry.describe(bundle.net_id)}'s dynamic_batchsize "
                                     f"[{lo}, {hi}]")
        return values
    if ranges:
        lo, hi = max(r[0] for r in ranges), min(r[2] for r in ranges)
        if lo > hi:
            raise UsageError(f"the dynamic_batchsize ranges {[list(r) for r in ranges]} have no batch in common; "
                           "pass --batch")
        return [min(max(ranges[0][1], lo), hi)]
    return [sw_batch_size(bundle) or 1]


def plan_calls(bundle: Bundle, batch: Any = None, spatial_shape: Any = None) -> list[tuple[str, Callable[[], Any]]]:
    """The forward calls that make every patched submodule build the engine the run will use: (description, call).

    - entries with `input_profiles`: the patched module itself, once per profile, at its opt shapes (by name);
    - the others: the whole network on an input from metadata `network_data_format` (batch per :func:`_batches`).

    Raises:
        UsageError: the input of some entry cannot be known (names the metadata field or flag to add).
    """
    network, device = bundle.network, module_device(bundle.network)
    generator = torch.Generator().manual_seed(0)
    installed = wrappers(network)
    fmt_inputs = (bundle.metadata.get("network_data_format") or {}).get("inputs") or {}
    calls: list[tuple[str, Callable[[], Any]]] = []
    for entry in (e for e in bundle.patch if e.input_profiles):
        module = network.get_submodule(entry.submodule) if entry.submodule else network
        params = forward_signature(installed[entry.submodule].original).parameters
        for index, profile in enumerate(entry.input_profiles):
            unknown = sorted(set(profile) - set(params))
            if unknown and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
                raise UsageError(f"{entry.describe(bundle.net_id)}: input_profiles[{index}] names {unknown} are not "
                               f"arguments of its forward{tuple(params)}; name the profile's inputs after the "
                               "forward's arguments")
            kwargs = {}
            for name, (_lo, opt, _hi) in profile.items():
                spec = fmt_inputs.get(name) if isinstance(fmt_inputs, Mapping) else None
                dtype = dtype_of(str(spec.get("dtype", "float32"))) if isinstance(spec, Mapping) else torch.float32
                kwargs[name] = random_tensor(opt, dtype, device, generator)
            shapes = ", ".join(f"{n}:{list(t.shape)}" for n, t in kwargs.items())
            calls.append((f"{entry.submodule or 'network'}({shapes}) [input_profiles[{index}] opt]",
                          lambda m=module, kw=kwargs: m(**kw)))
    driven = [e for e in bundle.patch if not e.input_profiles]
    if driven:
        name, shape, dtype = network_input(bundle, spatial_shape)
        batches = _batches(driven, batch, bundle)
        for entry in driven:
            if entry.dynamic_batchsize is None:
                logger.warning(
                    "%s has no dynamic_batchsize: its engine accepts only batch %s; a sliding window's last, smaller "
                    "batch builds another engine at run time (add \"dynamic_batchsize\": [1, %d, %d])",
                    entry.describe(bundle.net_id), " and ".join(map(str, batches)), max(batches), max(batches))
        for b in batches:
            x = random_tensor([b, *shape], dtype, device, generator)
            calls.append((f"network({name}:{[b, *shape]}:{str(dtype).removeprefix('torch.')})",
                          lambda x=x: network(x)))
    return calls


def _entry_keys(roots: Sequence[str]) -> set[str]:
    keys = set()
    for root in roots:
        entries = Path(root).expanduser() / "entries"
        if entries.is_dir():
            keys.update(p.name for p in entries.iterdir())
    return keys


def build_engines(
    bundle: Bundle, batch: Any = None, spatial_shape: Any = None, on_call: Callable[[str], None] | None = None
) -> tuple[list[BuiltEngine], list[str]]:
    """Build (or find) every engine the bundle's patch describes. Returns (engines, failures).

    Raises:
        UsageError: monai_trt is switched off by env MONAI_TRT, the patch is empty, or a forward call failed.
    """
    if not parse_switch(True):
        raise UsageError("environment variable MONAI_TRT switches monai_trt off; unset it to build engines")
    if not bundle.patch:
        raise UsageError("trt_patch is empty: nothing to build")
    before = _entry_keys(sorted({e.path for e in bundle.patch}))
    apply(bundle.network, bundle.raw_patch, enabled=True, name=bundle.net_id)
    for wrapper in wrappers(bundle.network).values():
        if wrapper.engine_set.rent is not None:  # building means taking every engine now, however few calls follow
            wrapper.engine_set.rent.renting_allowed = False
    calls = plan_calls(bundle, batch, spatial_shape)
    for description, call in calls:
        if on_call is not None:
            on_call(description)
        try:
            with torch.no_grad():
                call()
        except MonaiTrtError:
            raise
        except Exception as err:  # the network rejecting the synthetic input needs a hint
            raise UsageError(f"calling {description} failed: {type(err).__name__}: {err}; check metadata "
                           "network_data_format (or --spatial_shape / --batch) against what the network takes") from err
    engines, failures = [], []
    for wrapper in wrappers(bundle.network).values():
        loaded = [e for group in wrapper.engines.values() for e in group]
        label = wrapper.label
        wrapper.usage.reported = True  # build reports every wrapper's outcome itself: not again at exit
        node = getattr(wrapper, "node", None)  # `submodule: auto`: a part its plan leaves in PyTorch is no failure
        if node is not None and node.state != "engine":
            continue
        if wrapper.disabled:
            failures.append(f"{label}: {wrapper.disabled}")
        elif not sum(wrapper.calls.values()):
            failures.append(f"{label}: never served a call: the network's forward did not call this module's forward "
                            "(the caller uses another method or its layers directly); patch the submodule it calls")
        elif not loaded:
            failures.append(f"{label}: no engine: the forward never called it with inputs its patch entry accepts "
                            "(see the warnings above)")
        for engine in loaded:
            entry = engine.cached
            engines.append(BuiltEngine(label, entry.key, entry.path, entry.key not in before, entry.meta))
    return engines, failures


# ---------------------------------------------------------------------------------------------------------- verify
def _recorded_kwargs(meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict[str, Any] | None:
    """Keyword arguments replaying the recorded call (tensors by name, constants in order); None if not flat."""
    io = meta["key_inputs"]["io"]
    match = re.fullmatch(r"TreeSpec\(dict, (\[.*?\]), \[([*, ]*)\]\)", str(io.get("in_tree", "")))
    if not match:
        return None
    try:
        keys = ast.literal_eval(match.group(1))
    except (ValueError, SyntaxError):
        return None
    constants = list(io.get("constants", []))
    kwargs: dict[str, Any] = {}
    for key in keys:
        if key in tensors:
            kwargs[key] = tensors[key]
        elif constants:
            kwargs[key] = constants.pop(0)
        else:
            return None
    return kwargs


def _error_measure(outputs: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    """Largest relative L2 error over floating outputs (fraction of unequal elements for integer outputs)."""
    worst = 0.0
    for out, ref in zip(outputs, reference):
        out = out.detach().to(ref.device)
        if tuple(out.shape) != tuple(ref.shape):
            return float("inf")
        if ref.is_floating_point():
            diff = torch.linalg.vector_norm(out.double() - ref.double())
            worst = max(worst, float(diff / torch.linalg.vector_norm(ref.double()).clamp_min(1e-12)))
        elif ref.numel():
            worst = max(worst, float((out != ref).double().mean()))
    return worst


def _check(info: EntryInfo, module: nn.Module, tolerance: float | None, generator: torch.Generator) -> Verdict:
    meta = info.meta
    io, precision = meta["io"], str(meta["precision"])
    backend = BACKENDS[meta["method"]]()
    device, _ = entry_device(meta)
    floats = engine_float_dtype(backend.graph_precision(precision))
    forward = module.__dict__.get("forward")
    if getattr(forward, "is_monai_trt_wrapper", False):
        forward = forward.original  # the forward beneath the wrapper (an instance override included)
    if forward is None:
        forward = types.MethodType(type(module).forward, module)
    signature = forward_signature(forward)
    profile = io["profiles"][0]
    shape_sets = []
    for k in range(3):  # min, opt, max of the profile the engine was built for
        shapes = [list(inp[k]) for inp in profile]
        if shapes not in shape_sets:
            shape_sets.append(shapes)
    with staged_files(info) as files:  # the bytes verified are the bytes loaded
        engine = backend.load(files, meta, device)
    verdict = Verdict(info, "pass")
    for shapes in shape_sets:
        tensors = {}
        for name, dtype, shape in zip(io["names"], io["dtypes"], shapes):
            torch_dtype = dtype_of(dtype)
            tensors[name] = random_tensor(shape, torch.float32 if torch_dtype.is_floating_point else torch_dtype,
                                          device, generator)
        kwargs = _recorded_kwargs(meta, tensors)
        call = capture_call(signature, (), kwargs, lambda _d: floats) if kwargs is not None else None
        recorded = {f: meta["key_inputs"]["io"].get(f) for f in _LAYOUT_FIELDS}
        if call is None or {f: call.layout.to_json()[f] for f in _LAYOUT_FIELDS} != recorded:
            return Verdict(info, "skip", "its recorded call (nested or positional-only inputs) cannot be replayed; "
                                         "check it by running the bundle")
        if meta.get("refit", "none") != "none":  # a weight-less engine: the bundle's weights, as the wrapper does
            engine.refit(engine_weights(module, forward, backend.graph_precision(precision)))
        outputs = engine(call.tensors)
        target = module_device(module)
        with torch.no_grad():
            reference, _ = flatten_outputs(forward(**{k: v.to(target) if isinstance(v, torch.Tensor) else v
                                                      for k, v in kwargs.items()}))
        verdict.errors.append((shapes, _error_measure(outputs, reference)))
        problem = compare_outputs(outputs, reference, precision, tolerance)
        if problem and verdict.outcome == "pass":
            verdict.outcome, verdict.detail = "fail", f"{problem} at {shapes}"
    return verdict


def verify_entries(
    network: nn.Module, roots: Sequence[str], tolerance: float | None = None, seed: int = 0
) -> tuple[list[Verdict], int]:
    """Check every entry of `network` (same architecture) in `roots` against PyTorch on random inputs.

    Returns:
        (verdicts for this network's entries, number of entries that belong to other networks).
    """
    generator = torch.Generator().manual_seed(seed)
    verdicts, others = [], 0
    hashes: dict[str, tuple[str, str]] = {}
    for root in roots:
        for info in scan(root):
            inputs = info.meta.get("key_inputs") or {}
            sub = info.meta.get("submodule")
            try:
                module = network.get_submodule(sub) if sub else network
            except (AttributeError, TypeError):
                module = None
            if module is None or not inputs:
                others += 1
                continue
            if sub not in hashes:
                hashes[sub] = (architecture_fingerprint(module), WeightsHasher(module).digest())
            cls = f"{type(module).__module__}.{type(module).__qualname__}"
            if cls != inputs.get("module_class") or hashes[sub][0] != inputs.get("architecture"):
                others += 1
            elif not info.loadable:
                verdicts.append(Verdict(info, "skip", f"{info.status} here: {info.reason}"))
            elif inputs.get("weights") not in (hashes[sub][1], "refit"):
                verdicts.append(Verdict(info, "skip", "built from other weights (another checkpoint)"))
            else:
                try:
                    verdicts.append(_check(info, module.eval(), tolerance, generator))
                except Exception as err:  # an engine that cannot even run is a failure, not a crash
                    verdicts.append(Verdict(info, "fail", f"{type(err).__name__}: {err}"))
    return verdicts, others
