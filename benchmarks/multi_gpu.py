"""Multi-GPU sliding window with the `devices` entry field (issue 17), on workload W1.

W1: SwinUNETR(feature_size 48, 1 -> 2), one 240x240x160 volume, ROI 96^3, overlap 0.5; patch `method aoti`,
`precision fp16`, `dynamic_batchsize [1, 8, 8]` (one cache entry serves every mode below: one build in all).

Modes (N = visible CUDA devices):
- `plain_sw8`      the patch without `devices`, sw_batch 8, one GPU (the reference for speed and Dice)
- `devices0_sw8`   `devices: [0]`, sw_batch 8: the split path's overhead on one GPU (target <= 3 %)
- `devicesN_sw8N`  `devices: [0..N-1]`, sw_batch 8*N: each window batch split 8+8(+...) across the GPUs (N > 1)
- `devicesN_sw8`   `devices: [0..N-1]`, sw_batch 8: each window batch split 4+4 (N = 2) (N > 1)
- `amp_sw8`        PyTorch under autocast fp16 (AMP), one GPU (context only; `--no_eager` leaves it out)
- `<mode>_graph`   with `--cuda_graph`: each patched mode again with `use_cuda_graph: true` (engine calls replay CUDA
                   graphs; the same cache entry)

Every mode has its own network object (same seeded weights), so the rounds interleave the modes: round r times
each mode once on each volume, and the medians are over rounds (>= 3, after `--warmup` untimed calls per mode, the
first of which builds or loads the engine). Outputs: `<out>/multi_gpu.json` and `<out>/multi_gpu.md` (rewritten
after every round: a run cut short keeps what it measured), with Dice (foreground of the argmax) and the largest
logit difference against `plain_sw8`.

Usage:
    python benchmarks/multi_gpu.py --out results/mg            # one or more GPUs: W1, < 9 minutes on an H200
    python benchmarks/multi_gpu.py --out /tmp/mg --quick       # smoke run: feature_size 12, small volume
    python benchmarks/multi_gpu.py --out /tmp/mg --quick --device cpu   # CPU smoke: onnxruntime fp32, "cpu"
                                                                        # replicas, 96x96x64 volume (4 windows)
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

W1 = {"feature_size": 48, "shape": [240, 240, 160], "roi": [96, 96, 96], "overlap": 0.5, "sw_batch": 8}
QUICK = {"feature_size": 12, "shape": [128, 128, 96], "roi": [64, 64, 64], "overlap": 0.5, "sw_batch": 8}
CPU_QUICK = {"feature_size": 12, "shape": [96, 96, 64], "roi": [64, 64, 64], "overlap": 0.5, "sw_batch": 4}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for multi_gpu.json / multi_gpu.md (and the cache)")
    parser.add_argument("--quick", action="store_true", help="feature_size 12, 128x128x96 volume, ROI 64^3 "
                        "(CPU: 96x96x64, sw_batch 4)")
    parser.add_argument("--feature_size", type=int, default=None)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--method", default=None, help="default: aoti on CUDA, onnxruntime on CPU")
    parser.add_argument("--precision", default=None, help="default: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (at least 3 are kept if time allows)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per mode before timing")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds: no new round starts after this")
    parser.add_argument("--cache", default=None, help="engine cache (default <out>/cache; reused across runs)")
    parser.add_argument("--no_eager", action="store_true", help="leave out the AMP context row")
    parser.add_argument("--modes", default=None, help="comma-separated subset of the mode names")
    parser.add_argument("--cuda_graph", action="store_true", help="add a `use_cuda_graph: true` twin of every "
                        "patched mode (<mode>_graph)")
    parser.add_argument("--trace", action="store_true", help="after the rounds, one volume per mode under "
                        "torch.profiler: <out>/trace_<mode>.json.gz (chrome trace) and .txt (top ops)")
    return parser.parse_args()


def settings(args: argparse.Namespace) -> dict[str, Any]:
    work = dict((CPU_QUICK if args.device == "cpu" else QUICK) if args.quick else W1)
    if args.feature_size:
        work["feature_size"] = args.feature_size
    return work


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        for index in range(torch.cuda.device_count()):
            torch.cuda.synchronize(index)


def plan(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """The modes to run: name, `devices` value (None: plain patch; "eager": no patch) and sw_batch."""
    sw = settings(args)["sw_batch"]
    if device.type == "cuda":
        count = torch.cuda.device_count()
        one, many = [0], list(range(count))
    else:  # two CPU replicas: the split/gather and thread path, no speed-up expected
        count, one, many = 2, ["cpu"], ["cpu", "cpu"]
    modes = [{"name": f"plain_sw{sw}", "devices": None, "sw_batch": sw},
             {"name": f"devices0_sw{sw}", "devices": one, "sw_batch": sw}]
    if count > 1:
        modes += [{"name": f"devices{count}_sw{sw * count}", "devices": many, "sw_batch": sw * count},
                  {"name": f"devices{count}_sw{sw}", "devices": many, "sw_batch": sw}]
    if args.cuda_graph:
        modes = [twin for m in modes for twin in (m, {**m, "name": f"{m['name']}_graph", "graph": True})]
    if not args.no_eager:
        modes.append({"name": f"amp_sw{sw}", "devices": "eager", "sw_batch": sw})
    if args.modes:
        wanted = [m.strip() for m in args.modes.split(",")]
        modes = [m for m in modes if m["name"] in wanted or m["name"] == f"plain_sw{sw}"]  # plain: the reference
    return modes


def dice(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a > 0, b > 0
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def main() -> None:
    args = parse_args()
    import monai
    from monai.inferers import SlidingWindowInferer
    from monai.networks.nets import SwinUNETR

    import monai_trt

    start_all = time.perf_counter()
    device = torch.device("cuda:0" if args.device == "cuda" else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --device cpu for the CPU smoke path")
    work = settings(args)
    method = args.method or ("aoti" if device.type == "cuda" else "onnxruntime")
    precision = args.precision or ("fp16" if device.type == "cuda" else "fp32")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = args.cache or str(out / "cache")
    sw = work["sw_batch"]
    patch = {"submodule": "", "method": method, "precision": precision, "path": cache,
             "dynamic_batchsize": [1, sw, sw], "fallback": False}

    torch.manual_seed(0)
    base = SwinUNETR(in_channels=1, out_channels=2, feature_size=work["feature_size"]).eval().to(device)
    volume = torch.rand(1, 1, *work["shape"], generator=torch.Generator().manual_seed(1)).to(device)
    modes = plan(args, device)
    nets: dict[str, torch.nn.Module] = {}
    for mode in modes:
        net = copy.deepcopy(base)
        if mode["devices"] != "eager":
            entry = dict(patch) if mode["devices"] is None else {**patch, "devices": mode["devices"]}
            entry["use_cuda_graph"] = bool(mode.get("graph"))
            monai_trt.apply(net, [entry])
        nets[mode["name"]] = net
        mode["inferer"] = SlidingWindowInferer(work["roi"], mode["sw_batch"], overlap=work["overlap"])

    def infer(mode: dict[str, Any]) -> torch.Tensor:
        net = nets[mode["name"]]
        with torch.inference_mode():
            if mode["devices"] == "eager":
                with torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16):
                    return mode["inferer"](volume, net)
            return mode["inferer"](volume, net)

    results: dict[str, Any] = {
        "workload": {**work, "method": method, "precision": precision, "patch": {**patch, "path": "<cache>"}},
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "cuda_devices": torch.cuda.device_count() if device.type == "cuda" else 0,
        "versions": {"torch": torch.__version__, "monai": monai.__version__, "monai_trt": monai_trt.__version__},
        "modes": {},
    }
    outputs: dict[str, torch.Tensor] = {}
    for mode in list(modes):  # warm-up: the first call of the first patched mode builds the engine, the rest load it
        row = results["modes"][mode["name"]] = {k: mode[k] for k in ("name", "devices", "sw_batch")}
        times = []
        try:
            for _ in range(max(args.warmup, 1)):
                sync(device)
                t0 = time.perf_counter()
                outputs[mode["name"]] = infer(mode).float().cpu()
                sync(device)
                times.append(time.perf_counter() - t0)
        except Exception as err:  # recorded; the other modes still run (the first one is the reference)
            if mode is modes[0]:
                raise
            row["error"] = f"{type(err).__name__}: {err}"
            modes.remove(mode)
            print(f"{mode['name']}: FAILED: {row['error'][:500]}", flush=True)
            continue
        row.update(first_call_s=round(times[0], 3), warmup_s=[round(t, 4) for t in times], samples_s=[])
        print(f"[{time.perf_counter() - start_all:6.1f} s] {mode['name']}: warm-up {times}", flush=True)
    quality(results, modes, outputs)  # the outputs of the last warm-up call: compared once, not every round
    write(out, results)
    rounds, round_s = 0, 0.0
    while rounds < args.rounds:
        elapsed = time.perf_counter() - start_all
        if rounds >= 3 and elapsed + round_s > args.budget:
            break
        if rounds < 3 and elapsed + round_s > args.budget + 60:
            print(f"budget: stopping after {rounds} rounds", flush=True)
            break
        t_round = time.perf_counter()
        for mode in modes:
            sync(device)
            t0 = time.perf_counter()
            infer(mode)
            sync(device)
            results["modes"][mode["name"]]["samples_s"].append(time.perf_counter() - t0)
        round_s = time.perf_counter() - t_round
        rounds += 1
        summarize(results, modes, nets)
        write(out, results)
        print(f"[{time.perf_counter() - start_all:6.1f} s] round {rounds}: " + ", ".join(
            f"{m['name']} {results['modes'][m['name']]['samples_s'][-1]:.3f}" for m in modes), flush=True)
    if args.trace:
        for mode in modes:
            trace(out, mode["name"], lambda m=mode: infer(m), device)
    results["wall_s"] = round(time.perf_counter() - start_all, 1)
    summarize(results, modes, nets)
    write(out, results)
    print((out / "multi_gpu.md").read_text())


def trace(out: Path, name: str, run: Any, device: torch.device) -> None:
    """One call of `run` under torch.profiler (host and, on CUDA, device timelines of every GPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        run()
        sync(device)
    raw = out / f"trace_{name}.json"
    prof.export_chrome_trace(str(raw))
    with open(raw, "rb") as source, gzip.open(f"{raw}.gz", "wb") as packed:
        shutil.copyfileobj(source, packed)
    raw.unlink()
    order = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=order, row_limit=30)
    (out / f"trace_{name}.txt").write_text(table + "\n" + prof.key_averages().table(
        sort_by="cpu_time_total", row_limit=30))


def quality(results: dict[str, Any], modes: list[dict[str, Any]], outputs: dict[str, torch.Tensor]) -> None:
    """Dice of the argmax, argmax agreement and largest logit difference of every mode against the first."""
    ref_out = outputs[modes[0]["name"]]
    ref_mask = ref_out.argmax(1)
    for mode in modes:
        row, got = results["modes"][mode["name"]], outputs[mode["name"]]
        mask = got.argmax(1)
        row["dice_vs_plain"] = dice(mask, ref_mask)
        row["argmax_agreement_vs_plain"] = float((mask == ref_mask).float().mean())
        row["max_abs_diff_vs_plain"] = float((got - ref_out).abs().max())


def summarize(results: dict[str, Any], modes: list[dict[str, Any]], nets: dict[str, Any]) -> None:
    import monai_trt

    ref_name = modes[0]["name"]
    ref_median = statistics.median(results["modes"][ref_name]["samples_s"] or [float("nan")])
    for mode in modes:
        row = results["modes"][mode["name"]]
        samples = row["samples_s"]
        row["median_s"] = statistics.median(samples) if samples else None
        row["rounds"] = len(samples)
        if row["median_s"] and ref_median == ref_median:
            row["vs_plain"] = row["median_s"] / ref_median
        wrapper = monai_trt.wrappers(nets[mode["name"]]).get("")
        if wrapper is not None:
            row["calls"] = dict(wrapper.calls)
            row["disabled"] = wrapper.disabled
            if wrapper.replicas is not None:
                row["calls_per_device"] = {k: dict(v) for k, v in wrapper.replicas.calls.items()}
                row["builds"] = wrapper.replicas.builds
            else:
                row["builds"] = wrapper.builds
            row["cuda_graphs"] = graph_counts(wrapper)


def graph_counts(wrapper: Any) -> dict[str, Any] | None:
    """Captures, replays and plain runs of the CUDA graphs of every engine serving `wrapper` (its replicas too)."""
    serving = [wrapper] + [w for _, w in (wrapper.replicas.replicas() if wrapper.replicas is not None else [])
                           if w is not wrapper]
    graphs = [getattr(e.engine, "graphs", None) for w in serving for engines in w.engine_set.by_layout.values()
              for e in engines]
    graphs = [g for g in graphs if g is not None]
    if not graphs:
        return None
    return {"engines": len(graphs), "captures": sum(g.captures for g in graphs),
            "replays": sum(g.replays for g in graphs), "plain": sum(g.plain for g in graphs),
            "refused": [g.refused for g in graphs if g.refused]}


def graph_cell(row: dict[str, Any]) -> str:
    counts = row.get("cuda_graphs")
    if not counts:
        return "-"
    cell = f"{counts['captures']} / {counts['replays']} / {counts['plain']}"
    return cell + (f" (off: {counts['refused'][0][:80]})" if counts["refused"] else "")


def write(out: Path, results: dict[str, Any]) -> None:
    (out / "multi_gpu.json").write_text(json.dumps(results, indent=1, default=str))
    work = results["workload"]
    lines = [
        f"# devices (issue 17) on {results['device']} x{results['cuda_devices']}",
        "",
        f"SwinUNETR(feature_size {work['feature_size']}), volume {work['shape']}, ROI {work['roi']}, overlap "
        f"{work['overlap']}; patch {work['method']} {work['precision']}, dynamic_batchsize "
        f"{work['patch']['dynamic_batchsize']}; torch {results['versions']['torch']}, monai "
        f"{results['versions']['monai']}. Median of interleaved rounds after warm-up; reference: the first row.",
        "",
        "| mode | devices | sw_batch | rounds | median s / volume | vs first row | first call s | Dice vs first | "
        "max abs diff | shares engine / pytorch | CUDA graph captures / replays / plain |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["modes"].values():
        if "error" in row:
            lines.append(f"| {row['name']} | {row['devices']} | {row['sw_batch']} | error: {row['error'][:200]} |")
            continue
        calls, median, ratio = row.get("calls"), row.get("median_s"), row.get("vs_plain")
        cells = [row["name"], str(row["devices"]), str(row["sw_batch"]), str(row.get("rounds", 0)),
                 "n/a" if median is None else f"{median:.4f}", "n/a" if ratio is None else f"{ratio:.3f}",
                 f"{row['first_call_s']:.1f}", f"{row.get('dice_vs_plain', float('nan')):.4f}",
                 f"{row.get('max_abs_diff_vs_plain', float('nan')):.2e}",
                 "eager" if calls is None else f"{calls['engine']} / {calls['pytorch']}", graph_cell(row)]
        lines.append("| " + " | ".join(cells) + " |")
    if "wall_s" in results:
        lines += ["", f"Wall time {results['wall_s']} s."]
    (out / "multi_gpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
