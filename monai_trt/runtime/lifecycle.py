"""The engine life cycle of one wrapped submodule: key → lookup/build → load → refit → validate.

:class:`EngineSet` owns everything between a captured call and a runnable engine: which backend serves the device,
the cache key of a call, building or finding the cache entry, loading it, giving weight-less engines the module's
weights, and the first-call comparison with PyTorch. The call path (:mod:`.wrapper`) only asks it for an engine.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.utils._pytree as pytree
from torch import nn

from monai_trt.backends import Backend, BuildJob, merge_build_args, resolve_method
from monai_trt.cache import BuildTimeout, CacheEntry, EngineCache, device_info, engine_key, platform_info
from monai_trt.cache.keys import digest
from monai_trt.cache.meta import ENGINE_FIELDS
from monai_trt.errors import BackendUnavailable, EngineBuildError, ExportError, MonaiTrtError
from monai_trt.events import Event, emit
from monai_trt.export import DEFAULT_EXPORT_ARGS, FlatForward, precision_module
from monai_trt.export.quiet import quiet_third_party, summarize_error
from monai_trt.patch import PatchEntry
from monai_trt.runtime.calls import CapturedCall, dtype_name, engine_float_dtype
from monai_trt.runtime.content_check import GRAPH_AFTER
from monai_trt.runtime.profiles import plan_profiles, profile_accepts
from monai_trt.runtime.refit import REFIT_EXPORT_ARGS, engine_weights, graph_weights, is_refittable
from monai_trt.runtime.rent import Rent
from monai_trt.runtime.stamps import ModuleState
from monai_trt.runtime.validate import compare_outputs
from monai_trt.runtime.verdicts import Verdicts, per_call_seconds

__all__ = ["EngineSet", "LoadedEngine", "Reference", "AutocastMode", "autocast_mode", "open_cache", "no_autocast",
           "eval_mode"]

AutocastMode = torch.dtype | None  # the caller's autocast dtype on the call's device type, None when autocast is off


def autocast_mode(device: str) -> AutocastMode:
    """The autocast state a call runs under: PyTorch's output dtypes depend on it, and on its dtype."""
    kind = torch.device(device).type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None

logger = logging.getLogger(__name__)
_CACHES: dict[str, EngineCache] = {}
_CACHES_LOCK = threading.Lock()

class Reference(Protocol):
    """PyTorch's own outputs for the call being served: (flat tensors, output structure), computed on demand."""

    def __call__(self) -> tuple[list[torch.Tensor], Any]: ...

    def rerun(self) -> Any:
        """Run the original forward on the call's inputs again (for timing), without keeping its outputs."""


def open_cache(path: str) -> EngineCache:
    """One EngineCache per directory per process."""
    with _CACHES_LOCK:
        if path not in _CACHES:
            _CACHES[path] = EngineCache.open(path)
        return _CACHES[path]


class LoadedEngine:
    """An engine in memory, with the shapes it accepts, how to restore its outputs, and the weights it holds.

    `fingerprint` is the module's (architecture, weights) digests the engine computes with (weights baked in, or
    last refitted with); it runs only while that equals the module's current digests (checked on every call, see
    :class:`monai_trt.runtime.stamps.ModuleState`). None: holds no weights yet.
    """

    def __init__(self, engine: Any, cached: CacheEntry, fingerprint: tuple[str, str] | None) -> None:
        self.engine = engine
        self.cached = cached
        self.architecture = cached.meta.get("key_inputs", {}).get("architecture")
        self.fingerprint = fingerprint
        self.refit_mode = cached.meta.get("refit", "none")
        io = cached.meta["io"]
        self.profiles = [tuple(tuple(tuple(s) for s in inp) for inp in p) for p in io["profiles"]]
        self.out_spec = pytree.treespec_loads(cached.meta["outputs"]["spec"])
        self.out_dtypes: dict[AutocastMode, list[torch.dtype]] = {
            None: [getattr(torch, d) for d in cached.meta["outputs"]["dtypes"]]}
        self.checked_autocast: set[AutocastMode] = set()
        self.serve = True  # False: the speed gate found it no faster than PyTorch; its shapes run in PyTorch
        self.verdicts: Verdicts | None = None  # what this machine remembers about the entry

    @classmethod
    def pytorch_only(cls, cached: CacheEntry, fingerprint: tuple[str, str] | None) -> LoadedEngine:
        """A placeholder for an entry the speed gate rejected here: it holds no engine and serves nothing."""
        placeholder = cls(None, cached, fingerprint)
        placeholder.serve = False
        return placeholder

    def accepts(self, shapes: tuple[tuple[int, ...], ...]) -> bool:
        return any(profile_accepts(p, shapes) for p in self.profiles)

    def run(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.engine(tensors)

    def restore(
        self, outputs: list[torch.Tensor], autocast: AutocastMode,
        dress: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None,
    ) -> Any:
        """Engine outputs in PyTorch's dtypes and structure; `dress` gives the leaves PyTorch's tensor types."""
        dtypes = self.out_dtypes.get(autocast, self.out_dtypes[None])
        if len(outputs) != len(dtypes):
            raise EngineBuildError(f"engine {self.cached.path} returned {len(outputs)} outputs, expected {len(dtypes)}")
        leaves = [o.to(d) for o, d in zip(outputs, dtypes)]
        return pytree.tree_unflatten(dress(leaves) if dress is not None else leaves, self.out_spec)


class EngineSet:
    """The engines of one wrapped submodule in this process, and how they come to be.

    Args:
        module: the wrapped module (its live weights).
        original: its unwrapped forward.
        spec: the validated patch entry.
        label: the name used in every message (config id and submodule path).
    """

    def __init__(self, module: nn.Module, original: Callable[..., Any], spec: PatchEntry, label: str) -> None:
        self.module = module
        self.original = original
        self.spec = spec
        self.label = label
        self.by_layout: dict[Any, list[LoadedEngine]] = {}
        self.builds = 0
        self._backends: dict[str, tuple[Backend, dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._state: ModuleState | None = None  # created on the first key: the module may still be on `meta`
        self._warned: set[str] = set()
        self._busy: set[str] = set()  # keys whose build lock outlasted build_timeout once
        # rent before buy (runtime/rent.py): with the speed gate on, for plain entries only
        self.rent = (Rent(lambda: open_cache(spec.path), module, spec, label)
                     if spec.speed_gate and not spec.search_depth and spec.devices is None else None)

    def warn_once(self, cause: str, msg: str, *args: Any) -> None:
        if cause not in self._warned:
            self._warned.add(cause)
            logger.warning(msg, *args)

    def count(self) -> int:
        return sum(len(v) for v in self.by_layout.values())

    # ------------------------------------------------------------------ serving
    def engine_for(
        self, call: CapturedCall, reference: Reference, autocast: AutocastMode,
        deferred: list[Any] | None = None, module_checked: bool = False,
    ) -> LoadedEngine | None:
        """A loaded, validated engine for `call` for the module as it is now, or None (run PyTorch).

        `deferred`, `module_checked` (as `checked`): see :meth:`ModuleState.current`; with `deferred` the caller
        then runs the engine and calls :meth:`confirm` before it uses the outputs."""
        current = (self._state.current(deferred, checked=module_checked)  # the per-call check (README)
                   if self._state is not None else None)
        for loaded in self.by_layout.get(call.layout, ()):
            if loaded.accepts(call.shapes) and loaded.fingerprint == current:
                if not loaded.serve:
                    return None
                if autocast not in loaded.checked_autocast and not self.settle(deferred):
                    return self.engine_for(call, reference, autocast)  # changed: validate with the module as it is
                self._check_once(loaded, call, reference, autocast)
                return loaded
        if self.rent is not None and call.layout not in self.by_layout and self.rent.renting(call.layout):
            return None  # PyTorch, until the calls it answers have cost what taking the engine costs
        if not self.settle(deferred):  # builds, loads and validations below work with final digests
            return self.engine_for(call, reference, autocast)
        with self._lock:
            if current is not None:
                self._sync_weights(current)
            for loaded in self.by_layout.get(call.layout, ()):
                if loaded.accepts(call.shapes):
                    if not loaded.serve:
                        return None
                    self._check_once(loaded, call, reference, autocast)
                    return loaded
            if self.count() >= self.spec.max_engines:
                self.warn_once("max_engines", "%s: already %d engines (max_engines); calls with new shapes run in "
                               "PyTorch", self.label, self.spec.max_engines)
                return None
            loaded = self._prepare(call, reference, autocast)
            if loaded is not None:
                self.by_layout.setdefault(call.layout, []).append(loaded)
            return loaded if loaded is not None and loaded.serve else None

    def confirm(self, deferred: list[Any]) -> bool:
        """False when the module changed under a call that :meth:`engine_for` served with `deferred`."""
        return self._state is None or self._state.confirm(deferred)

    def settle(self, deferred: list[Any] | None) -> bool:
        """Finish a deferred per-call check now (it is then done); False when the module had changed."""
        if not deferred:
            return True
        settled = self.confirm(deferred)
        deferred.clear()
        return settled

    def input_float_dtype(self, device: torch.device) -> torch.dtype:
        """The floating dtype the engine for `device` takes (inputs are cast to it)."""
        try:
            backend, _ = self.backend(device)
        except MonaiTrtError:
            return engine_float_dtype(self.spec.precision)
        return engine_float_dtype(backend.graph_precision(self.spec.precision))

    def backend(self, device: torch.device) -> tuple[Backend, dict[str, Any]]:
        """The backend serving `device` and its effective build args (resolved once per device type)."""
        if device.type not in self._backends:
            backend, why = resolve_method(self.spec.method, device, self.spec.precision)
            if self.spec.method == "auto":
                logger.info("%s: %s", self.label, why)
            if self.spec.precision not in backend.precisions:
                raise BackendUnavailable(f"method '{backend.name}' does not support precision {self.spec.precision}")
            if self.spec.refit not in backend.refit_modes:
                raise BackendUnavailable(f"method '{backend.name}' does not support refit '{self.spec.refit}'")
            if self.spec.use_cuda_graph and not self._graphs(backend, device):
                logger.warning("%s: use_cuda_graph has no effect with method '%s' on %s (aoti and TensorRT engines "
                               "on CUDA only)", self.label, backend.name, device.type)
            args = merge_build_args(backend, self.spec.build_args, strict=self.spec.method != "auto")
            self._backends[device.type] = (backend, args)
        return self._backends[device.type]

    def _graphs(self, backend: Backend, device: torch.device) -> bool:
        """Whether engines of `backend` on `device` replay CUDA graphs: as the entry says, else the backend's
        default (CUDA devices only)."""
        if device.type != "cuda" or not backend.cuda_graphs:
            return False
        if self.spec.use_cuda_graph is None:
            return backend.cuda_graphs == "default"
        return self.spec.use_cuda_graph

    def refresh(self) -> None:
        """Re-fingerprint and re-hash the module on its next call (see :func:`monai_trt.refresh`)."""
        if self._state is not None:
            self._state.refresh()

    # ------------------------------------------------------------------ weights
    def _sync_weights(self, current: tuple[str, str]) -> None:
        """After a change: refit engines built for refitting if only weights changed; drop every other engine."""
        for layout, engines in self.by_layout.items():
            kept = []
            for loaded in engines:
                if loaded.fingerprint == current:
                    kept.append(loaded)
                elif loaded.refit_mode == "refit" and loaded.architecture == current[0]:
                    if loaded.serve:
                        self._refit(loaded, torch.device(layout.device), current)
                    else:
                        loaded.fingerprint = current  # a placeholder: no weights to give it
                    kept.append(loaded)
                else:
                    what = "weights" if loaded.architecture == current[0] else "architecture or attributes"
                    logger.info("%s: %s changed; engine %s is dropped (a new key applies)",
                                self.label, what, loaded.cached.path)
            self.by_layout[layout] = kept

    def _refit(self, loaded: LoadedEngine, device: torch.device, current: tuple[str, str]) -> None:
        """Give a weight-less engine (on `device`) the module's current weights; validated again on its next use."""
        start = time.perf_counter()
        loaded.fingerprint = None
        backend, _ = self.backend(device)
        loaded.engine.refit(engine_weights(self.module, self.original, backend.graph_precision(self.spec.precision)))
        loaded.fingerprint = current
        loaded.checked_autocast.clear()
        logger.info("%s: refitted engine %s with the module's weights in %.2f s",
                    self.label, loaded.cached.path, time.perf_counter() - start)

    # ------------------------------------------------------------------ key → lookup/build → load → refit → validate
    def key_inputs(self, call: CapturedCall, profiles: list, backend: Backend, build_args: Mapping[str, Any]) -> dict:
        """Everything that changes the engine for `call` (see README "How the cache key works")."""
        if self._state is None:
            self._state = ModuleState(self.module)
        architecture, weights = self._state.current()
        refit = self.spec.refit
        return {
            "submodule": self.spec.submodule,
            "module_class": f"{type(self.module).__module__}.{type(self.module).__qualname__}",
            "architecture": architecture,
            "io": {**call.layout.to_json(), "profiles": profiles},
            "method": backend.name,
            "exporter": self.export_args(),
            "precision": self.spec.precision,
            "build_args": dict(build_args),
            "refit": refit,
            "weights": "refit" if refit == "refit" else weights,  # refit: any weights of this design
            "versions": backend.versions(),  # what the engine's loadability depends on (see cache/inventory)
            "libraries": self._state.versions,  # Python, monai and every library the module's code reaches
            "device": device_info(torch.device(call.layout.device)),
            "platform": platform_info(),
        }

    def export_args(self) -> dict[str, Any]:
        refit_args = REFIT_EXPORT_ARGS if self.spec.refit != "none" else {}
        return {**DEFAULT_EXPORT_ARGS, **refit_args, **self.spec.export_args}

    def _prepare(self, call: CapturedCall, reference: Reference, autocast: AutocastMode) -> LoadedEngine | None:
        profiles, why_not = plan_profiles(self.spec, call)
        if profiles is None:
            self.warn_once(f"profile:{why_not}", "%s: %s; this call runs in PyTorch", self.label, why_not)
            return None
        device = torch.device(call.layout.device)
        backend, build_args = self.backend(device)
        if not backend.multi_profile:
            profiles = profiles[:1]  # one engine per profile; the matching one comes first
        clock = _Clock()
        key_inputs = self.key_inputs(call, profiles, backend, build_args)
        key = engine_key(key_inputs)
        clock.lap("key")
        cache = open_cache(self.spec.path)
        cached = cache.lookup(key, required=ENGINE_FIELDS)
        clock.lap("verify")
        built_now = cached is None
        if cached is None:
            failed = cache.failure(key)
            if failed is not None:
                raise ExportError(f"{failed} (remembered from an earlier run; not retried until the network, its "
                                  f"settings or the libraries change, or `python -m monai_trt clean --yes`)")
            try:
                cached = self._build(cache, key, key_inputs, call, profiles, backend, build_args, reference)
            except BuildTimeout as err:
                return self._wait_later(key, err)
            clock.lap("build")
        baked = (key_inputs["architecture"], key_inputs["weights"]) if self.spec.refit == "none" else None
        verdicts = Verdicts(cache, key, device, "cuda_graph" if self._graphs(backend, device) else "plain")
        speed = verdicts.speed if self.spec.speed_gate else None
        if speed is not None and not speed["serve"]:  # measured here before: PyTorch is as fast; nothing to load
            cache.release(cached)
            self._say_slower(cached, speed, remembered=True)
            return LoadedEngine.pytorch_only(cached, self._state.current())
        loaded = self._load(cache, cached, backend, device, baked)
        loaded.verdicts = verdicts
        clock.lap("load")
        if self.spec.refit != "none":
            self._refit(loaded, device, self._state.current())
            clock.lap("refit")
        cache.record_use(cached)
        clock.lap("validate" if self._check_once(loaded, call, reference, autocast) else "validated before")
        if self.spec.speed_gate and speed is None:
            engine_s, pytorch_s = self._time(loaded, call, reference, autocast)
            loaded.serve = verdicts.record_speed(engine_s, pytorch_s, self.spec.speed_gate)
            clock.lap(f"speed gate (engine {engine_s * 1e3:.1f} ms, PyTorch {pytorch_s * 1e3:.1f} ms)")
            if not loaded.serve:
                self._say_slower(cached, verdicts.speed, remembered=False)
        if self.rent is not None and loaded.serve and verdicts.speed is not None:
            self.rent.bought(call.layout, key, clock.total("key", "verify", "load", "refit"), verdicts.speed,
                             measured_warm=not built_now)
        rented = self.rent.rented(call.layout) if self.rent is not None else 0
        if built_now:
            logger.info("%s: first call took %s", self.label, clock)
        else:
            emit(Event(self.label, "cache_hit", detail={"path": str(cached.path)}))
            logger.info("%s: using cached engine %s (%s)%s", self.label, cached.path, clock,
                        f", after {rented} call{'' if rented == 1 else 's'} in PyTorch" if rented else "")
        return loaded

    def _build(
        self, cache: EngineCache, key: str, key_inputs: Mapping[str, Any], call: CapturedCall, profiles: list,
        backend: Backend, build_args: dict[str, Any], reference: Reference,
    ) -> CacheEntry:
        leaves, out_spec = reference()
        shapes = ", ".join(
            f"{n}:{list(t.shape)}:{dtype_name(t.dtype)}" for n, t in zip(call.layout.names, call.tensors))
        built = []

        def build(tmp: Path) -> dict[str, Any]:
            logger.info("%s: building %s engine for inputs %s (key %s)...", self.label, backend.name, shapes, key[:12])
            emit(Event(self.label, "phase", phase=f"building {backend.name} engine"))
            built.append(True)
            start = time.perf_counter()
            emit(Event(self.label, "phase", phase="export"))
            precision = backend.graph_precision(self.spec.precision)
            with quiet_third_party():
                module, forward = precision_module(self.module, self.original, precision)
            graph = FlatForward(module, forward, call.rebuild)
            job = BuildJob(
                module=graph,
                example_inputs=tuple(call.tensors),
                input_names=call.layout.names,
                output_names=self.spec.output_names or tuple(f"output_{i}" for i in range(len(leaves))),
                profiles=tuple(profiles), precision=self.spec.precision, build_args=build_args,
                export_args=self.export_args(), device=torch.device(call.layout.device), label=self.label,
                timing_cache_dir=cache.timing_dir, refit=self.spec.refit,
                weight_names=frozenset(graph_weights(graph)) if self.spec.refit != "none" else frozenset(),
            )
            # exported in eval mode (training flags restored after) and in the entry's precision, never in the
            # caller's autocast (not in the key)
            with torch.no_grad(), eval_mode(graph), quiet_third_party(), no_autocast(call.layout.device, True):
                artifacts = backend.build(job, tmp)
            emit(Event(self.label, "phase", phase="save"))
            return {
                "artifacts": artifacts,
                "key_inputs": key_inputs,
                "io": {"names": list(call.layout.names), "dtypes": list(call.layout.dtypes), "profiles": profiles},
                "outputs": {"spec": pytree.treespec_dumps(out_spec), "dtypes": [dtype_name(t.dtype) for t in leaves]},
                "method": backend.name, "precision": self.spec.precision, "build_args": build_args,
                "refit": self.spec.refit,
                "submodule": self.spec.submodule, "build_seconds": round(time.perf_counter() - start, 3),
            }

        start = time.perf_counter()
        try:
            # After one timeout on this key, later calls only check (without waiting) whether the build is done.
            timeout = 0.0 if key in self._busy else self.spec.build_timeout
            cached = cache.build(key, key_inputs, build, timeout=timeout, required=ENGINE_FIELDS)
            self._busy.discard(key)
        except ExportError as err:
            cache.record_failure(key, key_inputs, str(err))
            raise
        except MonaiTrtError:
            raise
        except Exception as err:
            logger.debug("%s: build failed", self.label, exc_info=True)
            message = f"building with method '{backend.name}' failed: {type(err).__name__}: {summarize_error(err)}"
            raise EngineBuildError(message) from err
        if built:
            self.builds += 1
            emit(Event(self.label, "built", detail={"path": str(cached.path), "seconds": time.perf_counter() - start}))
            logger.info("%s: engine ready in %.1f s at %s", self.label, time.perf_counter() - start, cached.path)
        else:
            emit(Event(self.label, "cache_hit", detail={"path": str(cached.path)}))
            logger.info("%s: using cached engine %s (built by another process)", self.label, cached.path)
        return cached

    def _load(
        self, cache: EngineCache, cached: CacheEntry, backend: Backend, device: torch.device,
        fingerprint: tuple[str, str] | None,
    ) -> LoadedEngine:
        """Load the verified copy of `cached`. A meta.json the engine cannot be described from is an integrity
        failure (quarantined, rebuilt by the next process); a backend that fails to load or returns an engine that
        cannot serve is this process's problem (e.g. out of memory): the shared entry stays."""
        try:
            try:
                loaded = LoadedEngine(None, cached, fingerprint)
            except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
                cache.quarantine(cached.key, f"meta.json cannot describe the engine: {type(err).__name__}: {err}")
                raise EngineBuildError(f"cached engine {cached.path} has an unusable meta.json: {err}") from err
            try:
                loaded.engine = backend.load(cached.files, cached.meta, device,
                                             use_cuda_graph=self._graphs(backend, device))
            except Exception as err:
                raise EngineBuildError(f"cached engine {cached.path} could not be loaded in this process (the entry is "
                                       f"kept for other processes): {type(err).__name__}: {err}") from err
            if cached.meta.get("refit", "none") != "none" and not is_refittable(loaded.engine):
                raise EngineBuildError(f"method '{backend.name}' returned an engine that cannot be refitted")
            return loaded
        finally:
            cache.release(cached)

    def _wait_later(self, key: str, err: BuildTimeout) -> None:
        """Another process holds the build lock past `build_timeout`: PyTorch for now; later calls look again."""
        self._busy.add(key)
        if not self.spec.fallback:
            raise EngineBuildError(str(err)) from err
        self.warn_once(f"busy:{key}", "%s: %s; running PyTorch for now (later calls use the engine once that build "
                       "is published, or build it if the other process dies)", self.label, err)
        return None

    def _time(
        self, loaded: LoadedEngine, call: CapturedCall, reference: Reference, autocast: AutocastMode
    ) -> tuple[float, float]:
        """Seconds per served call and per PyTorch forward on this very call, called back to back (the speed gate's
        measurement; see :func:`~monai_trt.runtime.verdicts.per_call_seconds`).

        A served call is what the wrapper pays besides capturing the inputs: the per-call check (deferred, as served
        calls defer it), the engine and the casts of its outputs; on a small network the check alone can cost more
        than the engine. The warm-up lets the check reach its CUDA graph (:data:`GRAPH_AFTER`)."""
        device = torch.device(call.layout.device)

        def served() -> None:
            deferred: list[Any] = []
            if self._state is not None:
                self._state.current(deferred)
            with no_autocast(call.layout.device, autocast is not None):
                outputs = loaded.run(call.tensors)
            self.confirm(deferred)
            loaded.restore(outputs, autocast)

        return (per_call_seconds(served, device, warmup=GRAPH_AFTER + 1),
                per_call_seconds(reference.rerun, device, warmup=1))

    def _say_slower(self, cached: CacheEntry, speed: Mapping[str, Any] | None, remembered: bool) -> None:
        speed = speed or {}
        self.warn_once(
            f"slower:{cached.key}", "%s: the engine for these shapes is not %.2fx faster than PyTorch on this machine "
            "(engine %.1f ms, PyTorch %.1f ms%s): they run in PyTorch (min_speedup; `python -m monai_trt clean --all` "
            "forgets the measurement)", self.label, speed.get("min_speedup", self.spec.speed_gate),
            1e3 * speed.get("engine_s", float("nan")), 1e3 * speed.get("pytorch_s", float("nan")),
            ", measured in an earlier run" if remembered else "",
        )

    def _check_once(
        self, loaded: LoadedEngine, call: CapturedCall, reference: Reference, autocast: AutocastMode
    ) -> bool:
        """First use per process and autocast state: validate, unless this machine validated the engine before with
        these weights, tolerance and autocast state (then no PyTorch forward). True when PyTorch ran."""
        if autocast in loaded.checked_autocast:
            return False
        mode = None if autocast is None else dtype_name(autocast)
        # what the engine is validated for: architecture, weights, how strict the comparison was, autocast
        weights = self._state.current() if self._state is not None else None
        fingerprint = digest([weights, self.spec.precision, self.spec.tolerance] + ([] if mode is None else [mode]))
        verdicts = loaded.verdicts
        remembered = None if verdicts is None or mode is None else verdicts.autocast_dtypes(mode)
        known = verdicts is not None and self.spec.refit != "refit" and (
            not self.spec.validate or verdicts.validated(fingerprint))
        if known and (mode is None or remembered is not None):
            if autocast is not None:
                loaded.out_dtypes[autocast] = remembered
            loaded.checked_autocast.add(autocast)
            return False
        self._check(loaded, call, reference, autocast)
        if verdicts is not None:
            if mode is not None:
                verdicts.record_autocast_dtypes(mode, loaded.out_dtypes[autocast])
            if self.spec.validate:
                verdicts.record_validated(fingerprint)
        return True

    def _check(self, loaded: LoadedEngine, call: CapturedCall, reference: Reference, autocast: AutocastMode) -> None:
        """Compare with PyTorch and learn the output dtypes (under autocast, PyTorch's differ from the engine's)."""
        if not self.spec.validate and autocast is None:
            loaded.checked_autocast.add(autocast)
            return
        leaves, _ = reference()
        loaded.out_dtypes[autocast] = [t.dtype for t in leaves]
        if self.spec.validate:
            # twice: an engine that carries state from one run into the next (seen: an Inductor engine that answered
            # right once, then NaN) must not pass on its first answer
            for run in ("", " on its second run with the same inputs"):
                with no_autocast(call.layout.device, autocast is not None):
                    outputs = loaded.run(call.tensors)
                error = compare_outputs(outputs, leaves, self.spec.precision, self.spec.tolerance)
                if error:
                    raise EngineBuildError(f"engine {loaded.cached.path} disagrees with PyTorch{run}: {error}")
        loaded.checked_autocast.add(autocast)


class _Clock:
    """Named laps for the log line that says where first-call time went."""

    def __init__(self) -> None:
        self._last = time.perf_counter()
        self._laps: list[tuple[str, float]] = []

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self._laps.append((name, now - self._last))
        self._last = now

    def total(self, *names: str) -> float:
        """Seconds spent in the laps called `names`."""
        return sum(seconds for name, seconds in self._laps if name in names)

    def __str__(self) -> str:
        return ", ".join(f"{name} {seconds:.2f} s" for name, seconds in self._laps)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """`module` in eval mode inside; every submodule's own training flag restored after (the user's mode is theirs)."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


@contextlib.contextmanager
def no_autocast(device: str, enabled: bool) -> Iterator[None]:
    """Autocast off inside (engines run in their own precision) when it was on."""
    if not enabled:
        yield
        return
    with torch.autocast(torch.device(device).type, enabled=False):
        yield
