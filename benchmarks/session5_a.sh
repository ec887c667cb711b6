#!/usr/bin/env bash
# Issue 16, build time and warm-process cost on an nvidia-h200-x2 (two jobs, one per GPU, at once):
#   GPU 0: W1 aoti engine built three ways, each in an empty Inductor cache, first call profiled;
#   GPU 1: the SwinUNETR bundle end to end (warm cache, patch on vs --trt False, profiled), then the spheres UNet
#          engine with the first lever (a small network: what is fixed cost).
# Usage (repo root, wheels installed, PYTHONPATH set): bash benchmarks/session5_a.sh OUT
set -u
out=${1:?out dir}; mkdir -p "$out"
( CUDA_VISIBLE_DEVICES=0 timeout 560 python3 benchmarks/aoti_levers.py "$out/levers_w1" --network w1 --calls 10 \
    --variants dynamic,dynamic+act,dynamic+act+o0 --fresh_inductor --profile --cache /tmp/c0 \
    > "$out/levers_w1.log" 2>&1; echo "levers_w1 rc=$?" >> "$out/rc.txt" ) &
( CUDA_VISIBLE_DEVICES=1 timeout 420 python3 benchmarks/bundles_e2e.py "$out/e2e" --bundles swin_unetr_btcv_segmentation \
    --repeats 2 --profile > "$out/e2e.log" 2>&1; echo "e2e rc=$?" >> "$out/rc.txt"
  CUDA_VISIBLE_DEVICES=1 timeout 130 python3 benchmarks/aoti_levers.py "$out/levers_spheres" --network spheres \
    --variants dynamic+act --fresh_inductor --profile --cache /tmp/c1 > "$out/levers_spheres.log" 2>&1
  echo "levers_spheres rc=$?" >> "$out/rc.txt" ) &
wait
cd "$out" && find . -type f \( -name '*.json' -o -name '*.md' -o -name '*.txt' -o -name '*.log' -o -name '*.jsonl' \) \
  -size -5M -not -path './e2e/cache/*' | tar czf all.tgz -T - && ls -la all.tgz && cat rc.txt
