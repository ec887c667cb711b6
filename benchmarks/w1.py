"""Workload W1 (shared/FACTS.md): SwinUNETR(feature_size 48, 1→2), sliding window over 240×240×160, ROI 96³,
sw_batch 8, overlap 0.5 — eager baselines vs monai_trt engines, on one GPU.

Usage (GPU):  python benchmarks/w1.py --out results.json [--modes eager_fp32,eager_fp16,amp,aoti_fp16]
Medians over --reps timed volumes after --warmup untimed ones; CUDA synchronised around each volume.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import SwinUNETR

ROI, SW_BATCH, OVERLAP, SHAPE = (96, 96, 96), 8, 0.5, (240, 240, 160)


def make_net(device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return SwinUNETR(in_channels=1, out_channels=2, feature_size=48).to(device).eval()


def volume(device: torch.device) -> torch.Tensor:
    return torch.rand(1, 1, *SHAPE, generator=torch.Generator().manual_seed(1)).to(device)


def infer(net, vol, dtype=None, amp=False):
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=amp):
        x = vol if dtype is None else vol.to(dtype)
        return sliding_window_inference(x, ROI, SW_BATCH, net, overlap=OVERLAP)


def timed(fn, reps: int, warmup: int) -> tuple[float, list[float], torch.Tensor]:
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, out


def accuracy(out: torch.Tensor, ref: torch.Tensor) -> dict:
    out, ref = out.float(), ref.float()
    a, b = out.argmax(1), ref.argmax(1)
    inter = ((a == 1) & (b == 1)).sum().item()
    dice = 2 * inter / max((a == 1).sum().item() + (b == 1).sum().item(), 1)
    return {
        "argmax_agreement": (a == b).float().mean().item(),
        "dice_fg_vs_fp32": dice,
        "rel_l2": (torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref)).item(),
        "max_abs": (out - ref).abs().max().item(),
    }


STARTUP = r"""
import time, sys, json, torch
t0 = time.perf_counter()
sys.path.insert(0, {root!r})
from benchmarks.w1 import make_net, ROI
import monai_trt
dev = torch.device("cuda")
net = make_net(dev)
patch = {patch}
if patch:
    monai_trt.apply(net, patch)
x = torch.rand(8, 1, *ROI, device=dev)
with torch.inference_mode():
    y = net(x)
torch.cuda.synchronize()
print(json.dumps({{"seconds": time.perf_counter() - t0}}))
"""


def startup(patch: list | None, cache: str) -> dict:
    """Wall seconds from process start to the first network output in a fresh process, with its monai_trt log."""
    code = STARTUP.format(root=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), patch=repr(patch))
    env = {**os.environ, "MONAI_TRT_CACHE": cache}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    log = [line for line in done.stdout.splitlines() if "monai_trt" in line]
    return {"wall_s": wall, "in_process_s": json.loads(done.stdout.splitlines()[-1])["seconds"], "log": log}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="w1.json")
    parser.add_argument("--modes", default="eager_fp32,eager_tf32,eager_fp16,amp,aoti_fp16")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--startup", action="store_true", help="also time cache-hit start-up in fresh processes")
    args = parser.parse_args()
    import monai_trt

    dev = torch.device("cuda")
    vol = volume(dev)
    cache = os.environ.get("MONAI_TRT_CACHE") or tempfile.mkdtemp(prefix="w1-cache-")
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "workload": "W1", "modes": {}}
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    net = make_net(dev)
    ref = None
    for mode in args.modes.split(","):
        row: dict = {}
        torch.cuda.reset_peak_memory_stats()
        if mode.startswith("eager") or mode == "amp":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = mode == "eager_tf32"
            model = net.half() if mode == "eager_fp16" else net.float()
            dtype = torch.float16 if mode == "eager_fp16" else None
            median, times, out = timed(lambda: infer(model, vol, dtype, amp=mode == "amp"), args.reps, args.warmup)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
            net.float()
        else:
            method, precision = mode.split("_")
            model = make_net(dev)
            patch = [{"method": method, "precision": precision, "dynamic_batchsize": [1, SW_BATCH, SW_BATCH],
                      "path": cache, "fallback": False}]
            monai_trt.apply(model, patch)
            torch.cuda.synchronize()
            start = time.perf_counter()
            infer(model, vol)
            torch.cuda.synchronize()
            row["first_volume_s_incl_build"] = time.perf_counter() - start
            wrapper = monai_trt.wrappers(model)[""]
            (loaded,) = [e for v in wrapper.engines.values() for e in v]
            row["build_s"] = loaded.entry.meta.get("build_seconds")
            row["engine_bytes"] = sum(os.path.getsize(loaded.entry.path / n) for n in loaded.entry.meta["artifacts"])
            median, times, out = timed(lambda: infer(model, vol), args.reps, args.warmup)
            if args.startup:
                row["startup_eager"] = startup(None, cache)
                row["startup_cache_hit"] = startup(patch, cache)
        row.update(median_s=median, times_s=times, peak_mem_gb=torch.cuda.max_memory_allocated() / 1e9)
        if mode == "eager_fp32":
            ref = out.float()
        elif ref is not None:
            row["accuracy"] = accuracy(out, ref)
        results["modes"][mode] = row
        print(f"{mode:12s} {median:.3f} s/volume  " + json.dumps({k: v for k, v in row.items() if k not in ("times_s",)}),
              flush=True)
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
