"""Build time vs refit time (issue 4) for the example bundle's UNet and for SwinUNETR, with `refit: refit`.

For each network: the first call builds a weight-less engine (timed); a second checkpoint of the same architecture
is loaded in place and the next call refits the engine (timed, no build); a fresh process then reuses the cached
entry with a third checkpoint (cache hit + refit, timed from the log). Outputs are compared with PyTorch each time.

Usage (GPU): python benchmarks/refit_timing.py --out refit.json [--method aoti] [--precision fp16]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def networks() -> dict:
    from monai.networks.nets import SwinUNETR, UNet

    return {
        "spheres_unet": (lambda: UNet(3, 1, 2, (16, 32, 64, 128), (2, 2, 2), num_res_units=2), (4, 1, 64, 64, 64)),
        "swin_unetr": (lambda: SwinUNETR(in_channels=1, out_channels=2, feature_size=48), (8, 1, 96, 96, 96)),
    }


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed_call(net: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        out = net(x)
    sync()
    return out, time.perf_counter() - start


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def run_one(name: str, method: str, precision: str, seed: int, cache: str) -> dict:
    import monai_trt

    make, shape = networks()[name]
    torch.manual_seed(0)
    net = make().eval().to(DEVICE)
    torch.manual_seed(seed)
    net.load_state_dict(make().state_dict())
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        reference = net(x)
    os.environ["MONAI_TRT_CACHE"] = cache
    monai_trt.apply(net, [{"method": method, "precision": precision, "refit": "refit",
                           "dynamic_batchsize": [1, shape[0], shape[0]]}])
    out, first = timed_call(net, x)
    (wrapper,) = monai_trt.wrappers(net).values()
    result = {"network": name, "seed": seed, "first_call_s": round(first, 2), "builds": wrapper.builds,
              "rel_l2_vs_fp32": rel_l2(out, reference), "disabled": wrapper.disabled}
    if wrapper.builds:  # same process: swap the checkpoint, time the refit
        torch.manual_seed(seed + 100)
        net.load_state_dict(make().state_dict())
        plain = copy.deepcopy(net)
        monai_trt.remove(plain)
        with torch.no_grad():
            reference = plain(x)
        out, refit_call = timed_call(net, x)
        _, steady = timed_call(net, x)
        result.update(swap_call_s=round(refit_call, 3), steady_call_s=round(steady, 4),
                      swap_rel_l2_vs_fp32=rel_l2(out, reference), builds_after_swap=wrapper.builds)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--method", default="aoti")
    parser.add_argument("--precision", default="fp16")
    parser.add_argument("--networks", default="spheres_unet,swin_unetr")
    parser.add_argument("--child", default="")
    args = parser.parse_args()
    if args.child:  # a fresh process that must reuse the entry: cache hit + refit with other weights
        name, seed, cache = args.child.split(",")
        print("RESULT " + json.dumps(run_one(name, args.method, args.precision, int(seed), cache)), flush=True)
        return
    results = []
    for name in args.networks.split(","):
        cache = tempfile.mkdtemp(prefix=f"refit-{name}-")
        cmd = [sys.executable, __file__, "--out", "-", "--method", args.method, "--precision", args.precision]
        for role, seed in (("build", 1), ("fresh_process", 2)):
            start = time.perf_counter()
            done = subprocess.run(cmd + ["--child", f"{name},{seed},{cache}"], capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            row = json.loads(lines[-1][7:]) if lines else {"network": name, "error": done.stderr[-2000:]}
            row.update(role=role, process_wall_s=round(time.perf_counter() - start, 1),
                       log=[line for line in done.stdout.splitlines() if "monai_trt" in line][-6:])
            results.append(row)
            print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        device = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
        json.dump({"device": device, "torch": torch.__version__, "method": args.method,
                   "precision": args.precision, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
