"""The per-submodule runtime: capture the call, find or lazily build an engine, run it, fall back to PyTorch.

An :class:`EngineWrapper` replaces a module's `forward` on the instance only, so `state_dict` keys never change.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from monai_trt.backends import Backend, BuildJob, merge_build_args, resolve_method
from monai_trt.cache import CacheEntry, EngineCache
from monai_trt.calls import (
    CapturedCall, UnsupportedCall, capture_call, dtype_name, engine_float_dtype, flatten_outputs, forward_signature,
)
from monai_trt.errors import BackendUnavailable, EngineBuildError, MonaiTrtError
from monai_trt.export import DEFAULT_EXPORT_ARGS, FlatForward, precision_module
from monai_trt.keys import WeightsHasher, architecture_fingerprint, device_info, engine_key, platform_info
from monai_trt.profiles import plan_profiles, profile_accepts
from monai_trt.progress import report
from monai_trt.refit import REFIT_EXPORT_ARGS, engine_weights, graph_weights, is_refittable
from monai_trt.spec import PatchEntry
from monai_trt.validate import compare_outputs

__all__ = ["EngineWrapper", "LoadedEngine", "open_cache"]

logger = logging.getLogger(__name__)
_CACHES: dict[str, EngineCache] = {}
_CACHES_LOCK = threading.Lock()


def open_cache(path: str) -> EngineCache:
    """One EngineCache per directory per process."""
    with _CACHES_LOCK:
        if path not in _CACHES:
            _CACHES[path] = EngineCache.open(path)
        return _CACHES[path]


class LoadedEngine:
    """An engine in memory, with the shapes it accepts, how to restore its outputs, and the weights it holds.

    `fingerprint` is the module-weights digest the engine computes with (baked in, or last refitted with); the
    wrapper runs the engine only while it equals the module's current digest. None: holds no weights yet.
    """

    def __init__(self, engine: Any, entry: CacheEntry, fingerprint: str | None) -> None:
        self.engine = engine
        self.entry = entry
        self.fingerprint = fingerprint
        self.refit_mode = entry.meta.get("refit", "none")
        io = entry.meta["io"]
        self.profiles = [tuple(tuple(tuple(s) for s in inp) for inp in p) for p in io["profiles"]]
        self.out_spec = pytree.treespec_loads(entry.meta["outputs"]["spec"])
        self.out_dtypes = {False: [getattr(torch, d) for d in entry.meta["outputs"]["dtypes"]]}
        self.checked_autocast: set[bool] = set()

    def accepts(self, shapes: tuple[tuple[int, ...], ...]) -> bool:
        return any(profile_accepts(p, shapes) for p in self.profiles)

    def run(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.engine(tensors)

    def restore(self, outputs: list[torch.Tensor], autocast: bool) -> Any:
        dtypes = self.out_dtypes.get(autocast, self.out_dtypes[False])
        if len(outputs) != len(dtypes):
            raise EngineBuildError(f"engine {self.entry.path} returned {len(outputs)} outputs, expected {len(dtypes)}")
        return pytree.tree_unflatten([o.to(d) for o, d in zip(outputs, dtypes)], self.out_spec)


class EngineWrapper:
    """Callable installed as `module.forward`; see the module docstring."""

    is_monai_trt_wrapper = True

    def __init__(self, module: nn.Module, path: str, entry: PatchEntry) -> None:
        self.module = module
        self.path = path
        self.entry = entry
        self.previous_forward = module.__dict__.get("forward")
        self.original = self.previous_forward or types.MethodType(type(module).forward, module)
        self._signature = forward_signature(self.original)
        self._engines: dict[Any, list[LoadedEngine]] = {}
        self._backends: dict[str, tuple[Backend, dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._weights: WeightsHasher | None = None
        self._architecture: str | None = None
        self._warned: set[str] = set()
        self.disabled: str | None = None
        self.builds = 0
        self.calls = {"engine": 0, "pytorch": 0}  # how this process's calls were served (e.g. for `bench`)

    @property
    def engines(self) -> dict[Any, list[LoadedEngine]]:
        """Engines loaded in this process, by call layout."""
        return self._engines

    # ------------------------------------------------------------------ call path
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.disabled or self.module.training or torch.compiler.is_compiling() or torch.jit.is_scripting():
            return self._pytorch(args, kwargs)
        try:
            call = capture_call(self._signature, args, kwargs, self._input_float_dtype)
        except UnsupportedCall as err:
            self._warn_once(f"call:{err}", "%s: this call runs in PyTorch: %s", self.entry.describe(), err)
            return self._pytorch(args, kwargs)
        autocast = torch.is_autocast_enabled(torch.device(call.layout.device).type)
        try:
            loaded = self._engine_for(call, args, kwargs, autocast)
            if loaded is None:
                return self._pytorch(args, kwargs)
            with _no_autocast(call.layout.device, autocast):
                outputs = loaded.run(call.tensors)
            result = loaded.restore(outputs, autocast)
            self.calls["engine"] += 1
            return result
        except _CallerError as err:
            raise err.__cause__ from None  # PyTorch itself rejects these inputs: the caller's error, not the engine's
        except MonaiTrtError as err:
            return self._fail(err, args, kwargs)
        except Exception as err:  # noqa: BLE001 - any backend failure must become a fallback, never garbage
            return self._fail(EngineBuildError(f"{type(err).__name__}: {err}"), args, kwargs, cause=err)

    def _fail(self, err: MonaiTrtError, args: Any, kwargs: Any, cause: BaseException | None = None) -> Any:
        if not self.entry.fallback:
            raise err from (cause or err.__cause__)
        self.disabled = str(err)
        logger.warning("%s: engine disabled, falling back to PyTorch: %s", self.entry.describe(), err)
        return self._pytorch(args, kwargs)

    def _pytorch(self, args: Any, kwargs: Any) -> Any:
        self.calls["pytorch"] += 1
        return self.original(*args, **kwargs)

    def _warn_once(self, cause: str, msg: str, *args: Any) -> None:
        if cause not in self._warned:
            self._warned.add(cause)
            logger.warning(msg, *args)

    def _engine_for(self, call: CapturedCall, args: Any, kwargs: Any, autocast: bool) -> LoadedEngine | None:
        current = self._weights.digest() if self._weights is not None else None  # ~30 us unless weights changed
        for loaded in self._engines.get(call.layout, ()):
            if loaded.accepts(call.shapes) and loaded.fingerprint == current:
                if autocast not in loaded.checked_autocast:
                    self._check(loaded, call, args, kwargs, autocast)
                return loaded
        with self._lock:
            if current is not None:
                self._sync_weights(call, current)
            for loaded in self._engines.get(call.layout, ()):
                if loaded.accepts(call.shapes):
                    if autocast not in loaded.checked_autocast:
                        self._check(loaded, call, args, kwargs, autocast)
                    return loaded
            if sum(len(v) for v in self._engines.values()) >= self.entry.max_engines:
                self._warn_once(
                    "max_engines", "%s: already %d engines (max_engines); calls with new shapes run in PyTorch",
                    self.entry.describe(), self.entry.max_engines,
                )
                return None
            loaded = self._prepare(call, args, kwargs, autocast)
            if loaded is not None:
                self._engines.setdefault(call.layout, []).append(loaded)
            return loaded

    def _sync_weights(self, call: CapturedCall, current: str) -> None:
        """After a weights change: refit the engines built for refitting, drop those with weights baked in."""
        for layout, engines in self._engines.items():
            kept = []
            for loaded in engines:
                if loaded.fingerprint == current:
                    kept.append(loaded)
                elif loaded.refit_mode == "refit":
                    self._refit(loaded, call, torch.device(layout.device), current)
                    kept.append(loaded)
                else:
                    logger.info("%s: weights changed; engine %s (weights baked in or refit identical) is dropped",
                                self.entry.describe(), loaded.entry.path)
            self._engines[layout] = kept

    def _refit(self, loaded: LoadedEngine, call: CapturedCall, device: torch.device, current: str) -> None:
        """Give a weight-less engine (on `device`) the module's current weights; validated again on its next use.

        `call` only builds the graph adapter whose parameter names the engine uses; they do not depend on it.
        """
        start = time.perf_counter()
        loaded.fingerprint = None
        backend, _ = self._backend(device)
        weights = engine_weights(self.module, self.original, call, backend.graph_precision(self.entry.precision))
        loaded.engine.refit(weights)
        loaded.fingerprint = current
        loaded.checked_autocast.clear()
        logger.info("%s: refitted engine %s with the module's weights in %.2f s",
                    self.entry.describe(), loaded.entry.path, time.perf_counter() - start)

    # ------------------------------------------------------------------ build / load
    def _input_float_dtype(self, device: torch.device) -> torch.dtype:
        try:
            backend, _ = self._backend(device)
        except MonaiTrtError:
            return engine_float_dtype(self.entry.precision)
        return engine_float_dtype(backend.graph_precision(self.entry.precision))

    def _backend(self, device: torch.device) -> tuple[Backend, dict[str, Any]]:
        if device.type not in self._backends:
            backend, why = resolve_method(self.entry.method, device, self.entry.precision)
            if self.entry.method == "auto":
                logger.info("%s: %s", self.entry.describe(), why)
            if self.entry.precision not in backend.precisions:
                raise BackendUnavailable(f"method '{backend.name}' does not support precision {self.entry.precision}")
            if self.entry.refit not in backend.refit_modes:
                raise BackendUnavailable(f"method '{backend.name}' does not support refit '{self.entry.refit}'")
            if self.entry.use_cuda_graph and not backend.cuda_graphs:
                logger.warning("%s: use_cuda_graph has no effect with method '%s' (TensorRT engines only)",
                               self.entry.describe(), backend.name)
            args = merge_build_args(backend, self.entry.build_args, strict=self.entry.method != "auto")
            self._backends[device.type] = (backend, args)
        return self._backends[device.type]

    def _prepare(self, call: CapturedCall, args: Any, kwargs: Any, autocast: bool) -> LoadedEngine | None:
        profiles, why_not = plan_profiles(self.entry, call)
        if profiles is None:
            self._warn_once(f"profile:{why_not}", "%s: %s; this call runs in PyTorch", self.entry.describe(), why_not)
            return None
        device = torch.device(call.layout.device)
        backend, build_args = self._backend(device)
        if not backend.multi_profile:
            profiles = profiles[:1]  # one engine per profile; the matching one comes first
        start = time.perf_counter()
        if self._weights is None:
            self._weights = WeightsHasher(self.module)
            self._architecture = architecture_fingerprint(self.module)
        weights = self._weights.digest()
        logger.debug("%s: key inputs hashed in %.3f s", self.entry.describe(), time.perf_counter() - start)
        refit = self.entry.refit
        export_args = {**DEFAULT_EXPORT_ARGS, **(REFIT_EXPORT_ARGS if refit != "none" else {}), **self.entry.export_args}
        key_inputs = {
            "submodule": self.entry.submodule,
            "module_class": f"{type(self.module).__module__}.{type(self.module).__qualname__}",
            "architecture": self._architecture,
            "io": {**call.layout.to_json(), "profiles": profiles},
            "method": backend.name,
            "exporter": export_args,
            "precision": self.entry.precision,
            "build_args": build_args,
            "refit": refit,
            "weights": "refit" if refit == "refit" else weights,  # refit: any weights of this architecture
            "versions": backend.versions(),
            "device": device_info(device),
            "platform": platform_info(),
        }
        key = engine_key(key_inputs)
        cache = open_cache(self.path)
        clock = _Clock()
        entry = cache.lookup(key)
        clock.lap("verify")
        reference = None
        if entry is None:
            reference = self._reference(args, kwargs)
            entry = self._build(cache, key, key_inputs, call, profiles, backend, build_args, export_args, reference)
            clock.lap("build")
        loaded = self._load(cache, entry, backend, device, weights if refit == "none" else None)
        clock.lap("load")
        if refit != "none":
            self._refit(loaded, call, device, weights)
            clock.lap("refit")
        cache.record_use(entry)
        self._check(loaded, call, args, kwargs, autocast, reference)
        clock.lap("validate")
        if reference is None:
            logger.info("%s: using cached engine %s (%s)", self.entry.describe(), entry.path, clock)
        else:
            logger.info("%s: first call took %s", self.entry.describe(), clock)
        return loaded

    def _reference(self, args: Any, kwargs: Any) -> tuple[list[torch.Tensor], Any]:
        try:
            with torch.no_grad():
                outputs = self.original(*args, **kwargs)
        except Exception as err:
            raise _CallerError() from err
        return flatten_outputs(outputs)

    def _build(
        self, cache: EngineCache, key: str, key_inputs: Mapping[str, Any], call: CapturedCall, profiles: list,
        backend: Backend, build_args: dict[str, Any], export_args: dict[str, Any], reference: Any,
    ) -> CacheEntry:
        leaves, out_spec = reference
        label = self.entry.describe()
        shapes = ", ".join(f"{n}:{list(t.shape)}:{dtype_name(t.dtype)}" for n, t in zip(call.layout.names, call.tensors))
        built = []

        def build(tmp: Path) -> dict[str, Any]:
            logger.info("%s: building %s engine for inputs %s (key %s)...", label, backend.name, shapes, key[:12])
            built.append(True)
            start = time.perf_counter()
            report(label, "export")
            module, forward = precision_module(self.module, self.original, backend.graph_precision(self.entry.precision))
            graph = FlatForward(module, forward, call).eval()
            refit = self.entry.refit
            job = BuildJob(
                module=graph,
                example_inputs=tuple(call.tensors),
                input_names=call.layout.names,
                output_names=self.entry.output_names or tuple(f"output_{i}" for i in range(len(leaves))),
                profiles=tuple(profiles), precision=self.entry.precision, build_args=build_args,
                export_args=export_args, device=torch.device(call.layout.device), label=label, cache_root=cache.root,
                refit=refit, weight_names=frozenset(graph_weights(graph)) if refit != "none" else frozenset(),
            )
            with torch.no_grad():
                artifacts = backend.build(job, tmp)
            report(label, "save")
            return {
                "artifacts": artifacts,
                "key_inputs": key_inputs,
                "io": {"names": list(call.layout.names), "dtypes": list(call.layout.dtypes), "profiles": profiles},
                "outputs": {"spec": pytree.treespec_dumps(out_spec), "dtypes": [dtype_name(t.dtype) for t in leaves]},
                "method": backend.name, "precision": self.entry.precision, "build_args": build_args,
                "refit": self.entry.refit,
                "submodule": self.entry.submodule, "build_seconds": round(time.perf_counter() - start, 3),
            }

        start = time.perf_counter()
        try:
            entry = cache.build(key, key_inputs, build)
        except MonaiTrtError:
            raise
        except Exception as err:
            raise EngineBuildError(f"building with method '{backend.name}' failed: {type(err).__name__}: {err}") from err
        if built:
            self.builds += 1
            logger.info("%s: engine ready in %.1f s at %s", label, time.perf_counter() - start, entry.path)
        else:
            logger.info("%s: using cached engine %s (built by another process)", label, entry.path)
        return entry

    def _load(
        self, cache: EngineCache, entry: CacheEntry, backend: Backend, device: torch.device, fingerprint: str | None
    ) -> LoadedEngine:
        try:
            engine = backend.load(entry.path, entry.meta, device, use_cuda_graph=self.entry.use_cuda_graph)
            if entry.meta.get("refit", "none") != "none" and not is_refittable(engine):
                raise TypeError(f"method '{backend.name}' returned an engine that cannot be refitted")
            return LoadedEngine(engine, entry, fingerprint)
        except Exception as err:  # noqa: BLE001 - an unloadable entry is moved aside; the caller rebuilds next call
            cache.quarantine(entry.key, f"could not be loaded: {type(err).__name__}: {err}")
            raise EngineBuildError(f"cached engine {entry.path} could not be loaded: {err}") from err

    def _check(
        self, loaded: LoadedEngine, call: CapturedCall, args: Any, kwargs: Any, autocast: bool, reference: Any = None
    ) -> None:
        """First use per process (and autocast state): compare with PyTorch and learn the output dtypes."""
        if not self.entry.validate and not autocast:
            loaded.checked_autocast.add(autocast)
            return
        leaves, _ = reference if reference is not None and not autocast else self._reference(args, kwargs)
        loaded.out_dtypes[autocast] = [t.dtype for t in leaves]
        if self.entry.validate:
            with _no_autocast(call.layout.device, autocast):
                outputs = loaded.run(call.tensors)
            error = compare_outputs(outputs, leaves, self.entry.precision, self.entry.tolerance)
            if error:
                raise EngineBuildError(f"engine {loaded.entry.path} disagrees with PyTorch: {error}")
        loaded.checked_autocast.add(autocast)

    # ------------------------------------------------------------------ copying
    def __deepcopy__(self, memo: dict[int, Any]) -> EngineWrapper:
        """A copied module gets a fresh wrapper (engines are reloaded from the cache on demand)."""
        module = memo.get(id(self.module))
        if module is None:
            raise TypeError("an EngineWrapper is copied only as part of its module")
        clone = EngineWrapper.__new__(EngineWrapper)
        EngineWrapper.__init__(clone, module, self.path, self.entry)
        clone.previous_forward = None
        clone.original = types.MethodType(type(module).forward, module)
        return clone

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("monai_trt wrappers are not picklable; save the state_dict, or monai_trt.remove() first")


class _Clock:
    """Named laps for the log line that says where first-call time went."""

    def __init__(self) -> None:
        self._last = time.perf_counter()
        self._laps: list[str] = []

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self._laps.append(f"{name} {now - self._last:.2f} s")
        self._last = now

    def __str__(self) -> str:
        return ", ".join(self._laps)


class _CallerError(Exception):
    """The original forward raised on the caller's inputs (re-raised unchanged, engine stays enabled)."""


@contextlib.contextmanager
def _no_autocast(device: str, enabled: bool) -> Any:
    if not enabled:
        yield
        return
    with torch.autocast(torch.device(device).type, enabled=False):
        yield
