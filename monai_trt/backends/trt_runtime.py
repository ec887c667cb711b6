"""TensorRT helpers shared by building and running, and the execution of one engine.

Every TensorRT feature that may be missing from the installed version is reached through :func:`require`, which
turns the `AttributeError` into "X is not available in TensorRT <version>" (as polygraphy's `try_set_flag` /
`fail_unavailable` do), so one code path serves TensorRT 10 and 11.

:class:`TensorRTEngine` runs a deserialized engine with one execution context: inputs and outputs are bound by
tensor name, work is enqueued on the caller's current CUDA stream (no new stream, no host sync, no global lock),
every call returns freshly allocated outputs, and the optimisation profile is chosen from the input shapes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch

from monai_trt.backends.base import UNREFITTED, require_weights
from monai_trt.errors import BackendUnavailable, EngineBuildError

__all__ = [
    "MAX_GRAPH_RECAPTURES",
    "TensorRTEngine",
    "check_weights",
    "is_double",
    "on_device",
    "require",
    "set_flag",
    "torch_dtype",
    "trt_logger",
    "trt_major",
    "trt_version",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")

# A CUDA graph is re-captured when the input addresses move; after this many re-captures the engine stops using
# graphs (inputs are evidently not static buffers) and runs plain launches.
MAX_GRAPH_RECAPTURES = 8
_TORCH_DTYPES = {
    "FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
    "UINT8": torch.uint8, "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool,
}


def trt_version(trt: Any) -> str:
    """The version string of a tensorrt module."""
    return str(getattr(trt, "__version__", "unknown"))


def trt_major(trt: Any) -> int:
    """Major version of a tensorrt module (0 when unreadable)."""
    try:
        return int(trt_version(trt).split(".")[0])
    except ValueError:
        return 0


def is_double(trt: Any) -> bool:
    """True for the test double of tests/trt_double (the only `tensorrt` allowed to run on CPU tensors)."""
    return bool(getattr(trt, "__monai_trt_double__", False))


def device_reason(package: Any, name: str, device: torch.device) -> str | None:
    """Why engines of `package` (TensorRT or Torch-TensorRT, named `name`) cannot run on `device`, or None."""
    if is_double(package):
        return None if device.type == "cpu" else f"the {name} test double runs on CPU tensors only"
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"{name} engines need a CUDA device"
    return None


def require(trt: Any, what: str, action: Callable[[], T]) -> T:
    """Run `action`; a missing TensorRT attribute becomes a clear :class:`BackendUnavailable`.

    Args:
        trt: the tensorrt module in use.
        what: the feature, as the user would look it up (e.g. "BuilderFlag.FP16").
        action: zero-argument callable touching that feature.

    Raises:
        BackendUnavailable: "<what> is not available in TensorRT <version>".
    """
    try:
        return action()
    except AttributeError as err:
        raise BackendUnavailable(f"{what} is not available in TensorRT {trt_version(trt)}") from err


def set_flag(trt: Any, config: Any, name: str, on: bool = True) -> None:
    """Set (or clear) `trt.BuilderFlag.<name>` on a builder config, through :func:`require`."""
    flag = require(trt, f"BuilderFlag.{name}", lambda: getattr(trt.BuilderFlag, name))
    if on:
        config.set_flag(flag)
    else:
        config.clear_flag(flag)


@functools.cache
def trt_logger(trt: Any) -> Any:
    """The process-wide `trt.ILogger` of a tensorrt module, forwarding to this module's `logging` logger.

    Errors are also kept (the last few) so exceptions can quote them; a repeated warning is logged once at WARNING
    and afterwards at DEBUG (TensorRT repeats some warnings on every call).
    """

    class _Logger(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: deque[str] = deque(maxlen=8)
            self._warned: set[str] = set()

        def log(self, severity: Any, msg: str) -> None:
            levels = trt.ILogger.Severity
            if severity in (levels.INTERNAL_ERROR, levels.ERROR):
                self.errors.append(msg)
                logger.error("TensorRT: %s", msg)
            elif severity == levels.WARNING:
                repeat = msg in self._warned
                if not repeat and len(self._warned) < 256:
                    self._warned.add(msg)
                logger.log(logging.DEBUG if repeat else logging.WARNING, "TensorRT: %s", msg)
            elif severity == levels.INFO:
                logger.debug("TensorRT: %s", msg)

        def recent_errors(self) -> str:
            return f" (TensorRT said: {' | '.join(self.errors)})" if self.errors else ""

    return _Logger()


def torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    """The torch dtype of a `trt.DataType` (BF16 is torch.bfloat16, never float16).

    Raises:
        TypeError: a TensorRT type with no torch equivalent here (e.g. FP8, INT4 I/O).
    """
    for name, torch_type in _TORCH_DTYPES.items():
        if getattr(trt.DataType, name, None) == dtype:
            return torch_type
    raise TypeError(f"TensorRT I/O type {dtype} has no torch equivalent supported by monai_trt")


def trt_weights(trt: Any, tensor: torch.Tensor) -> Any:
    """`trt.Weights` over a contiguous host tensor (which must outlive the refit); bf16 goes by pointer."""
    if tensor.dtype == torch.bfloat16:
        return trt.Weights(trt.DataType.BF16, tensor.data_ptr(), tensor.numel())
    return trt.Weights(tensor.numpy())


@contextlib.contextmanager
def on_device(device: torch.device) -> Iterator[None]:
    """Make `device` the current CUDA device (TensorRT uses the current one); nothing on CPU."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            yield
    else:
        yield


def check_weights(trt: Any, engine: Any) -> None:
    """Never run an engine with missing weights: refuse a refittable engine whose refitter reports any.

    Raises:
        EngineBuildError: the engine is weight-stripped (or partly refitted) and must be refitted first.
    """
    if not require(trt, "ICudaEngine.refittable", lambda: engine.refittable):
        return
    refitter = require(trt, "Refitter", lambda: trt.Refitter(engine, trt_logger(trt)))
    missing = list(require(trt, "Refitter.get_missing_weights", refitter.get_missing_weights))
    if missing:
        raise EngineBuildError(
            f"the engine is missing {len(missing)} weights (e.g. {missing[:3]}); it was built without weights "
            "(refit mode) and is refused until it is refitted with the module's weights"
        )


class _Graph:
    """The CUDA graph of one engine: what it was captured for, how to replay it, and its static outputs."""

    def __init__(self) -> None:
        self.key: Any = None
        self.replay: Callable[[], None] | None = None
        self.outputs: list[torch.Tensor] = []
        self.recaptures = 0
        self.refused = False


class TensorRTEngine:
    """A deserialized TensorRT engine with one execution context.

    Args:
        trt: the tensorrt module.
        plan: the serialized engine.
        input_names: the engine inputs in call order (the core passes tensors in this order).
        device: where inputs and outputs live (CPU only with the test double).
        use_cuda_graph: capture the launch in a CUDA graph, replayed while shapes and input addresses repeat.
        host_code_allowed: allow the lean runtime embedded in a version-compatible engine to run.
        stripped: the plan was built without weights (refit modes): it runs only after :meth:`refit`.

    Raises:
        EngineBuildError: the plan does not deserialize here, weights are missing, or the I/O does not match.
    """

    def __init__(
        self, trt: Any, plan: bytes, input_names: Sequence[str], device: torch.device, *,
        use_cuda_graph: bool = False, host_code_allowed: bool = False, stripped: bool = False,
    ) -> None:
        self._trt = trt
        self._device = device
        log = trt_logger(trt)
        with on_device(device):
            self._runtime = trt.Runtime(log)  # must outlive the engine
            if host_code_allowed:
                require(trt, "IRuntime.engine_host_code_allowed",
                        lambda: setattr(self._runtime, "engine_host_code_allowed", True))
            engine = self._runtime.deserialize_cuda_engine(plan)
            if engine is None:
                raise EngineBuildError(
                    "TensorRT could not deserialize the engine (built by another TensorRT version or GPU?)"
                    + log.recent_errors()
                )
            if not stripped:
                check_weights(trt, engine)
            context = engine.create_execution_context()
            if context is None:
                raise EngineBuildError("TensorRT could not create an execution context" + log.recent_errors())
        self._engine, self._context = engine, context
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        engine_inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        unknown = sorted(set(engine_inputs) - set(input_names))
        if unknown:
            raise EngineBuildError(f"engine inputs {unknown} are not among the call's inputs {list(input_names)}")
        # An input the graph does not use may have been dropped by the exporter: it is accepted and ignored.
        self._n_inputs = len(input_names)
        self._inputs = [(i, n) for i, n in enumerate(input_names) if n in engine_inputs]
        self._input_dtypes = {n: torch_dtype(trt, engine.get_tensor_dtype(n)) for n in engine_inputs}
        self._outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.output_dtypes = [torch_dtype(trt, engine.get_tensor_dtype(n)) for n in self._outputs]
        self._ranges = [
            [tuple(tuple(int(d) for d in s) for s in engine.get_tensor_profile_shape(n, p)) for _, n in self._inputs]
            for p in range(engine.num_optimization_profiles)
        ]
        self._active = 0  # a new context starts on profile 0
        self._lock = threading.Lock()  # this engine's context only: calls on other engines never wait
        self._graph = _Graph() if use_cuda_graph else None
        self._refitted = not stripped

    def refit(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Set every refittable weight from `weights` by name, refit, and check that none is missing.

        Raises:
            EngineBuildError: a weight is missing, or TensorRT refused the refit.
        """
        trt = self._trt
        self._refitted = False
        log = trt_logger(trt)
        refitter = require(trt, "Refitter", lambda: trt.Refitter(self._engine, log))
        names = set(require(trt, "Refitter.get_all_weights", refitter.get_all_weights))  # ONNX initializer names
        require_weights(names, weights)
        host = {name: weights[name].detach().cpu().contiguous() for name in sorted(names)}  # alive until refit
        for name, tensor in host.items():
            if not refitter.set_named_weights(name, trt_weights(trt, tensor)):
                raise EngineBuildError(f"refit: TensorRT rejected weight '{name}'" + log.recent_errors())
        with on_device(self._device):
            if not refitter.refit_cuda_engine():
                raise EngineBuildError("refit: TensorRT could not refit the engine" + log.recent_errors())
        left = list(refitter.get_missing_weights())
        if left:
            raise EngineBuildError(f"refit: the engine still misses {len(left)} weights, e.g. {left[:3]}")
        self._refitted = True

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Run the engine; returns new output tensors (a later call never overwrites them).

        Raises:
            ValueError: wrong number of inputs, or shapes outside every optimisation profile.
            TypeError: an input's dtype or device differs from the engine's.
            RuntimeError: TensorRT rejected a binding or the launch.
        """
        if not self._refitted:
            raise EngineBuildError(UNREFITTED)
        if len(inputs) != self._n_inputs:
            raise ValueError(f"the engine takes {self._n_inputs} inputs, got {len(inputs)}")
        bound = [(name, inputs[i]) for i, name in self._inputs]
        for name, tensor in bound:
            expected = self._input_dtypes[name]
            if tensor.dtype != expected:
                raise TypeError(f"input '{name}' is {tensor.dtype}; the engine expects {expected}")
            if tensor.device.type != self._device.type:
                raise TypeError(f"input '{name}' is on {tensor.device}; the engine runs on {self._device}")
        shapes = tuple(tuple(t.shape) for _, t in bound)
        with on_device(self._device), self._lock:
            stream = self._stream()
            profile = self._profile_for(shapes)
            if profile != self._active:
                self._context.set_optimization_profile_async(profile, stream)
                self._active = profile
            if self._graph is not None and not self._graph.refused:
                return self._run_graph(bound, profile, stream)
            return self._launch(bound, stream)

    # ------------------------------------------------------------------ internals
    def _stream(self) -> int:
        if self._device.type == "cuda":
            return torch.cuda.current_stream(self._device).cuda_stream
        return 0  # CPU tensors: only the test double gets here (see TensorRTBackend.unavailable_reason)

    def _profile_for(self, shapes: tuple[tuple[int, ...], ...]) -> int:
        order = [self._active] + [p for p in range(len(self._ranges)) if p != self._active]
        for p in order:
            if all(
                len(shape) == len(lo) and all(a <= s <= b for a, s, b in zip(lo, shape, hi))
                for shape, (lo, _opt, hi) in zip(shapes, self._ranges[p])
            ):
                return p
        raise ValueError(f"input shapes {[list(s) for s in shapes]} lie outside every optimisation profile")

    def _launch(self, bound: list[tuple[str, torch.Tensor]], stream: int) -> list[torch.Tensor]:
        context = self._context
        for name, tensor in bound:
            if not context.set_input_shape(name, tuple(tensor.shape)):
                raise RuntimeError(f"TensorRT rejected shape {list(tensor.shape)} for input '{name}'")
            if not context.set_tensor_address(name, tensor.data_ptr()):
                raise RuntimeError(f"TensorRT rejected the address of input '{name}'")
        outputs = []
        for name, dtype in zip(self._outputs, self.output_dtypes):
            shape = tuple(int(d) for d in context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"output '{name}' has a data-dependent shape {list(shape)}, not supported")
            out = torch.empty(shape, dtype=dtype, device=self._device)
            if not context.set_tensor_address(name, out.data_ptr()):
                raise RuntimeError(f"TensorRT rejected the address of output '{name}'")
            outputs.append(out)
        self._check(context.execute_async_v3(stream))
        return outputs

    def _run_graph(self, bound: list[tuple[str, torch.Tensor]], profile: int, stream: int) -> list[torch.Tensor]:
        graph = self._graph
        key = (profile, tuple((t.data_ptr(), tuple(t.shape)) for _, t in bound))
        if key == graph.key and graph.replay is not None:
            graph.replay()
            return [o.clone() for o in graph.outputs]
        if graph.key is not None:
            graph.recaptures += 1
            if graph.recaptures > MAX_GRAPH_RECAPTURES:
                graph.refused, graph.replay, graph.outputs = True, None, []
                logger.warning(
                    "CUDA graph disabled for this engine: input shapes or addresses changed %d times; pass the same "
                    "input tensors every call (static buffers) to benefit from use_cuda_graph",
                    MAX_GRAPH_RECAPTURES,
                )
                return self._launch(bound, stream)
            logger.debug("input addresses or shapes changed: re-capturing the CUDA graph")
        # One plain launch first (TensorRT must run once before capture); its outputs answer this call.
        graph.outputs = self._launch(bound, stream)
        graph.replay, graph.key = self._capture(), key
        return [o.clone() for o in graph.outputs]

    def _capture(self) -> Callable[[], None]:
        context = self._context
        if self._device.type != "cuda":
            # Test double on CPU: "replaying" re-runs the launch with the addresses bound at capture time, which
            # is what a real graph does (addresses are baked in), so a missed address change shows up as stale data.
            return lambda: self._check(context.execute_async_v3(0))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._check(context.execute_async_v3(torch.cuda.current_stream(self._device).cuda_stream))
        return graph.replay

    def _check(self, ok: bool) -> None:
        if not ok:
            raise RuntimeError("TensorRT execute_async_v3 failed" + trt_logger(self._trt).recent_errors())
