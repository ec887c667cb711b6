"""`onnxruntime`: ONNX export → ONNX Runtime session (CPU; CUDA when onnxruntime has its CUDA provider)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from monai.utils import optional_import

from monai_trt.backends.base import UNREFITTED, BuildJob, Engine, require_weights
from monai_trt.errors import EngineBuildError
from monai_trt.events import report
from monai_trt.export.program import export_onnx

__all__ = ["OnnxRuntimeBackend"]

ort, _HAS_ORT = optional_import("onnxruntime")
onnx, _ = optional_import("onnx")
logger = logging.getLogger(__name__)
MODEL = "model.onnx"
_PROTOBUF_LIMIT = 2**31 - 2**24  # an in-memory ONNX model must stay under protobuf's 2 GiB


class OnnxRuntimeBackend:
    """ONNX Runtime engines. `build_args`: graph optimisation level, thread counts, whether idle threads spin."""

    name: ClassVar[str] = "onnxruntime"
    multi_profile: ClassVar[bool] = False
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "tf32", "fp16")
    refit_modes: ClassVar[tuple[str, ...]] = ("none", "identical", "refit")
    cuda_graphs: ClassVar[str] = ""
    default_build_args: ClassVar[Mapping[str, Any]] = {
        "graph_optimization_level": "all",
        "intra_op_num_threads": 0,
        "inter_op_num_threads": 0,
        "allow_spinning": False,  # idle intra-op threads sleep instead of spinning (see `_session`)
    }

    def unavailable_reason(self, device: torch.device) -> str | None:
        if not _HAS_ORT:
            return "the onnxruntime package is not installed (pip install onnxruntime)"
        if device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            return "this onnxruntime build has no CUDAExecutionProvider (install onnxruntime-gpu)"
        if device.type not in ("cpu", "cuda"):
            return f"device type {device.type} is not supported"
        return None

    def versions(self) -> dict[str, str]:
        import onnx

        return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__}

    def graph_precision(self, precision: str) -> str:
        return precision

    def build(self, job: BuildJob, out_dir: Path) -> list[str]:
        files = export_onnx(job, str(out_dir / MODEL))
        report(job.label, "engine build (ONNX Runtime session)")
        if job.refit != "none":  # the session is created, and checked, when the weights arrive
            return _strip_weights(out_dir, files, job.weight_names)
        # Check the session can be created here, so a graph ORT rejects fails the build, not the first call.
        self._session(str(out_dir / MODEL), job.build_args, job.device)
        return files

    def load(
        self, entry_dir: Path, meta: Mapping[str, Any], device: torch.device, use_cuda_graph: bool = False
    ) -> Engine:
        if meta.get("refit", "none") != "none":
            return _RefittableOrt(onnx.load(str(entry_dir / MODEL)), meta["build_args"], device)
        return _OrtEngine(self._session(str(entry_dir / MODEL), meta["build_args"], device), device)

    @staticmethod
    def _session(model: str | bytes, build_args: Mapping[str, Any], device: torch.device) -> Any:
        options = ort.SessionOptions()
        level = str(build_args["graph_optimization_level"]).lower()
        levels = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        if level not in levels:
            raise ValueError(f"graph_optimization_level must be one of {sorted(levels)}, got {level!r}")
        options.graph_optimization_level = levels[level]
        options.intra_op_num_threads = int(build_args["intra_op_num_threads"])
        options.inter_op_num_threads = int(build_args["inter_op_num_threads"])
        options.log_severity_level = 3
        # Idle ORT threads spin by default; between engine calls that takes the cores the caller's own work needs
        # (the example bundle's evaluator on a 2-core CPU: 1.52-1.59 s per epoch spinning, 1.25-1.32 s not).
        spin = "1" if build_args["allow_spinning"] else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        return ort.InferenceSession(model, sess_options=options, providers=providers)


def _strip_weights(out_dir: Path, files: list[str], weight_names: frozenset[str]) -> list[str]:
    """Rewrite the exported model without the initializers that are weights; returns the files left."""
    model = onnx.load(str(out_dir / MODEL))
    kept = [i for i in model.graph.initializer if i.name not in weight_names]
    stripped = len(model.graph.initializer) - len(kept)
    if not stripped:
        raise EngineBuildError("refit: the exported graph has no initializer named like a module weight")
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    for name in files:
        (out_dir / name).unlink()
    onnx.save(model, str(out_dir / MODEL))
    logger.debug("refit: %d weight initializers left out of %s", stripped, MODEL)
    return [MODEL]


class _RefittableOrt:
    """A weight-less ONNX graph: each refit creates a session with the given weights as initializers."""

    def __init__(self, graph: Any, build_args: Mapping[str, Any], device: torch.device) -> None:
        self._graph = graph
        self._build_args = build_args
        self._device = device
        known = {i.name for i in graph.graph.initializer} | {i.name for i in graph.graph.input}
        used = {name for node in graph.graph.node for name in node.input}
        self._names = frozenset(used - known - {o for node in graph.graph.node for o in node.output} - {""})
        self._engine: _OrtEngine | None = None

    def refit(self, weights: Mapping[str, torch.Tensor]) -> None:
        self._engine = None
        require_weights(self._names, weights)
        model = onnx.ModelProto()
        model.CopyFrom(self._graph)
        arrays = {name: _to_numpy(weights[name]) for name in sorted(self._names)}
        if sum(a.nbytes for a in arrays.values()) > _PROTOBUF_LIMIT:
            raise EngineBuildError("refit with onnxruntime needs the weights to fit in one 2 GiB ONNX model")
        model.graph.initializer.extend(onnx.numpy_helper.from_array(a, name) for name, a in arrays.items())
        session = OnnxRuntimeBackend._session(model.SerializeToString(), self._build_args, self._device)
        self._engine = _OrtEngine(session, self._device)

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if self._engine is None:
            raise EngineBuildError(UNREFITTED)
        return self._engine(inputs)


class _OrtEngine:
    """Runs the session; host round trip (correct everywhere, the fast path for CPU)."""

    def __init__(self, session: Any, device: torch.device) -> None:
        self._session = session
        self._device = device
        self._names = [i.name for i in session.get_inputs()]

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        feeds = {name: _to_numpy(t) for name, t in zip(self._names, inputs)}
        outputs = self._session.run(None, feeds)
        return [torch.from_numpy(np.ascontiguousarray(o)).to(self._device) for o in outputs]


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:
        raise TypeError("onnxruntime inputs cannot be bfloat16 on the host; use precision fp16 or fp32")
    return tensor.detach().cpu().numpy()
