"""A test double of the `tensorrt` Python package: the API surface monai_trt calls, and nothing else.

Names and signatures follow the documented TensorRT 10.x / 11.x Python API. The version comes from the environment
variable MONAI_TRT_DOUBLE_VERSION at import (default 10.13.0); a 11.x double has no FP16/BF16/INT8/FP8 or
precision-constraint builder flags and no per-layer precision, so code that uses them fails here as on TensorRT 11.

The builder keeps the parsed ONNX model in the "plan"; the execution context runs it with onnxruntime on CPU,
reading inputs from and writing outputs to the raw addresses bound with `set_tensor_address`. Everything the code
under test configures is recorded in `DOUBLE` for the tests to assert.
"""

from __future__ import annotations

import builtins
import enum
import json
import os
from types import SimpleNamespace
from typing import Any

import onnx

__version__ = os.environ.get("MONAI_TRT_DOUBLE_VERSION", "10.13.0")
__monai_trt_double__ = True
_MAJOR = int(__version__.split(".")[0])

# What the code under test did, for assertions; `unsupported_ops` makes the parser reject those ONNX op types.
DOUBLE = SimpleNamespace(builds=[], contexts=[], unsupported_ops=set(), plugins_initialised=0)



class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8


float32, float16, bfloat16 = DataType.FLOAT, DataType.HALF, DataType.BF16
int8, int32, int64, uint8 = DataType.INT8, DataType.INT32, DataType.INT64, DataType.UINT8
bool = DataType.BOOL  # noqa: A001 - tensorrt exports `bool` as a DataType, shadowing the builtin as it does

_FLAG_VALUES = {
    "FP16": 0, "INT8": 1, "DEBUG": 2, "GPU_FALLBACK": 3, "REFIT": 5, "DISABLE_TIMING_CACHE": 6, "TF32": 7,
    "SPARSE_WEIGHTS": 8, "SAFETY_SCOPE": 9, "OBEY_PRECISION_CONSTRAINTS": 10, "PREFER_PRECISION_CONSTRAINTS": 11,
    "DIRECT_IO": 12, "VERSION_COMPATIBLE": 14, "EXCLUDE_LEAN_RUNTIME": 15, "FP8": 16, "BF16": 18,
    "STRIP_PLAN": 20, "REFIT_IDENTICAL": 21, "WEIGHT_STREAMING": 22,
}
_REMOVED_IN_11 = {"FP16", "BF16", "INT8", "FP8", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO"}
BuilderFlag = enum.IntEnum(
    "BuilderFlag", {k: v for k, v in _FLAG_VALUES.items() if _MAJOR < 11 or k not in _REMOVED_IN_11}
)
NetworkDefinitionCreationFlag = enum.IntEnum(
    "NetworkDefinitionCreationFlag", {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1} if _MAJOR < 11 else {"STRONGLY_TYPED": 1}
)
MemoryPoolType = enum.IntEnum("MemoryPoolType", {
    "WORKSPACE": 0, "DLA_MANAGED_SRAM": 1, "DLA_LOCAL_DRAM": 2, "DLA_GLOBAL_DRAM": 3, "TACTIC_DRAM": 4,
    "TACTIC_SHARED_MEMORY": 5,
})
HardwareCompatibilityLevel = enum.IntEnum("HardwareCompatibilityLevel", {
    "NONE": 0, "AMPERE_PLUS": 1, "SAME_COMPUTE_CAPABILITY": 2,
})
LayerType = enum.IntEnum("LayerType", {
    "CONVOLUTION": 0, "ACTIVATION": 2, "POOLING": 3, "SCALE": 5, "SOFTMAX": 6, "CONCATENATION": 8,
    "ELEMENTWISE": 9, "UNARY": 12, "SHUFFLE": 14, "REDUCE": 16, "CONSTANT": 18, "MATRIX_MULTIPLY": 17,
    "GATHER": 19, "SLICE": 15, "SHAPE": 20, "IDENTITY": 24, "CAST": 25, "NORMALIZATION": 44,
})
TensorIOMode = enum.IntEnum("TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2})
ErrorCode = enum.IntEnum("ErrorCode", {"SUCCESS": 0, "INTERNAL_ERROR": 1, "INVALID_NODE": 4, "UNSUPPORTED_NODE": 8})

_LAYER_OF_OP = {
    "Conv": "CONVOLUTION", "ConvTranspose": "CONVOLUTION", "InstanceNormalization": "NORMALIZATION",
    "LayerNormalization": "NORMALIZATION", "GroupNormalization": "NORMALIZATION", "BatchNormalization": "SCALE",
    "Relu": "ACTIVATION", "Sigmoid": "ACTIVATION", "Tanh": "ACTIVATION", "MatMul": "MATRIX_MULTIPLY",
    "Gemm": "MATRIX_MULTIPLY", "Reshape": "SHUFFLE", "Transpose": "SHUFFLE", "Unsqueeze": "SHUFFLE",
    "Squeeze": "SHUFFLE", "ReduceMean": "REDUCE", "ArgMax": "REDUCE", "Cast": "CAST", "Constant": "CONSTANT",
    "Gather": "GATHER", "Shape": "SHAPE", "Identity": "IDENTITY", "Softmax": "SOFTMAX", "Concat": "CONCATENATION",
}
_ONNX_TYPES = {
    onnx.TensorProto.FLOAT: DataType.FLOAT, onnx.TensorProto.FLOAT16: DataType.HALF,
    onnx.TensorProto.BFLOAT16: DataType.BF16, onnx.TensorProto.INT32: DataType.INT32,
    onnx.TensorProto.INT64: DataType.INT64, onnx.TensorProto.INT8: DataType.INT8,
    onnx.TensorProto.UINT8: DataType.UINT8, onnx.TensorProto.BOOL: DataType.BOOL,
}


class ILogger:
    """Application-implemented logger interface; subclasses call `ILogger.__init__(self)` and define `log`."""

    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = Severity

    def __init__(self) -> None:
        pass

    def log(self, severity: ILogger.Severity, msg: str) -> None:
        raise NotImplementedError


class IProgressMonitor:
    """Application-implemented progress interface: phase_start / step_complete / phase_finish."""

    def __init__(self) -> None:
        pass


def init_libnvinfer_plugins(logger: ILogger, namespace: str) -> bool:
    DOUBLE.plugins_initialised += 1
    return True


class IHostMemory(bytes):
    """Serialized data (the real one exposes the buffer protocol; `bytes(memory)` copies it)."""

    @property
    def nbytes(self) -> int:
        return len(self)


class ITensor:
    def __init__(self, name: str, shape: tuple[int, ...], dtype: DataType) -> None:
        self.name, self.shape, self.dtype = name, shape, dtype


class ILayer:
    def __init__(self, name: str, op: str) -> None:
        self.name = name
        self.type = LayerType[_LAYER_OF_OP.get(op, "ELEMENTWISE")]
        self.num_outputs = 1
        self.op = op


class _WeaklyTypedLayer(ILayer):
    """TensorRT 10 layers also carry a requested compute precision and output types."""

    def __init__(self, name: str, op: str) -> None:
        super().__init__(name, op)
        self._precision: DataType | None = None
        self.output_types: dict[int, DataType] = {}

    @property
    def precision(self) -> DataType:
        return DataType.FLOAT if self._precision is None else self._precision

    @precision.setter
    def precision(self, value: DataType) -> None:
        self._precision = DataType(value)

    @property
    def precision_is_set(self) -> bool:
        return self._precision is not None

    def set_output_type(self, index: int, dtype: DataType) -> None:
        if not 0 <= index < self.num_outputs:
            raise IndexError(index)
        self.output_types[index] = DataType(dtype)


_Layer = ILayer if _MAJOR >= 11 else _WeaklyTypedLayer


class INetworkDefinition:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.strongly_typed = _MAJOR >= 11 or builtins.bool(flags & (1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        self.model: onnx.ModelProto | None = None
        self._inputs: list[ITensor] = []
        self._outputs: list[ITensor] = []
        self._layers: list[ILayer] = []

    num_layers = property(lambda self: len(self._layers))
    num_inputs = property(lambda self: len(self._inputs))
    num_outputs = property(lambda self: len(self._outputs))

    def get_layer(self, index: int) -> ILayer:
        return self._layers[index]

    def get_input(self, index: int) -> ITensor:
        return self._inputs[index]

    def get_output(self, index: int) -> ITensor:
        return self._outputs[index]

    def populate(self, model: onnx.ModelProto) -> None:
        self.model = model
        weights = {i.name for i in model.graph.initializer}
        self._inputs = [_tensor(v) for v in model.graph.input if v.name not in weights]
        self._outputs = [_tensor(v) for v in model.graph.output]
        self._layers = [_Layer(node.name or f"layer_{i}", node.op_type) for i, node in enumerate(model.graph.node)]


def _tensor(value: onnx.ValueInfoProto) -> ITensor:
    dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim)
    return ITensor(value.name, dims, _ONNX_TYPES[value.type.tensor_type.elem_type])


class ParserError:
    def __init__(self, node: int, name: str, operator: str, desc: str) -> None:
        self._node, self._name, self._operator, self._desc = node, name, operator, desc

    def code(self) -> ErrorCode:
        return ErrorCode.UNSUPPORTED_NODE

    def desc(self) -> str:
        return self._desc

    def node(self) -> int:
        return self._node

    def node_name(self) -> str:
        return self._name

    def node_operator(self) -> str:
        return self._operator


class OnnxParser:
    def __init__(self, network: INetworkDefinition, logger: ILogger) -> None:
        self._network, self._logger, self._errors = network, logger, []

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, index: int) -> ParserError:
        return self._errors[index]

    def parse_from_file(self, model: str) -> bool:
        proto = onnx.load(model)  # reads external weights beside the file, as the real parser does
        for index, node in enumerate(proto.graph.node):
            if node.op_type in DOUBLE.unsupported_ops:
                desc = f"No importer registered for op: {node.op_type}"
                self._errors.append(ParserError(index, node.name, node.op_type, desc))
                self._logger.log(ILogger.ERROR, f"ModelImporter.cpp: ERROR: {desc}")
        if self._errors:
            return False
        self._network.populate(proto)
        return True


class IOptimizationProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

    def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:  # noqa: A002 - the real names
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

    __slots__ = ("_flags", "pools", "profiles", "timing_cache", "_level", "hardware_compatibility_level",
                 "_monitor", "_logger")

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
        if config.timing_cache is not None:
            for layer in network._layers:
                config.timing_cache.entries.setdefault(f"{layer.type.name}:{layer.name}:{sorted(config.flags)}", "tactic")
        header = _header(network, config)
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


# The runtime half lives in its own module; imported last because it uses the names defined above.
from tensorrt._engine import ICudaEngine, IExecutionContext, Refitter, Runtime, pack_plan  # noqa: E402
