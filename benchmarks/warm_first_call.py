"""Where a warm process's first engine call goes: build the example UNet's engine (`auto`, the bundle's patch
entry, with the speed gate off so that the warm process takes the engine at once instead of renting PyTorch first)
in one process, then, in a fresh one, apply the patch and profile the first call (cProfile, GC off so that a
collection does not land in one function). Writes `<out>/warm_first_call.txt`.

Usage (repo root): python benchmarks/warm_first_call.py OUT [--device cuda]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import cProfile, gc, io, pstats, sys, time, torch
from monai.networks.nets import UNet
import monai_trt
cache, device, profile = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
torch.manual_seed(0)
net = UNet(3, 1, 2, (16, 32, 64, 128), (2, 2, 2), num_res_units=2, norm="batch").eval().to(device)
monai_trt.apply(net, [{"submodule": "", "precision": "auto", "dynamic_batchsize": [1, 4, 4], "path": cache,
                     "min_speedup": 0}])
x = torch.randn(4, 1, 64, 64, 64, device=device)
gc.disable()
prof = cProfile.Profile()
start = time.perf_counter()
with torch.no_grad():
    if profile:
        prof.enable()
    net(x)
    prof.disable()
    if device == "cuda":
        torch.cuda.synchronize()
print(f"first call {time.perf_counter() - start:.3f} s, served {monai_trt.wrappers(net)[''].calls}", flush=True)
if profile:
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(60)
    print(text.getvalue())
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cache = str(args.out / "cache")
    report = args.out / "warm_first_call.txt"
    for name, profile in (("cold (builds)", "0"), ("warm, profiled", "1")):
        done = subprocess.run([sys.executable, "-c", CHILD, cache, args.device, profile],
                              capture_output=True, text=True)
        with open(report, "a", encoding="utf-8") as handle:
            handle.write(f"== {name}: rc {done.returncode}\n{done.stdout}\n{done.stderr[-4000:]}\n")


if __name__ == "__main__":
    main()
