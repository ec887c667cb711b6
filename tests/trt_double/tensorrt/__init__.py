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
import os
from types import SimpleNamespace

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
bool = DataType.BOOL

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


# The build and runtime halves live in their own modules; imported last because they use the names above.
from tensorrt._builder import Builder as Builder
from tensorrt._builder import IBuilderConfig as IBuilderConfig
from tensorrt._builder import IOptimizationProfile as IOptimizationProfile
from tensorrt._builder import ITimingCache as ITimingCache
from tensorrt._engine import ICudaEngine as ICudaEngine
from tensorrt._engine import IExecutionContext as IExecutionContext
from tensorrt._engine import Refitter as Refitter
from tensorrt._engine import Runtime as Runtime
from tensorrt._engine import Weights as Weights  # noqa: F401 - re-export

