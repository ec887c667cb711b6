"""A CUDA stand-in for `tensorrt` whose one engine copies input "x" to output "y" with `cudaMemcpyAsync`.

It exercises TensorRTEngine's CUDA path without TensorRT: the copy is enqueued on the stream handle the engine
passes to `execute_async_v3`, so stream choice, CUDA-graph capture/replay and output freshness are real CUDA
behaviour. Every stream handle received is appended to `STREAMS`.
"""

from __future__ import annotations

import ctypes
import enum
import glob
import math
import os
import types
from typing import Any

import torch

_MEMCPY_DEVICE_TO_DEVICE = 3
PROFILE = [(1, 4), (8, 4), (64, 4)]  # min, opt, max of input "x"


def _cudart() -> Any:
    pattern = os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "**", "libcudart.so*")
    for path in sorted(glob.glob(pattern, recursive=True)) + ["libcudart.so"]:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        lib.cudaMemcpyAsync.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        return lib
    return None


def make_module() -> types.ModuleType | None:
    """The stand-in module, or None when libcudart cannot be loaded."""
    cudart = _cudart()
    if cudart is None:
        return None
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.13.0"
    trt.STREAMS = []
    trt.DataType = enum.IntEnum("DataType", {"FLOAT": 0})
    trt.TensorIOMode = enum.IntEnum("TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2})

    class ILogger:
        Severity = enum.IntEnum("Severity", {"INTERNAL_ERROR": 0, "ERROR": 1, "WARNING": 2, "INFO": 3, "VERBOSE": 4})

        def __init__(self) -> None:
            pass

    class IExecutionContext:
        def __init__(self) -> None:
            self.shape: tuple[int, ...] = ()
            self.addresses: dict[str, int] = {}

        def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
            return True

        def set_input_shape(self, name: str, shape: Any) -> bool:
            self.shape = tuple(shape)
            return True

        def set_tensor_address(self, name: str, memory: int) -> bool:
            self.addresses[name] = memory
            return True

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return self.shape

        def execute_async_v3(self, stream_handle: int) -> bool:
            trt.STREAMS.append(stream_handle)
            size = 4 * math.prod(self.shape)
            status = cudart.cudaMemcpyAsync(
                self.addresses["y"], self.addresses["x"], size, _MEMCPY_DEVICE_TO_DEVICE, stream_handle
            )
            return status == 0

    class ICudaEngine:
        num_io_tensors, num_optimization_profiles, refittable = 2, 1, False

        def get_tensor_name(self, index: int) -> str:
            return ["x", "y"][index]

        def get_tensor_mode(self, name: str) -> Any:
            return trt.TensorIOMode.INPUT if name == "x" else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name: str) -> Any:
            return trt.DataType.FLOAT

        def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
            return PROFILE

        def create_execution_context(self) -> IExecutionContext:
            return IExecutionContext()

    class Runtime:
        def __init__(self, logger: Any) -> None:
            pass

        def deserialize_cuda_engine(self, serialized_engine: Any) -> ICudaEngine:
            return ICudaEngine()

    trt.ILogger, trt.Runtime = ILogger, Runtime
    return trt
