#!/usr/bin/env bash
# Session 8, device call 3: why the example bundle's runs with the patch on died with SIGSEGV in call 2 (after the
# `auto chose 'aoti'` line), with Python's fault handler on: a cold run, a warm run, and warm runs with onnxruntime /
# onnx imported first (monai_trt imported both eagerly until this session, and call 1's runs all ended with rc 0).
# Usage (repo root, wheels installed, PYTHONPATH set): bash benchmarks/session8_diag.sh OUT
set -u
out=${1:?out dir}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 MONAI_TRT_CACHE=/tmp/diag_cache
b=bundles/spheres_segmentation
echo '{"+imports": ["$import onnxruntime"]}' > /tmp/pre_ort.json
echo '{"+imports": ["$import onnx"]}' > /tmp/pre_onnx.json
one() {  # one NAME [extra config file]
  local files="'$b/configs/inference.json','$b/configs/inference_trt.json'"
  [ -n "${2:-}" ] && files="'$2',$files"
  timeout 120 python3 -m monai.bundle run --config_file "[$files]" --bundle_root $b --output_dir /tmp/diag_$1 \
    > "$out/$1.log" 2>&1
  echo "$1 rc=$?" >> "$out/summary.txt"
}
one cold; one warm; one warm_pre_ort /tmp/pre_ort.json; one warm_pre_onnx /tmp/pre_onnx.json; one warm_again
cat "$out/summary.txt"
