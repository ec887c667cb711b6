"""The build request: what one engine is built from (graph, example inputs, shape profiles, settings)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["BuildJob", "Profile"]

# One optimisation profile: per input, (min_shape, opt_shape, max_shape).
Profile = tuple[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]], ...]


@dataclass
class BuildJob:
    """Everything a backend needs to build one engine.

    Attributes:
        module: graph to export: `forward(*tensors) -> tuple[Tensor, ...]`, already in the target precision.
        example_inputs: the real inputs of the call that triggered the build, in engine dtypes.
        input_names / output_names: engine I/O names.
        profiles: shape profiles the engine must accept (backends without multi-profile support get one).
        precision: fp32 | tf32 | fp16 | bf16.
        build_args: effective backend options (defaults merged under the user's values).
        export_args: exporter options.
        device: where the engine runs.
        label: human-readable name for logs and errors.
        timing_cache_dir: the cache's directory for build side caches (TensorRT's timing cache), if any.
        refit: none (weights baked in) | identical | refit (artifacts hold no weights; see RefittableEngine).
        weight_names: names of the graph's weights (its parameters and buffers), for backends that strip them.
    """

    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    profiles: tuple[Profile, ...]
    precision: str
    build_args: Mapping[str, Any]
    export_args: Mapping[str, Any]
    device: torch.device
    label: str = ""
    timing_cache_dir: Path | None = None
    refit: str = "none"
    weight_names: frozenset[str] = frozenset()

    @property
    def ranges(self) -> tuple[tuple[tuple[int, int], ...], ...]:
        """Per input, per dim, the (min, max) over all profiles."""
        out = []
        for i in range(len(self.example_inputs)):
            lows = [p[i][0] for p in self.profiles]
            highs = [p[i][2] for p in self.profiles]
            out.append(tuple((min(lo), max(hi)) for lo, hi in zip(zip(*lows), zip(*highs))))
        return tuple(out)
