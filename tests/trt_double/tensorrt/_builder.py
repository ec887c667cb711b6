"""The build half of the tensorrt double: optimisation profiles, timing cache, builder config, builder.

The builder checks what real TensorRT checks for the features monai_trt uses (profiles cover every dynamic input;
no FP16/BF16 flags on a strongly typed network), drives the progress monitor, fills the timing cache, records the
configuration in `DOUBLE.builds` and returns a plan holding the ONNX model (see `_engine.pack_plan`).
"""

from __future__ import annotations

import builtins
import json
from typing import Any

from tensorrt import (
    DOUBLE,
    BuilderFlag,
    HardwareCompatibilityLevel,
    IHostMemory,
    ILogger,
    INetworkDefinition,
    IProgressMonitor,
    MemoryPoolType,
    __version__,
)
from tensorrt._engine import pack_plan


class IOptimizationProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

    def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:
        lo, mid, hi = (tuple(int(d) for d in s) for s in (min, opt, max))
        if not len(lo) == len(mid) == len(hi) or not all(a <= b <= c for a, b, c in zip(lo, mid, hi)):
            raise ValueError("Shape provided for min is inconsistent with other shapes.")
        self.shapes[input] = (lo, mid, hi)


class ITimingCache:
    def __init__(self, entries: dict[str, str], tag: str) -> None:
        self.entries, self.tag = dict(entries), tag

    def serialize(self) -> IHostMemory:
        return IHostMemory(json.dumps({"tag": self.tag, "entries": self.entries}, sort_keys=True).encode())

    def combine(self, input_cache: ITimingCache, ignore_mismatch: Any) -> Any:
        if input_cache.tag != self.tag and not ignore_mismatch:
            return False
        self.entries.update({k: v for k, v in input_cache.entries.items() if k not in self.entries})
        return True


class IBuilderConfig:
    """Builder options. Like the pybind class, it rejects attributes it does not have."""

    __slots__ = (
        "_flags",
        "_level",
        "_logger",
        "_monitor",
        "hardware_compatibility_level",
        "pools",
        "profiles",
        "timing_cache",
    )

    def __init__(self, logger: ILogger) -> None:
        self._flags = {BuilderFlag.TF32}  # TF32 is on by default
        self.pools: dict[MemoryPoolType, int] = {}
        self.profiles: list[IOptimizationProfile] = []
        self.timing_cache: ITimingCache | None = None
        self._level = 3
        self.hardware_compatibility_level = HardwareCompatibilityLevel.NONE
        self._monitor: IProgressMonitor | None = None
        self._logger = logger

    @property
    def flags(self) -> set[str]:
        return {BuilderFlag(f).name for f in self._flags}

    def set_flag(self, flag: BuilderFlag) -> None:
        self._flags.add(BuilderFlag(flag))

    def clear_flag(self, flag: BuilderFlag) -> None:
        self._flags.discard(BuilderFlag(flag))

    def get_flag(self, flag: BuilderFlag) -> Any:
        return BuilderFlag(flag) in self._flags

    @property
    def builder_optimization_level(self) -> int:
        return self._level

    @builder_optimization_level.setter
    def builder_optimization_level(self, level: int) -> None:
        if not 0 <= level <= 5:
            raise ValueError("builder_optimization_level must be in [0, 5]")
        self._level = level

    @property
    def progress_monitor(self) -> IProgressMonitor | None:
        return self._monitor

    @progress_monitor.setter
    def progress_monitor(self, monitor: IProgressMonitor | None) -> None:
        if monitor is not None and not isinstance(monitor, IProgressMonitor):
            raise TypeError("progress_monitor must be an IProgressMonitor")
        self._monitor = monitor

    def set_memory_pool_limit(self, pool: MemoryPoolType, pool_size: int) -> None:
        self.pools[MemoryPoolType(pool)] = int(pool_size)

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, serialized_timing_cache: Any) -> ITimingCache | None:
        data = bytes(serialized_timing_cache)
        if not data:
            return ITimingCache({}, __version__)
        try:
            parsed = json.loads(data)
            return ITimingCache(parsed["entries"], parsed["tag"])
        except (ValueError, KeyError, TypeError):
            self._logger.log(ILogger.ERROR, "Invalid timing cache data")
            return None

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: Any) -> Any:
        self.timing_cache = cache
        return True

    def get_timing_cache(self) -> ITimingCache | None:
        return self.timing_cache


class Builder:
    def __init__(self, logger: ILogger) -> None:
        self._logger = logger

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        return INetworkDefinition(int(flags))

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig(self._logger)

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> IHostMemory | None:
        errors = _check_build(network, config)
        for error in errors:
            self._logger.log(ILogger.ERROR, error)
        if errors:
            return None
        monitor = config.progress_monitor
        if monitor is not None:
            monitor.phase_start("Building engine", None, 2)
            monitor.phase_start("Tactic selection", "Building engine", network.num_layers)
            for step in range(network.num_layers):
                if not monitor.step_complete("Tactic selection", step):
                    return None
            monitor.phase_finish("Tactic selection")
            monitor.step_complete("Building engine", 0)
        header = _header(network, config)
        if config.timing_cache is not None:  # one "measured tactic" per layer and configuration
            for layer in network._layers:
                key = f"{layer.type.name}:{layer.name}:{header['flags']}:{header['profiles']}"
                config.timing_cache.entries.setdefault(key, "tactic")
        DOUBLE.builds.append({**header, "config": config, "network": network})
        if monitor is not None:
            monitor.step_complete("Building engine", 1)
            monitor.phase_finish("Building engine")
        return IHostMemory(pack_plan(header, network.model, stripped=header["stripped"]))


def _check_build(network: INetworkDefinition, config: IBuilderConfig) -> list[str]:
    errors = []
    if network.model is None:
        errors.append("Network must have at least one output")
    half = {"FP16", "BF16", "INT8", "FP8"} & config.flags
    if network.strongly_typed and half:
        errors.append(f"Builder flags {sorted(half)} are not allowed with a strongly typed network")
    for tensor in network._inputs:
        if -1 not in tensor.shape:
            continue
        if not config.profiles:
            errors.append("Network has dynamic or shape inputs, but no optimization profile has been defined.")
        for index, profile in enumerate(config.profiles):
            shapes = profile.shapes.get(tensor.name)
            if shapes is None:
                errors.append(f"Optimization profile {index} has no shape for input {tensor.name}")
            elif any(len(s) != len(tensor.shape) or any(d not in (-1, v) for d, v in zip(tensor.shape, s)) for s in shapes):
                errors.append(f"Profile {index} shapes {shapes} do not match input {tensor.name}{tensor.shape}")
    return errors


def _header(network: INetworkDefinition, config: IBuilderConfig) -> dict[str, Any]:
    layers = network._layers
    return {
        "version": __version__,
        "flags": sorted(config.flags),
        "network_flags": network.flags,
        "strongly_typed": network.strongly_typed,
        "inputs": {t.name: t.dtype.name for t in network._inputs},
        "outputs": {t.name: t.dtype.name for t in network._outputs},
        "input_shapes": {t.name: list(t.shape) for t in network._inputs},
        "profiles": [{name: [list(s) for s in shapes] for name, shapes in p.shapes.items()} for p in config.profiles],
        "layer_types": {layer.name: layer.type.name for layer in layers},
        "layer_precisions": {
            layer.name: [layer.precision.name, {str(k): v.name for k, v in layer.output_types.items()}]
            for layer in layers if getattr(layer, "precision_is_set", False)
        },
        "ops": [layer.op for layer in layers],
        "pools": {MemoryPoolType(k).name: v for k, v in config.pools.items()},
        "optimization_level": config.builder_optimization_level,
        "hardware_compatibility_level": HardwareCompatibilityLevel(config.hardware_compatibility_level).name,
        "progress_monitor": config.progress_monitor is not None,
        "timing_cache": config.timing_cache is not None,
        "refittable": builtins.bool({"REFIT", "REFIT_IDENTICAL"} & config.flags),
        "stripped": "STRIP_PLAN" in config.flags,
        "version_compatible": "VERSION_COMPATIBLE" in config.flags,
        "weights": [i.name for i in network.model.graph.initializer],
    }
