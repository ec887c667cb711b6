"""What moves an `aoti` engine's speed and build time (issue 16): one network, several engine variants, each built in
its own cache through `monai_trt.apply`, then timed per call. Also times eager fp16 with and without
`cudnn.benchmark`, and (`--graph_replay`) a CUDA-graph replay of each engine's call.

Variants (`--variants`, comma separated):
- `dynamic`: dim 0 over [1, B] (the default profile): Inductor skips its channels-last layout pass for dynamic convs.
- `static`: dim 0 fixed at B (`dynamic_batchsize` [B, B, B]).
- `dynamic_forced`: dim 0 over [1, B] with Inductor's `force_layout_optimization`.
- `<variant>_noattn`: the same without the attention rewrite (`export_args: {fuse_attention: false}`).
- `<variant>+<lever>[+<lever>...]`: the same with Inductor options added to `build_args.inductor_configs`
  (levers: see `LEVERS`), e.g. `dynamic+act+o0`.

`--fresh_inductor` builds each variant in an empty Inductor/Triton cache (cold build times); `--profile` writes a
cProfile summary of each variant's first call (export + build + validation) to `<out>/profile_<variant>.txt`. Each
variant's row also has Inductor's own section timers (`inductor_phases_s`); for wall time without cProfile's
overhead, run the script under `py-spy record --idle --threads --format raw` and read it with
`benchmarks/pyspy_summary.py`.

Build time is split into torch.export and AOTInductor compile by timing those two calls.

Usage (GPU, repo root): python benchmarks/aoti_levers.py OUT [--network w1|spheres] [--variants ...] [--calls 20]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import importlib
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import monai_trt  # noqa: E402
from monai_trt.bench.compiled import fresh_inductor_cache  # noqa: E402

PHASES: dict[str, float] = {}
LEVERS: dict[str, dict[str, Any]] = {
    "act": {"triton.autotune_at_compile_time": True},  # one codegen pass instead of a Python pass + a C++ pass
    "o0": {"aot_inductor.compile_wrapper_opt_level": "O0"},  # the C++ wrapper compiled without optimisation
    "nopw": {"triton.autotune_pointwise": False},  # pointwise kernels take a heuristic config, no benchmarking
    "nofreeze": {"freezing": False},  # weights stay graph inputs: no constant folding at build
}


def _timed(owner: Any, name: str, phase: str) -> None:
    inner = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            PHASES[phase] = PHASES.get(phase, 0.0) + time.perf_counter() - start

    setattr(owner, name, wrapper)


def network(name: str) -> tuple[torch.nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    if name == "w1":
        from monai.networks.nets import SwinUNETR

        return SwinUNETR(in_channels=1, out_channels=2, feature_size=48, spatial_dims=3), (8, 1, 96, 96, 96)
    from monai.networks.nets import UNet

    net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128), strides=(2, 2, 2),
               num_res_units=2, norm="batch")
    return net, (4, 1, 64, 64, 64)


def inductor_phases(threshold_s: float = 0.5) -> dict[str, float]:
    """Inductor's own timers (`dynamo_timed` sections) that took at least `threshold_s`, summed per section."""
    totals = {k: sum(v) for k, v in torch._dynamo.utils.compilation_time_metrics.items()}
    return {k: round(v, 1) for k, v in sorted(totals.items(), key=lambda kv: -kv[1]) if v >= threshold_s}


def per_call_ms(fn: Callable[[], Any], calls: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e3, 2)


def graph_replay_ms(engine: Any, inputs: list[torch.Tensor], calls: int) -> float | str:
    """The engine's call captured once in a CUDA graph, then replayed."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                engine(inputs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            engine(inputs)
        return per_call_ms(graph.replay, calls)
    except Exception as err:  # noqa: BLE001 - a measurement script: report why
        return f"failed: {type(err).__name__}: {str(err)[:200]}"


def variant_entry(variant: str, batch: int, cache: Path) -> dict[str, Any]:
    entry: dict[str, Any] = {"submodule": "", "method": "aoti", "precision": "fp16", "min_speedup": 0,
                             "path": str(cache / variant)}
    variant, *levers = variant.split("+")
    configs: dict[str, Any] = {}
    for lever in levers:
        configs.update(LEVERS[lever])
    if variant.startswith("static"):
        entry["dynamic_batchsize"] = [batch, batch, batch]
    if variant.endswith("_noattn"):
        entry["export_args"] = {"fuse_attention": False}
    if variant == "dynamic_forced":
        configs["force_layout_optimization"] = True
    if configs:
        entry["build_args"] = {"inductor_configs": configs}
    return entry


def profiled(out: Path | None) -> contextlib.AbstractContextManager:
    """cProfile the block and write its top functions (cumulative and own time) to `out`; no-op for None."""
    if out is None:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def run() -> Iterator[None]:
        profile = cProfile.Profile()
        profile.enable()
        try:
            yield
        finally:
            profile.disable()
            text = io.StringIO()
            stats = pstats.Stats(profile, stream=text)
            stats.sort_stats("cumulative").print_stats(70)
            stats.sort_stats("tottime").print_stats(30)
            stats.print_callers("check_call|waitpid|run_compile_cmd|_filelock.py|time.sleep")
            out.write_text(text.getvalue())
            profile.dump_stats(str(out.with_suffix(".pstats")))

    return run()


def measure_variant(
    variant: str, name: str, x: torch.Tensor, reference: torch.Tensor, cache: Path, calls: int, graph_replay: bool,
    profile: Path | None = None,
) -> dict[str, Any]:
    """Build one variant's engine in its own cache (first call) and time it."""
    torch.manual_seed(0)
    net, shape = network(name)
    net = net.cuda().eval()
    monai_trt.apply(net, [variant_entry(variant, shape[0], cache)], name=variant)
    wrapper = monai_trt.wrappers(net)[""]
    PHASES.clear()
    torch._dynamo.utils.compilation_time_metrics.clear()
    row: dict[str, Any] = {}
    with torch.inference_mode():
        start = time.perf_counter()
        with profiled(profile):
            first = net(x)
            torch.cuda.synchronize()
        row["first_call_s"] = round(time.perf_counter() - start, 1)
        row["phases_s"] = {k: round(v, 1) for k, v in PHASES.items()}
        row["inductor_phases_s"] = inductor_phases()
        row["max_abs_err_vs_fp32"] = float((first.float() - reference).abs().max())
        runs = [net(x).float() for _ in range(10)]  # same input: an engine must answer the same every time
        row["nonfinite_runs_of_10"] = sum(int(not bool(torch.isfinite(r).all())) for r in runs)
        row["max_run_to_run_diff"] = max(float((r - runs[0]).abs().max()) for r in runs)
        for bench in (False, True):
            torch.backends.cudnn.benchmark = bench
            row[f"engine_ms_cudnn_benchmark_{bench}"] = per_call_ms(lambda: net(x), calls)
        loaded = next(e for engines in wrapper.engines.values() for e in engines)
        inputs = [x.half()]
        row["engine_only_ms"] = per_call_ms(lambda: loaded.engine(inputs), calls)
        if graph_replay:  # opt-in: a failed capture leaves CUDA state that breaks later builds in this process
            row["graph_replay_ms"] = graph_replay_ms(loaded.engine, inputs, calls)
        torch.backends.cudnn.benchmark = False
        small = x[: shape[0] // 2 + 1]
        try:
            row["smaller_batch_ms"] = per_call_ms(lambda: net(small), calls)
        except Exception as err:  # noqa: BLE001 - a measurement script: report why
            row["smaller_batch_ms"] = f"failed: {err}"
    row["calls"] = dict(wrapper.calls)
    monai_trt.remove(net)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--network", default="w1", choices=("w1", "spheres"))
    parser.add_argument("--variants", default="static,dynamic,dynamic_forced")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--cache", default="/tmp/levers_cache")
    parser.add_argument("--graph_replay", action="store_true", help="also time a CUDA-graph replay of each engine")
    parser.add_argument("--fresh_inductor", action="store_true", help="build each variant in an empty Inductor cache")
    parser.add_argument("--profile", action="store_true", help="cProfile each variant's first call")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"network": args.network, "torch": torch.__version__,
                               "gpu": torch.cuda.get_device_name(0), "variants": {}}
    _timed(torch.export, "export", "torch.export")
    _timed(importlib.import_module("torch._inductor"), "aoti_compile_and_package", "aoti_compile_and_package")

    net, shape = network(args.network)
    net = net.cuda().eval()
    x = torch.randn(*shape, device="cuda")
    with torch.inference_mode():
        reference = net(x).float()
        half = net.half()
        for bench in (False, True):
            torch.backends.cudnn.benchmark = bench
            results[f"eager_fp16_ms_cudnn_benchmark_{bench}"] = per_call_ms(lambda: half(x.half()), args.calls)
        torch.backends.cudnn.benchmark = False
        net.float()
    print(json.dumps(results), flush=True)

    for variant in args.variants.split(","):
        inductor = fresh_inductor_cache(out / "inductor" / variant) if args.fresh_inductor else contextlib.nullcontext()
        with inductor:
            row = measure_variant(variant, args.network, x, reference, Path(args.cache), args.calls,
                                  args.graph_replay, out / f"profile_{variant}.txt" if args.profile else None)
        row["fresh_inductor_cache"] = args.fresh_inductor
        results["variants"][variant] = row
        print(variant, json.dumps(row), flush=True)
        torch.cuda.empty_cache()
    (out / f"levers_{args.network}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
