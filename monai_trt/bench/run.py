"""How `bench` runs each mode: eager PyTorch (fp32, tf32, AMP, fp16), torch.compile (a fresh Inductor cache per mode,
so the compile is measured) and engines through `monai_trt.apply` (one fresh cache per mode, so the build is
measured), engines each with their fresh-process start-up and end-to-end bundle run; a failing mode is recorded and
the next one runs."""

from __future__ import annotations

import contextlib
import json as jsonlib
import shutil
import statistics
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monai_trt.bench import compiled
from monai_trt.bench.measure import (
    compare_outputs_to,
    peak_memory,
    reset_peak_memory,
    run_bundle,
    startup_probe,
    summarize_accuracy,
    sync,
    timed,
)
from monai_trt.bench.modes import Mode
from monai_trt.bench.report import write_json
from monai_trt.bench.workload import Workload
from monai_trt.errors import UsageError
from monai_trt.events import EVENTS_ENV, read_events
from monai_trt.export.program import tf32_enabled
from monai_trt.runtime.hook import apply, remove, wrappers

__all__ = ["Clock", "run_modes"]


# ---------------------------------------------------------------------------------------------------------- running
class Clock:
    """Elapsed time since the bench began, and the `--budget` guard."""

    def __init__(self, budget: float | None, log: Callable[[str], None]) -> None:
        self.start, self.budget, self._log = time.perf_counter(), budget, log

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over(self) -> str | None:
        if self.budget is not None and self.elapsed() >= self.budget:
            return f"budget of {self.budget:.0f} s used up ({self.elapsed():.0f} s elapsed)"
        return None

    def timeout(self, default: float = 1800.0) -> float:
        return default if self.budget is None else max(self.budget - self.elapsed(), 60.0)

    def log(self, message: str) -> None:
        self._log(f"[{self.elapsed():7.1f} s] {message}")


@contextlib.contextmanager
def _torch_context(mode: Mode, device: torch.device) -> Iterator[None]:
    """Eager and torch.compile modes: no grad, TF32 only for `tf32`, autocast only for `amp`."""
    with tf32_enabled(mode.precision == "tf32"), torch.no_grad():
        if mode.precision == "amp":
            with torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16):
                yield
        else:
            yield


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else ()
    for value in values:
        return _first_tensor(value)
    raise UsageError(f"the inferer returned a {type(out).__name__} without tensors")


def _context(mode: Mode, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    return (lambda: _torch_context(mode, device)) if mode.kind != "engine" else _engine_context


def _window_batch(work: Workload) -> torch.Tensor:
    return torch.rand(work.batch_shape, generator=torch.Generator().manual_seed(0)).to(work.device)


def _measure(work: Workload, net: nn.Module, context: Callable[[], contextlib.AbstractContextManager], repeats: int,
             warmup: int) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """Network latency at the window batch, then sliding-window seconds per volume; returns (row, outputs)."""
    device = work.device
    x = _window_batch(work)

    def network_call() -> Any:
        with context():
            return net(x)

    row: dict[str, Any] = {}
    reset_peak_memory(device)
    row["network"], _ = timed(network_call, device, repeats, warmup)
    row["network"]["batch_shape"] = list(work.batch_shape)
    volumes = [v.to(device) for v in work.volumes]

    def infer(volume: torch.Tensor) -> torch.Tensor:
        with context():
            return _first_tensor(work.infer(net, volume))

    for _ in range(warmup):
        infer(volumes[0])
    samples, outputs = [], []
    for repeat in range(repeats):
        for volume in volumes:
            sync(device)
            start = time.perf_counter()
            out = infer(volume)
            sync(device)
            samples.append(time.perf_counter() - start)
            if repeat == repeats - 1:
                outputs.append(torch.as_tensor(out).detach().float().cpu())
    row["sliding_window"] = {"median_s": statistics.median(samples), "samples_s": samples,
                             "volumes": [list(v.shape) for v in work.volumes]}
    row["peak_mem_bytes"] = peak_memory(device)
    return row, outputs


def _compile(work: Workload, mode: Mode, net: nn.Module, clock: Clock) -> tuple[nn.Module, dict[str, Any]]:
    """torch.compile `net` and warm it up (window batch until steady, then one sliding-window pass); the build
    record (compile time, call times)."""
    context, device = _context(mode, work.device), work.device
    clock.log(f"{mode.name}: first calls (torch.compile, mode {mode.compile_mode}), batch {list(work.batch_shape)}")
    reset_peak_memory(device)
    net = compiled.compile_network(net, mode.compile_mode)
    x = _window_batch(work)

    def call() -> None:
        with context():
            net(x)

    build = {"compile_mode": mode.compile_mode, **compiled.warm_up(call, lambda: sync(device), clock.over)}
    volume = work.volumes[0].to(device)
    sync(device)
    start = time.perf_counter()
    with context():
        work.infer(net, volume)
    sync(device)
    build["first_volume_s"] = time.perf_counter() - start
    build["peak_mem_bytes"] = peak_memory(device)
    clock.log(f"{mode.name}: first call {build['first_call_s']:.1f} s, {len(build['calls_s'])} calls to a "
              f"{'steady' if build['stable'] else 'last'} {build['steady_call_s'] * 1e3:.1f} ms; first volume "
              f"{build['first_volume_s']:.2f} s")
    return net, build


@contextlib.contextmanager
def _engine_context() -> Iterator[None]:
    with tf32_enabled(False), torch.no_grad():
        yield


def _engines_of(work: Workload) -> list[dict[str, Any]]:
    found = []
    for name, wrapper in wrappers(work.network).items():
        if wrapper.disabled:
            raise RuntimeError(f"engine for '{name or '<network>'}' disabled: {wrapper.disabled}")
        for group in wrapper.engines.values():
            for engine in group:
                entry = engine.cached
                size = sum((entry.path / n).stat().st_size for n in entry.meta.get("artifacts", [])
                           if (entry.path / n).is_file())
                found.append({"submodule": name, "key": entry.key, "method": entry.meta.get("method"),
                              "precision": entry.meta.get("precision"), "build_s": entry.meta.get("build_seconds"),
                              "size_bytes": size})
    if not found:
        raise RuntimeError("no engine was built: the patched submodules ran in PyTorch (see the warnings above)")
    return found


def _entry_count(cache: Path) -> int:
    entries = cache / "entries"
    return len(list(entries.iterdir())) if entries.is_dir() else 0


def _build_engines(work: Workload, mode: Mode, out: Path, clock: Clock, row: dict[str, Any]) -> list[dict[str, Any]]:
    """Patch the network for `mode` in a fresh cache and build on a first call; the build record goes into `row`."""
    cache = out / "cache" / mode.name
    shutil.rmtree(cache, ignore_errors=True)  # a fresh cache per mode: the build is measured
    patch = _engine_patch(work, mode, cache)
    apply(work.network, patch)
    x = _window_batch(work)
    clock.log(f"{mode.name}: first call (export + engine build + validation), batch {list(work.batch_shape)}")
    reset_peak_memory(work.device)
    start = time.perf_counter()
    with _engine_context():
        work.network(x)
    sync(work.device)
    engines = _engines_of(work)
    row["build"] = {"first_call_s": time.perf_counter() - start,
                    "engine_build_s": sum(e["build_s"] or 0.0 for e in engines), "engines": engines,
                    "peak_mem_bytes": peak_memory(work.device)}
    clock.log(f"{mode.name}: first call {row['build']['first_call_s']:.1f} s (engine build "
              f"{row['build']['engine_build_s']:.1f} s, {len(engines)} engine(s))")
    return patch


def _engine_patch(work: Workload, mode: Mode, cache: Path) -> list[dict[str, Any]]:
    devices = {"devices": list(range(mode.devices))} if mode.devices else {}
    return [{**entry, "method": mode.method, "precision": mode.precision, "path": str(cache), "fallback": False,
             **devices} for entry in work.patch]


def _e2e(work: Workload, mode: Mode, out: Path, patch: list[dict[str, Any]] | None, clock: Clock) -> dict[str, Any]:
    """The bundle end to end (`python -m monai.bundle run`) for this mode, or why not."""
    spec = work.e2e
    if spec is None:
        return {"status": "n/a", "reason": "the workload has no bundle"}
    if mode.name == "tf32":
        return {"status": "n/a", "reason": "a bundle run has no TF32 switch"}
    if mode.name == "eager_fp16":
        return {"status": "n/a", "reason": "a bundle run has no fp16 switch"}
    if mode.kind == "compile":
        return {"status": "n/a", "reason": "a bundle run has no torch.compile switch"}
    if mode.name == "amp" and spec.amp_id is None:
        return {"status": "n/a", "reason": "the bundle has no AMP switch (config id 'amp' or 'evaluator#amp')"}
    if mode.name == "amp" and work.device.type != "cuda":
        return {"status": "n/a", "reason": f"the bundle's AMP switch ({spec.amp_id}) is CUDA autocast: on "
                                           f"{work.device.type} it would run fp32"}
    folder = out / "e2e" / mode.name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    files = [str(f) for f in spec.base_files]
    overrides = dict(spec.overrides)
    if patch is not None:
        section: dict[str, Any] = {spec.patch_id: patch}
        if not spec.patch_files:
            apply_call = f"$monai_trt.apply(@{spec.net_id}, @{spec.patch_id}, name='{spec.net_id}')"
            section.update({"+imports": ["$import monai_trt"], "+initialize": [apply_call]})
        (folder / "patch.json").write_text(jsonlib.dumps(section, indent=1))
        files += [str(f) for f in spec.patch_files] + [str(folder / "patch.json")]
    if mode.name == "amp":
        overrides[spec.amp_id] = True
    if spec.has_output_dir:
        overrides["output_dir"] = str(folder / "output")
    args = ["--config_file", repr(files), "--bundle_root", str(spec.bundle_root)]
    if spec.meta_file is not None:
        args += ["--meta_file", str(spec.meta_file)]
    for key, value in overrides.items():
        args += [f"--{key}", value if isinstance(value, str) else repr(value)]
    events = folder / "events.jsonl"
    env = {"MONAI_TRT_CACHE": patch[0]["path"], EVENTS_ENV: str(events)} if patch else {}
    result = run_bundle(args, env, folder / "run.log", clock.timeout())
    if patch is not None and result["status"] == "ok":
        kinds = {e.kind for e in read_events(events)}
        result["engine_cache_hit"] = "cache_hit" in kinds and "built" not in kinds
    return result


def _run_mode(work: Workload, mode: Mode, out: Path, settings: dict[str, Any], reference: list[torch.Tensor] | None,
              clock: Clock) -> tuple[dict[str, Any], list[torch.Tensor]]:
    row: dict[str, Any] = {"mode": mode.name, "kind": mode.kind, "method": mode.method, "precision": mode.precision}
    if mode.devices:
        row["devices"] = mode.devices
    if mode.kind == "compile":
        row["compile_mode"] = mode.compile_mode
    # a fresh Inductor cache per compile mode and per engine mode (aoti builds through Inductor too): cold builds
    cache: contextlib.AbstractContextManager = (
        compiled.fresh_inductor_cache(out / "inductor" / mode.name) if mode.kind in ("compile", "engine")
        else contextlib.nullcontext())
    patch = None
    net = work.network if mode.kind == "engine" else compiled.precision_network(work.network, mode.precision)
    try:
        with cache:
            if mode.kind == "engine":
                patch = _build_engines(work, mode, out, clock, row)
            elif mode.kind == "compile":
                net, row["build"] = _compile(work, mode, net, clock)
            for wrapper in wrappers(work.network).values():
                wrapper.calls.update(engine=0, pytorch=0)
            measured, outputs = _measure(work, net, _context(mode, work.device), settings["repeats"],
                                         settings["warmup"])
            row.update(measured)
            if mode.kind == "engine":
                row["build"]["engines"] = _engines_of(work)  # a smaller last window batch may have added one
                served = [w.calls for w in wrappers(work.network).values()]
                row["calls"] = {k: sum(c[k] for c in served) for k in ("engine", "pytorch")}
            elif mode.kind == "compile":
                build = row["build"]
                build.update(compiled.graph_stats())
                build["compile_s"] = build["window_compile_s"] + max(
                    build["first_volume_s"] - row["sliding_window"]["median_s"], 0.0)
                clock.log(f"{mode.name}: compile time {build['compile_s']:.1f} s ({build['graphs']} graph(s), "
                          f"{build['graph_breaks']} graph break(s))")
    finally:
        del net
        remove(work.network)
        if mode.kind == "compile":
            compiled.release(work.device)
        if work.device.type == "cuda":
            torch.cuda.empty_cache()  # the start-up and end-to-end processes share this GPU
    clock.log(f"{mode.name}: network {row['network']['median_s'] * 1e3:.1f} ms at batch {work.batch_shape[0]}, "
              f"sliding window {row['sliding_window']['median_s']:.4g} s / volume")
    per_volume = [compare_outputs_to(o, r, lab, settings["hd95"]) for o, r, lab in
                  zip(outputs, reference or [None] * len(outputs), work.labels)]
    row["accuracy"] = {"vs_fp32": summarize_accuracy(per_volume, "vs_ref") if mode.name != "fp32" else None,
                       "vs_labels": summarize_accuracy(per_volume, "vs_labels")}
    if settings["skip_startup"]:
        row["startup"] = {"status": "skipped", "reason": "--skip_startup"}
    elif mode.kind == "eager":  # fp32's is measured after every mode (see run_modes)
        row["startup"] = {"status": "n/a", "reason": "eager start-up is measured once, in row fp32"}
    elif mode.kind == "compile":
        row["startup"] = {"status": "n/a", "reason": "not measured for torch.compile modes"}
    elif clock.over():
        row["startup"] = {"status": "skipped", "reason": clock.over()}
    else:
        row["startup"] = _startup(work, patch, Path(patch[0]["path"]), clock)
    if settings["skip_e2e"]:
        row["e2e"] = {"status": "skipped", "reason": "--skip_e2e"}
    elif clock.over():
        row["e2e"] = {"status": "skipped", "reason": clock.over()}
    else:
        row["e2e"] = _e2e(work, mode, out, patch, clock)
        if "wall_s" in row["e2e"]:
            clock.log(f"{mode.name}: end to end {row['e2e']['status']} in {row['e2e']['wall_s']:.1f} s")
    return row, outputs


def _startup(work: Workload, patch: Any, cache: Path | None, clock: Clock) -> dict[str, Any]:
    """First network output in a fresh process (engines from the cache when `patch` is given)."""
    before = _entry_count(cache) if cache is not None else 0
    env = {"MONAI_TRT_CACHE": str(cache)} if cache is not None else {}
    try:
        probe = startup_probe(work.startup, patch, work.batch_shape, env, clock.timeout())
    except Exception as err:  # recorded, the bench goes on
        return {"status": "error", "error": f"{type(err).__name__}: {err}"}
    result = {"status": "ok", **probe}
    if cache is not None:
        result["cache_hit"] = _entry_count(cache) == before
    clock.log(f"start-up ({'engines from cache' if patch else 'eager'}): first output after "
              f"{probe['first_output_s']:.1f} s")
    return result


def run_modes(work: Workload, modes: Sequence[Mode], out: Path, settings: dict[str, Any], clock: Clock,
              results: dict[str, Any]) -> None:
    """Run every mode into `results['modes']`, writing results.json after each (a cut-off run keeps what it has)."""
    reference: list[torch.Tensor] | None = None
    if not any(m.name == "fp32" for m in modes):
        clock.log("fp32 is not among --modes: computing the fp32 reference outputs (untimed)")
        with _torch_context(Mode("fp32", "eager", "fp32"), work.device):
            reference = [_first_tensor(work.infer(work.network, v.to(work.device))).detach().float().cpu()
                         for v in work.volumes]
    for mode in modes:
        if mode.skip or clock.over():
            reason = mode.skip or clock.over()
            results["modes"][mode.name] = {"mode": mode.name, "kind": mode.kind, "method": mode.method,
                                           "precision": mode.precision, "status": "skipped", "reason": reason}
            clock.log(f"{mode.name}: skipped: {reason}")
            continue
        clock.log(f"{mode.name}: start")
        start = time.perf_counter()
        try:
            row, outputs = _run_mode(work, mode, out, settings, reference, clock)
            row["status"] = "ok"
            if mode.name == "fp32":
                reference = outputs
        except Exception as err:  # one failing mode must not end the comparison
            row = {"mode": mode.name, "kind": mode.kind, "method": mode.method, "precision": mode.precision,
                   "status": "error", "error": f"{type(err).__name__}: {err}",
                   "traceback": traceback.format_exc(limit=8)}
            clock.log(f"{mode.name}: FAILED: {type(err).__name__}: {str(err)[:300]}")
            remove(work.network)
            if work.device.type == "cuda":
                torch.cuda.empty_cache()
        row["mode_wall_s"] = time.perf_counter() - start
        results["modes"][mode.name] = row
        write_json(results, out / "results.json")
    _eager_startup(work, settings, clock, results)
    write_json(results, out / "results.json")


def _eager_startup(work: Workload, settings: dict[str, Any], clock: Clock, results: dict[str, Any]) -> None:
    """Eager start-up, measured last (earlier fresh processes have warmed the OS file cache for it as for the engine
    probes), into row fp32; each engine row gets its overhead against it."""
    rows = [r for r in results["modes"].values() if r.get("status") == "ok"]
    if settings["skip_startup"] or not any(r["mode"] == "fp32" or r["kind"] == "engine" for r in rows):
        return
    if clock.over():
        results["startup_eager"] = {"status": "skipped", "reason": clock.over()}
        return
    eager = results["startup_eager"] = _startup(work, None, None, clock)
    for row in rows:
        if row["mode"] == "fp32":
            row["startup"] = eager
        elif eager.get("status") == "ok" and (row.get("startup") or {}).get("status") == "ok":
            row["startup"]["overhead_vs_eager_s"] = row["startup"]["first_output_s"] - eager["first_output_s"]
