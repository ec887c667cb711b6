"""The one small protocol every engine backend implements: build → artifact files; load → callable."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from monai_trt.errors import EngineBuildError, PatchError
from monai_trt.export.job import BuildJob, Profile

__all__ = [
    "BuildJob", "Backend", "Engine", "RefittableEngine", "CallableEngine", "Profile", "merge_build_args",
    "require_weights", "UNREFITTED",
]

class Engine(Protocol):
    """A loaded engine: flat input tensors (engine dtypes, on its device) → fresh output tensors."""

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]: ...


UNREFITTED = "this engine was built without weights and has not been refitted"


class RefittableEngine(Engine, Protocol):
    """An engine built without weights (`refit` identical/refit): it runs only after :meth:`refit` (else it raises
    EngineBuildError(UNREFITTED)).

    Weights are named as in the exported graph (the module's parameter and buffer names under the graph adapter),
    in the graph's dtype.
    """

    def refit(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Load `weights` (a superset of the weights the engine names) into the engine.

        Raises:
            EngineBuildError: a needed weight is missing or does not fit; the engine must not be run.
        """


class Backend(Protocol):
    """An engine kind. `default_build_args` also lists the accepted `build_args` keys.

    `refit_modes` lists the `refit` modes it can build; for modes other than none, `load` returns a
    :class:`RefittableEngine`. `cuda_graphs`: whether `load(..., use_cuda_graph=True)` replays CUDA graphs on CUDA
    devices: "default" (also when the entry leaves `use_cuda_graph` unset), "opt-in" (only when it sets it true) or
    "" (never).
    """

    name: ClassVar[str]
    default_build_args: ClassVar[Mapping[str, Any]]
    multi_profile: ClassVar[bool]
    precisions: ClassVar[tuple[str, ...]]
    refit_modes: ClassVar[tuple[str, ...]]
    cuda_graphs: ClassVar[str]

    def unavailable_reason(self, device: torch.device) -> str | None:
        """None when this backend can build and run engines on `device`, else why not (one sentence)."""

    def versions(self) -> dict[str, str]:
        """Versions of every library that shapes the engine (part of the cache key)."""

    def graph_precision(self, precision: str) -> str:
        """Precision the exported graph must carry for an engine of `precision` (fp32: the builder casts)."""

    def build(self, job: BuildJob, out_dir: Path) -> list[str]:
        """Build the engine into `out_dir`; return the artifact file names written there."""

    def load(
        self, entry_dir: Path, meta: Mapping[str, Any], device: torch.device, use_cuda_graph: bool = False
    ) -> Engine:
        """Load a built engine from a verified cache entry (`use_cuda_graph`: a runtime option, where supported)."""


class CallableEngine:
    """Engine around a callable taking the inputs positionally (AOTInductor runners, compiled modules).

    Both allocate new outputs on every call, so the results are fresh tensors.
    """

    def __init__(self, function: Any) -> None:
        self._function = function

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        outputs = self._function(*inputs)
        return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def require_weights(needed: set[str] | frozenset[str], weights: Mapping[str, torch.Tensor]) -> None:
    """Refuse a partial refit: every weight the engine names must be in `weights`.

    Raises:
        EngineBuildError: naming how many are missing and a few of them.
    """
    missing = sorted(set(needed) - set(weights))
    if missing:
        raise EngineBuildError(f"refit: {len(missing)} weights the engine needs are missing, e.g. {missing[:3]}")


def merge_build_args(backend: Backend, user: Mapping[str, Any], strict: bool = True) -> dict[str, Any]:
    """User build_args merged over the backend's defaults (never replacing them wholesale).

    Args:
        strict: raise on keys the backend does not accept; with False (method `auto`) they are dropped.

    Raises:
        PatchError: an unknown key (strict) or a value whose type differs from the default's.
    """
    defaults = dict(backend.default_build_args)
    unknown = sorted(set(user) - set(defaults))
    if unknown and strict:
        raise PatchError(
            f"build_args {unknown} are not accepted by method '{backend.name}'; accepted keys: {sorted(defaults)}"
        )
    merged = dict(defaults)
    for key, value in user.items():
        if key not in defaults:
            continue
        default = defaults[key]
        if default is not None and not _same_kind(default, value):
            raise PatchError(
                f"build_args['{key}'] for method '{backend.name}' must be {type(default).__name__}, got {value!r}"
            )
        merged[key] = value
    return merged


def _same_kind(default: Any, value: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float))
    if isinstance(default, Mapping):
        return isinstance(value, Mapping)
    return isinstance(value, type(default))
