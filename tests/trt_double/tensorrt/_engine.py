"""The runtime half of the tensorrt double: plan format, Runtime, ICudaEngine, IExecutionContext, Refitter.

A "plan" is a JSON header (what was configured) and the ONNX model. The execution context runs the model with
onnxruntime, reading each input from the address bound with `set_tensor_address` (shape from `set_input_shape`)
and writing each output to its bound address, so the code under test must bind real, correctly sized buffers.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from tensorrt import DOUBLE, DataType, ILogger, TensorIOMode, __version__

_MAGIC = b"TRT-DOUBLE-PLAN\n"
_NUMPY = {
    DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT32: np.int32, DataType.INT64: np.int64,
    DataType.INT8: np.int8, DataType.UINT8: np.uint8, DataType.BOOL: np.bool_,
}


def pack_plan(header: dict[str, Any], model: onnx.ModelProto, stripped: bool) -> bytes:
    """Serialize header + model; a weight-stripped plan has all initializers zeroed (as TensorRT's run as zeros).

    The header keeps a digest of each build-time weight, so a REFIT_IDENTICAL engine refitted with other weights
    can misbehave the way TensorRT documents (undefined results: here, the weights stay zero).
    """
    header["weight_digests"] = {
        w.name: hashlib.sha256(onnx.numpy_helper.to_array(w).tobytes()).hexdigest() for w in model.graph.initializer
    }
    if stripped:
        model = onnx.ModelProto.FromString(model.SerializeToString())
        for weight in model.graph.initializer:
            array = onnx.numpy_helper.to_array(weight)
            weight.CopyFrom(onnx.numpy_helper.from_array(np.zeros_like(array), weight.name))
    return _MAGIC + json.dumps(header).encode() + b"\n" + model.SerializeToString()


class Runtime:
    def __init__(self, logger: ILogger) -> None:
        self._logger = logger
        self.engine_host_code_allowed = False

    def deserialize_cuda_engine(self, serialized_engine: Any) -> ICudaEngine | None:
        data = bytes(serialized_engine)
        if not data.startswith(_MAGIC):
            self._logger.log(ILogger.ERROR, "Deserialize the cuda engine failed: not a plan")
            return None
        header_line, model = data[len(_MAGIC):].split(b"\n", 1)
        header = json.loads(header_line)
        if header["version"] != __version__:
            self._logger.log(ILogger.ERROR, f"The engine plan file is not compatible with this version of TensorRT, "
                                            f"expecting {__version__} got {header['version']}")
            return None
        if header["version_compatible"] and not self.engine_host_code_allowed:
            self._logger.log(ILogger.ERROR, "Cannot deserialize a version-compatible engine: host code not allowed")
            return None
        return ICudaEngine(header, model, self._logger)


class ICudaEngine:
    def __init__(self, header: dict[str, Any], model: bytes, logger: ILogger) -> None:
        self.header, self.model, self._logger = header, model, logger
        self._names = list(header["inputs"]) + list(header["outputs"])
        self._session: ort.InferenceSession | None = None
        self.missing = set(header["weights"]) if header["stripped"] else set()

    num_io_tensors = property(lambda self: len(self._names))
    num_optimization_profiles = property(lambda self: max(1, len(self.header["profiles"])))
    refittable = property(lambda self: self.header["refittable"])

    def get_tensor_name(self, index: int) -> str:
        return self._names[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        if name in self.header["inputs"]:
            return TensorIOMode.INPUT
        return TensorIOMode.OUTPUT if name in self.header["outputs"] else TensorIOMode.NONE

    def get_tensor_dtype(self, name: str) -> DataType:
        return DataType[{**self.header["inputs"], **self.header["outputs"]}[name]]

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
        if not self.header["profiles"]:  # static engine: the one implicit profile is the input shape
            return [tuple(self.header["input_shapes"][name])] * 3
        return [tuple(s) for s in self.header["profiles"][profile_index][name]]

    def create_execution_context(self) -> IExecutionContext:
        context = IExecutionContext(self)
        DOUBLE.contexts.append(context)
        return context

    def session(self) -> ort.InferenceSession:
        if self._session is None:
            options = ort.SessionOptions()
            options.log_severity_level = 3
            self._session = ort.InferenceSession(self.model, sess_options=options, providers=["CPUExecutionProvider"])
        return self._session


class Weights:
    """Host weights: `Weights(ndarray)` or `Weights(DataType, pointer, count)` (BF16 only, copied here)."""

    def __init__(self, *args: Any) -> None:
        if len(args) == 1:
            if not isinstance(args[0], np.ndarray) or not args[0].flags.c_contiguous:
                raise TypeError("Weights(array) needs a C-contiguous numpy array")
            self.array = args[0]
            return
        dtype, pointer, count = args
        if dtype != DataType.BF16:
            raise TypeError("the double reads only BF16 weights by pointer")
        raw = np.ctypeslib.as_array((ctypes.c_uint16 * count).from_address(pointer)).copy()
        self.array = (raw.astype(np.uint32) << 16).view(np.float32)


class Refitter:
    """Sets initializers of the engine's model by name; `refit_cuda_engine` swaps them in."""

    def __init__(self, engine: ICudaEngine, logger: ILogger) -> None:
        self._engine = engine
        self._logger = logger
        self._pending: dict[str, np.ndarray] = {}

    def get_all_weights(self) -> list[str]:
        return list(self._engine.header["weights"]) if self._engine.refittable else []

    def get_missing_weights(self) -> list[str]:
        return sorted(self._engine.missing - set(self._pending))

    def set_named_weights(self, name: str, weights: Weights) -> bool:
        if name not in self._engine.header["weights"]:
            self._logger.log(ILogger.ERROR, f"Refitter: no weight named {name}")
            return False
        self._pending[name] = weights.array
        return True

    def refit_cuda_engine(self) -> bool:
        if not self._engine.refittable or self.get_missing_weights():
            self._logger.log(ILogger.ERROR, "Refitter: engine is not refittable or weights are missing")
            return False
        model = onnx.ModelProto.FromString(self._engine.model)
        identical = "REFIT_IDENTICAL" in self._engine.header["flags"]
        for weight in model.graph.initializer:
            if weight.name in self._pending:
                dtype = onnx.numpy_helper.to_array(weight).dtype
                array = self._pending[weight.name].astype(dtype).reshape(list(weight.dims))
                if identical and self._engine.header["weight_digests"][weight.name] != hashlib.sha256(
                    array.tobytes()
                ).hexdigest():
                    array = np.zeros_like(array)  # undefined behaviour in TensorRT: wrong numbers, no error
                weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
        self._engine.model = model.SerializeToString()
        self._engine.missing -= set(self._pending)
        self._engine._session = None
        self._pending.clear()
        return True


class IExecutionContext:
    def __init__(self, engine: ICudaEngine) -> None:
        self.engine = engine
        self.active_optimization_profile = 0
        self.calls: list[tuple[Any, ...]] = []  # (method, args...) as called, for assertions
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._addresses: dict[str, int] = {}
        self._output_shapes: dict[Any, dict[str, tuple[int, ...]]] = {}

    def _error(self, msg: str) -> bool:
        self.engine._logger.log(ILogger.ERROR, msg)
        return False

    def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
        self.calls.append(("set_optimization_profile_async", profile_index, stream_handle))
        if not 0 <= profile_index < self.engine.num_optimization_profiles:
            raise RuntimeError("Error in set optimization profile async.")
        self.active_optimization_profile = profile_index
        self._shapes.clear()  # input shapes must be given again for the new profile
        return True

    def set_input_shape(self, name: str, shape: Any) -> bool:
        shape = tuple(int(d) for d in shape)
        self.calls.append(("set_input_shape", name, shape))
        if self.engine.get_tensor_mode(name) != TensorIOMode.INPUT:
            return self._error(f"{name} is not an input tensor")
        lo, _opt, hi = self.engine.get_tensor_profile_shape(name, self.active_optimization_profile)
        if len(shape) != len(lo) or not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
            return self._error(f"setInputShape: shape {shape} of {name} is outside profile "
                               f"{self.active_optimization_profile} [{lo}, {hi}]")
        self._shapes[name] = shape
        return True

    def set_tensor_address(self, name: str, memory: int) -> bool:
        self.calls.append(("set_tensor_address", name, memory))
        if self.engine.get_tensor_mode(name) == TensorIOMode.NONE:
            return self._error(f"{name} is not an I/O tensor")
        self._addresses[name] = int(memory)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if self.engine.get_tensor_mode(name) == TensorIOMode.INPUT:
            return self._shapes.get(name, tuple(self.engine.header["input_shapes"][name]))
        inputs = tuple(self.engine.header["inputs"])
        if any(n not in self._shapes for n in inputs):
            return tuple(-1 for _ in range(1))
        key = tuple(self._shapes[n] for n in inputs)
        if key not in self._output_shapes:  # shape inference: run once on zeros of the set shapes
            feeds = {n: np.zeros(self._shapes[n], _NUMPY[self.engine.get_tensor_dtype(n)]) for n in inputs}
            results = self.engine.session().run(list(self.engine.header["outputs"]), feeds)
            self._output_shapes[key] = {n: r.shape for n, r in zip(self.engine.header["outputs"], results)}
        return tuple(self._output_shapes[key][name])

    def execute_async_v3(self, stream_handle: int) -> bool:
        self.calls.append(("execute_async_v3", stream_handle))
        header = self.engine.header
        for name in list(header["inputs"]) + list(header["outputs"]):
            if name not in self._addresses:
                return self._error(f"address of {name} is not set")
        for name in header["inputs"]:
            if name not in self._shapes:
                return self._error(f"shape of input {name} is not set")
        dtypes = {n: self.engine.get_tensor_dtype(n) for n in list(header["inputs"]) + list(header["outputs"])}
        if any(d not in _NUMPY for d in dtypes.values()):
            return self._error("the test double cannot execute bfloat16/fp8 tensors (no onnxruntime CPU kernels)")
        feeds = {n: _read(self._addresses[n], self._shapes[n], _NUMPY[dtypes[n]]) for n in header["inputs"]}
        results = self.engine.session().run(list(header["outputs"]), feeds)
        for name, result in zip(header["outputs"], results):
            _write(self._addresses[name], np.ascontiguousarray(result, dtype=_NUMPY[dtypes[name]]))
        return True


def _read(address: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    count = int(np.prod(shape, dtype=np.int64))
    if count == 0:
        return np.zeros(shape, dtype)
    buffer = (ctypes.c_char * (count * np.dtype(dtype).itemsize)).from_address(address)
    return np.frombuffer(buffer, dtype=dtype, count=count).reshape(shape).copy()


def _write(address: int, array: np.ndarray) -> None:
    if array.nbytes:
        ctypes.memmove(address, array.ctypes.data, array.nbytes)
