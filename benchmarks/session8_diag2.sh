#!/usr/bin/env bash
# Session 8, device call 4: does loading an `aoti` package segfault unless onnx / onnxruntime were imported first?
# Builds the example UNet's engine (the build process may die at its load), then loads that package in fresh
# processes after importing: nothing, onnxruntime, onnx, both. Usage: bash benchmarks/session8_diag2.sh OUT
set -u
out=${1:?out dir}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 MONAI_TRT_CACHE=/tmp/diag2_cache
python3 - > "$out/build.log" 2>&1 <<'PY'
import torch, monai_trt
from monai.networks.nets import UNet
net = UNet(3, 1, 2, (16, 32, 64, 128), (2, 2, 2), num_res_units=2, norm="batch").eval().cuda()
monai_trt.apply(net, [{"method": "aoti", "precision": "fp16", "path": "/tmp/diag2_cache"}])
with torch.no_grad():
    net(torch.randn(4, 1, 64, 64, 64, device="cuda"))
print("served", monai_trt.wrappers(net)[""].calls)
PY
echo "build rc=$?" >> "$out/summary.txt"
pkg=$(ls /tmp/diag2_cache/entries/*/engine.pt2 | head -1)
for pre in none onnxruntime onnx "onnx,onnxruntime" torch_inductor_first; do
  python3 - "$pkg" "$pre" > "$out/load_$pre.log" 2>&1 <<'PY'
import sys, torch
pkg, pre = sys.argv[1], sys.argv[2]
if pre == "torch_inductor_first":
    import torch._inductor
else:
    for name in pre.split(","):
        if name != "none":
            __import__(name)
from monai_trt.backends.aoti import load_package
runner = load_package(pkg, 0)
out = runner(torch.randn(4, 1, 64, 64, 64, device="cuda", dtype=torch.float16))
print("ok", [tuple(o.shape) for o in out])
PY
  echo "load after importing $pre rc=$?" >> "$out/summary.txt"
done
cat "$out/summary.txt"
