"""Shape profiles: the input shapes an engine is built for, from `dynamic_batchsize`, `input_profiles` or the call."""

from __future__ import annotations

from typing import Any

from monai_trt.patch.spec import PatchEntry
from monai_trt.runtime.calls import CapturedCall

__all__ = ["plan_profiles", "profile_accepts"]

Shape = tuple[int, ...]


def profile_accepts(profile: Any, shapes: tuple[Shape, ...]) -> bool:
    """True when every input shape lies within the profile's (min, opt, max) shapes."""
    if len(profile) != len(shapes):
        return False
    for (lo, _opt, hi), shape in zip(profile, shapes):
        if len(lo) != len(shape) or not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
            return False
    return True


def plan_profiles(entry: PatchEntry, call: CapturedCall) -> tuple[list[Any] | None, str]:
    """The profiles of the engine to build for this call, or (None, why) when the call lies outside them.

    - `input_profiles`: the first profile containing the call's shapes (its engine also gets every other profile
      when the backend supports several); names must match the forward's tensor inputs.
    - `dynamic_batchsize`: dim 0 ranges over [min, max] for every tensor input whose dim 0 is the batch size (that of
      the first tensor input); other inputs and dims as observed.
    - neither: dim 0 of the inputs batched with the first one ranges over [1, observed batch] (so one engine serves
      every batch a sliding window uses, its smaller last batch included); other inputs and dims as observed.
    """
    shapes = call.shapes
    names = call.layout.names
    if entry.input_profiles:
        profiles = []
        for index, declared in enumerate(entry.input_profiles):
            if set(declared) != set(names):
                return None, f"input_profiles[{index}] names {sorted(declared)} do not match the inputs {list(names)}"
            profiles.append(tuple(tuple(list(s) for s in declared[n]) for n in names))
        matching = [p for p in profiles if profile_accepts(_as_tuples(p), shapes)]
        if not matching:
            return None, f"input shapes {[list(s) for s in shapes]} are outside every input_profiles range"
        return [matching[0]] + [p for p in profiles if p is not matching[0]], ""
    batch = next((shape[0] for shape in shapes if shape), None)
    if entry.dynamic_batchsize is not None:
        lo, opt, hi = entry.dynamic_batchsize
        if batch is not None and not lo <= batch <= hi:
            return None, f"batch size {batch} is outside dynamic_batchsize [{lo}, {opt}, {hi}]"
    else:
        lo, opt, hi = 1, batch, batch
    profile = []
    for shape in shapes:
        if not shape or shape[0] != batch:  # not batched with the first input (e.g. a [1] timestep): as observed
            profile.append((list(shape), list(shape), list(shape)))
            continue
        rest = list(shape[1:])
        profile.append(([lo, *rest], [opt, *rest], [hi, *rest]))
    return [tuple(profile)], ""


def _as_tuples(profile: Any) -> Any:
    return tuple(tuple(tuple(s) for s in inp) for inp in profile)
