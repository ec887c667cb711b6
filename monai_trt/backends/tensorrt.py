"""`onnx`: the shared ONNX export → TensorRT engine (TensorRT 10 and 11).

Build steps: export (monai_trt.export.program, shared with onnxruntime) → parse (TensorRT's ONNX parser; errors name the
failing node) → configure (precision per TensorRT major, options from `build_args`, one optimisation profile per
job profile, progress monitor, persistent timing cache) → serialize. Running is in :mod:`trt_runtime`.

Precision: TensorRT 10 builds weakly typed networks from an fp32 graph with FP16/BF16 builder flags, keeping
normalisation layers in FLOAT under precision constraints. TensorRT 11 has no such flags: networks are strongly
typed and precision comes from the graph, which the core casts before export (see `graph_precision`).
"""

from __future__ import annotations

import functools
import logging
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from filelock import FileLock, Timeout
from monai.utils import optional_import

from monai_trt.backends.base import BuildJob, Engine
from monai_trt.backends.trt_runtime import (
    TensorRTEngine,
    device_reason,
    is_double,
    on_device,
    require,
    set_flag,
    trt_logger,
    trt_major,
    trt_version,
)
from monai_trt.errors import EngineBuildError, PatchError
from monai_trt.export.program import export_onnx
from monai_trt.files import write_atomic

__all__ = ["TensorRTBackend", "TimingCache", "check_build_args"]

trt, _HAS_TRT = optional_import("tensorrt")
logger = logging.getLogger(__name__)
PLAN = "engine.plan"
_HALF = ("fp16", "bf16")
_CONSTRAINT_FLAGS = {"obey": "OBEY_PRECISION_CONSTRAINTS", "prefer": "PREFER_PRECISION_CONSTRAINTS", "none": None}
_REFIT_FLAGS = {"none": (), "identical": ("STRIP_PLAN", "REFIT_IDENTICAL"), "refit": ("STRIP_PLAN", "REFIT")}
_HARDWARE = ("none", "ampere_plus", "same_compute_capability")
_PROGRESS_EVERY_S = 10.0
_TIMING_LOCK_TIMEOUT_S = 120.0


def installed_major() -> int | None:
    """Major version of the importable `tensorrt` (None when it does not import)."""
    return trt_major(trt) if _HAS_TRT else None


class TensorRTBackend:
    """TensorRT engines built from the shared ONNX export; see the module docstring."""

    name: ClassVar[str] = "onnx"
    multi_profile: ClassVar[bool] = True
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "tf32", "fp16", "bf16")
    refit_modes: ClassVar[tuple[str, ...]] = tuple(_REFIT_FLAGS)
    cuda_graphs: ClassVar[str] = "opt-in"  # replays only while callers pass the same input tensors
    default_build_args: ClassVar[Mapping[str, Any]] = {
        "builder_optimization_level": 3,  # TensorRT's default; 0 (fast build) .. 5 (slow build, fast engine)
        "precision_constraints": "obey",  # TensorRT 10, fp16/bf16: obey | prefer | none
        "norms_fp32": True,  # TensorRT 10, fp16/bf16: normalization layers compute and output FLOAT
        "workspace_size": 0,  # bytes; 0 leaves TensorRT's default (all device memory)
        "memory_pool_limits": {},  # e.g. {"tactic_shared_memory": 49152}: trt.MemoryPoolType name -> bytes
        "timing_cache": True,  # persist the tactic timing cache in the cache's timing/ directory
        "hardware_compatibility": "none",  # none | ampere_plus | same_compute_capability
        "version_compatible": False,
    }

    def unavailable_reason(self, device: torch.device) -> str | None:
        """None when engines can be built and run on `device`, else why not."""
        if not _HAS_TRT:
            return "the tensorrt package is not installed (pip install monai_trt[tensorrt] on a CUDA machine)"
        if trt_major(trt) < 10:
            return f"TensorRT {trt_version(trt)} is too old; monai_trt needs TensorRT 10 or newer"
        return device_reason(trt, "TensorRT", device)

    def versions(self) -> dict[str, str]:
        """torch and TensorRT versions (part of the cache key); the test double is marked as such."""
        versions = {"torch": torch.__version__, "tensorrt": trt_version(trt) if _HAS_TRT else "missing"}
        if _HAS_TRT and is_double(trt):
            versions["tensorrt_double"] = "1"
        return versions

    def graph_precision(self, precision: str) -> str:
        """fp32 graph + builder flags on TensorRT 10; a graph already in fp16/bf16 on TensorRT 11."""
        if precision in _HALF and _HAS_TRT and trt_major(trt) < 11:
            return "fp32"
        return precision

    def build(self, job: BuildJob, out_dir: Path) -> list[str]:
        """Export, parse and build; writes `engine.plan` into `out_dir` (the ONNX files are not kept)."""
        args = check_build_args(job.build_args)
        with tempfile.TemporaryDirectory(dir=out_dir, prefix="onnx-") as tmp:
            onnx_path = Path(tmp) / "model.onnx"
            export_onnx(job, str(onnx_path))
            with on_device(job.device):  # TensorRT builds for the current CUDA device
                plan = _build_plan(job, args, onnx_path)
        (out_dir / PLAN).write_bytes(plan)
        return [PLAN]

    def load(
        self, entry_dir: Path, meta: Mapping[str, Any], device: torch.device, use_cuda_graph: bool = False
    ) -> Engine:
        """Deserialize `engine.plan`, refuse it if weights are missing, and wrap it for calls."""
        args = meta["build_args"]
        return TensorRTEngine(
            trt, (entry_dir / PLAN).read_bytes(), meta["io"]["names"], device,
            use_cuda_graph=use_cuda_graph,
            host_code_allowed=bool(args.get("version_compatible", False)),
            stripped=meta.get("refit", "none") != "none",
        )


def check_build_args(args: Mapping[str, Any]) -> Mapping[str, Any]:
    """Check the values of merged build_args (keys and types were checked by the core).

    Raises:
        PatchError: a value outside its allowed set or range.
    """
    choices = {
        "precision_constraints": tuple(_CONSTRAINT_FLAGS), "hardware_compatibility": _HARDWARE,
    }
    for key, allowed in choices.items():
        if args[key] not in allowed:
            raise PatchError(f"build_args['{key}'] must be one of {list(allowed)}, got {args[key]!r}")
    level = args["builder_optimization_level"]
    if not isinstance(level, int) or not 0 <= level <= 5:
        raise PatchError(f"build_args['builder_optimization_level'] must be an integer 0..5, got {level!r}")
    pools = {"workspace_size": args["workspace_size"], **args["memory_pool_limits"]}
    for key, size in pools.items():
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise PatchError(f"build_args memory limit '{key}' must be a non-negative integer (bytes), got {size!r}")
    return args


def _build_plan(job: BuildJob, args: Mapping[str, Any], onnx_path: Path) -> bytes:
    """Parse the ONNX file, configure the builder, build and return the serialized engine."""
    log = trt_logger(trt)
    init_plugins = getattr(trt, "init_libnvinfer_plugins", None)
    if init_plugins is not None:
        init_plugins(log, "")
    builder = trt.Builder(log)
    flags = 0
    if trt_major(trt) >= 11:  # strongly typed (the only mode of TensorRT 11; the flag says so explicitly)
        typed = require(trt, "NetworkDefinitionCreationFlag.STRONGLY_TYPED",
                        lambda: trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        flags |= 1 << int(typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, log)
    _parse(parser, onnx_path)
    config = builder.create_builder_config()
    _set_precision(network, config, job.precision, args)
    _set_options(config, args, job.refit)
    _add_profiles(builder, network, config, job)
    monitor = _progress_monitor(job.label or "engine")
    if monitor is not None:
        require(trt, "IBuilderConfig.progress_monitor", lambda: setattr(config, "progress_monitor", monitor))
    cache = TimingCache.for_job(job) if args["timing_cache"] else None
    if cache is not None:
        cache.load(config)
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError("TensorRT could not build the engine" + log.recent_errors())
    logger.info("%s: TensorRT %s built the engine in %.1f s", job.label, trt_version(trt), time.perf_counter() - start)
    if cache is not None:
        cache.save(config)
    return bytes(plan)


def _parse(parser: Any, onnx_path: Path) -> None:
    """Parse with TensorRT's ONNX parser (external weights are read beside the file).

    Raises:
        EngineBuildError: naming each failing node (index, name, operator) and the parser's description.
    """
    ok = parser.parse_from_file(str(onnx_path))
    errors = [_describe_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
    if not ok or errors:
        raise EngineBuildError("TensorRT's ONNX parser rejected the graph: " + "; ".join(errors or ["no details"]))


def _describe_parser_error(error: Any) -> str:
    where = f"node {error.node()}"
    name = error.node_name() if hasattr(error, "node_name") else ""
    operator = error.node_operator() if hasattr(error, "node_operator") else ""
    if name or operator:
        where += f" '{name}' ({operator})"
    return f"{where}: {error.desc()} [{error.code()}]"


def _set_precision(network: Any, config: Any, precision: str, args: Mapping[str, Any]) -> None:
    """TF32 on both majors; on TensorRT 10 also FP16/BF16 flags, constraints and FLOAT normalisation layers."""
    set_flag(trt, config, "TF32", on=precision != "fp32")
    if trt_major(trt) >= 11 or precision not in _HALF:
        return  # TensorRT 11 is strongly typed: the graph carries the precision; constraint flags do not exist
    set_flag(trt, config, "FP16" if precision == "fp16" else "BF16")
    constraint = _CONSTRAINT_FLAGS[args["precision_constraints"]]
    if constraint is not None:
        set_flag(trt, config, constraint)
    if args["norms_fp32"]:
        count = _keep_norms_fp32(network)
        if count and constraint is None:
            logger.warning("%d normalization layers were set to FLOAT, but precision_constraints is 'none': "
                           "TensorRT may still run them in %s", count, precision)


def _keep_norms_fp32(network: Any) -> int:
    """Set every normalization layer's compute precision and output types to FLOAT; returns how many."""
    norm = require(trt, "LayerType.NORMALIZATION", lambda: trt.LayerType.NORMALIZATION)
    count = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.type != norm:
            continue
        require(trt, "ILayer.precision", lambda: setattr(layer, "precision", trt.DataType.FLOAT))  # noqa: B023
        for output in range(layer.num_outputs):
            layer.set_output_type(output, trt.DataType.FLOAT)
        count += 1
    return count


def _set_options(config: Any, args: Mapping[str, Any], refit: str) -> None:
    """Optimisation level, memory pools and compatibility from the build_args; refit flags from the entry."""
    level = int(args["builder_optimization_level"])
    require(trt, "IBuilderConfig.builder_optimization_level",
            lambda: setattr(config, "builder_optimization_level", level))
    pools = dict(args["memory_pool_limits"])
    if args["workspace_size"]:
        pools["workspace"] = args["workspace_size"]
    for name, size in pools.items():
        attr = name.upper()
        pool = require(trt, f"MemoryPoolType.{attr}", lambda: getattr(trt.MemoryPoolType, attr))  # noqa: B023 - called now
        config.set_memory_pool_limit(pool, int(size))
    if args["hardware_compatibility"] != "none":
        name = args["hardware_compatibility"].upper()
        hw = require(trt, f"HardwareCompatibilityLevel.{name}", lambda: getattr(trt.HardwareCompatibilityLevel, name))
        require(trt, "IBuilderConfig.hardware_compatibility_level",
                lambda: setattr(config, "hardware_compatibility_level", hw))
    if args["version_compatible"]:
        set_flag(trt, config, "VERSION_COMPATIBLE")
    for flag in _REFIT_FLAGS[refit]:
        set_flag(trt, config, flag)


def _add_profiles(builder: Any, network: Any, config: Any, job: BuildJob) -> None:
    """One optimisation profile per job profile, so the engine serves every range (picked at run time)."""
    present = {network.get_input(i).name for i in range(network.num_inputs)}
    dropped = [n for n in job.input_names if n not in present]
    if dropped:
        logger.debug("%s: inputs %s are unused by the graph and not engine inputs", job.label, dropped)
    for profile in job.profiles:
        trt_profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in zip(job.input_names, profile):
            if name in present:
                trt_profile.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
        if config.add_optimization_profile(trt_profile) < 0:
            raise EngineBuildError(f"TensorRT rejected the optimisation profile {profile}")


def _progress_monitor(label: str) -> Any | None:
    """A build progress monitor logging TensorRT's phases, or None when this TensorRT has no IProgressMonitor."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        logger.debug("TensorRT %s has no IProgressMonitor: build progress is not reported", trt_version(trt))
        return None
    return _monitor_class(base)(label)


@functools.cache
def _monitor_class(base: type) -> type:
    class BuildProgress(base):  # type: ignore[misc, valid-type]
        """Logs top-level phases at INFO, nested ones at DEBUG, and a step line at most every 10 s. Thread-safe."""

        def __init__(self, label: str) -> None:
            base.__init__(self)
            self._label = label
            self._lock = threading.Lock()
            self._phases: dict[str, tuple[float, int, bool]] = {}
            self._last_step_log = time.monotonic()

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with self._lock:
                self._phases[phase_name] = (time.monotonic(), num_steps, parent_phase is None)
            level = logging.INFO if parent_phase is None else logging.DEBUG
            logger.log(level, "%s: TensorRT phase '%s' started (%d steps)", self._label, phase_name, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            now = time.monotonic()
            with self._lock:
                started, steps, _top = self._phases.get(phase_name, (now, 0, False))
                due = now - self._last_step_log >= _PROGRESS_EVERY_S
                if due:
                    self._last_step_log = now
            if due:
                logger.info("%s: TensorRT phase '%s': step %d of %d (%.0f s)", self._label, phase_name, step + 1,
                            steps, now - started)
            return True  # never cancel the build

        def phase_finish(self, phase_name: str) -> None:
            now = time.monotonic()
            with self._lock:
                started, _steps, top = self._phases.pop(phase_name, (now, 0, False))
            level = logging.INFO if top else logging.DEBUG
            logger.log(level, "%s: TensorRT phase '%s' finished in %.1f s", self._label, phase_name, now - started)

    return BuildProgress


class TimingCache:
    """TensorRT's tactic timing cache, persisted per (TensorRT version, GPU) beside the engine cache.

    Loaded before a build; after it, the file is re-read under a file lock, merged with what the build learned
    (another process may have saved meanwhile), and replaced atomically. Failures only cost tuning time: they are
    logged, never raised.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def for_job(cls, job: BuildJob) -> TimingCache | None:
        """`<timing_cache_dir>/trt<version>-<sm..|cpu>.cache`, or None when the job has no such directory."""
        if job.timing_cache_dir is None:
            return None
        if job.device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(job.device)
            arch = f"sm{major}{minor}"
        else:
            arch = job.device.type
        return cls(Path(job.timing_cache_dir) / f"trt{trt_version(trt)}-{arch}.cache")

    def _read(self) -> bytes:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return b""

    def load(self, config: Any) -> None:
        """Give the builder the saved timing cache (an empty one when there is none or it is unreadable)."""
        data = self._read()
        cache = None
        if data:
            try:
                cache = config.create_timing_cache(data)
            except (RuntimeError, TypeError, ValueError) as err:
                logger.warning("timing cache %s is unreadable (%s); starting an empty one", self.path, err)
        if cache is None:
            cache = config.create_timing_cache(b"")
        if not config.set_timing_cache(cache, False):
            logger.warning("TensorRT did not accept the timing cache %s; building without it", self.path)

    def save(self, config: Any) -> None:
        """Merge the build's timing cache into the file, under its lock."""
        built = config.get_timing_cache()
        if built is None:
            return
        lock = FileLock(str(self.path) + ".lock", mode=0o600)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with lock.acquire(timeout=_TIMING_LOCK_TIMEOUT_S):
                disk = self._read()
                if disk:
                    other = config.create_timing_cache(disk)
                    if other is None or not built.combine(other, False):
                        logger.warning("timing cache %s does not match this TensorRT/GPU; replacing it", self.path)
                write_atomic(self.path, bytes(built.serialize()))
        except (OSError, RuntimeError, Timeout) as err:
            logger.warning("could not save the TensorRT timing cache %s: %s", self.path, err)
