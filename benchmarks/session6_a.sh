#!/usr/bin/env bash
# Session 6, device call 1 (nvidia-h200-x2): CUDA graphs for aoti engines, issues 16 and 18.
#   1. W1 one GPU vs two, every patched mode with and without `use_cuda_graph` (multi_gpu.py --cuda_graph), one
#      volume per mode traced; meanwhile, on GPU 1, the CUDA graph tests with real capture (tests/test_cuda_graph.py).
#   2. Then both bundles end to end, warm cache vs --trt False (SwinUNETR on GPU 0, the example bundle on GPU 1).
# Usage (repo root, wheels installed, PYTHONPATH set): bash benchmarks/session6_a.sh OUT
set -u
out=${1:?out dir}; mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
( CUDA_VISIBLE_DEVICES=1 timeout 280 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graph.py \
    > "$out/pytest_cuda_graph.log" 2>&1; echo "pytest cuda_graph rc=$?" >> "$out/rc.txt" ) &
timeout 300 python3 benchmarks/multi_gpu.py --out "$out/mg" --cache /tmp/mgcache --rounds 5 --cuda_graph --trace \
  --budget 230 > "$out/mg.log" 2>&1; echo "multi_gpu rc=$?" >> "$out/rc.txt"
wait
( CUDA_VISIBLE_DEVICES=0 timeout 255 python3 benchmarks/bundles_e2e.py "$out/e2e_swin" \
    --bundles swin_unetr_btcv_segmentation --repeats 3 > "$out/e2e_swin.log" 2>&1
  echo "e2e swin rc=$?" >> "$out/rc.txt" ) &
( CUDA_VISIBLE_DEVICES=1 timeout 255 python3 benchmarks/bundles_e2e.py "$out/e2e_spheres" \
    --bundles spheres_segmentation --repeats 3 > "$out/e2e_spheres.log" 2>&1
  echo "e2e spheres rc=$?" >> "$out/rc.txt" ) &
wait
cd "$out" && find . -type f \( -name '*.json' -o -name '*.md' -o -name '*.txt' -o -name '*.log' -o -name '*.jsonl' \
  -o -name '*.json.gz' \) -size -12M -not -path '*/cache/*' | tar czf all.tgz -T - && ls -la all.tgz && cat rc.txt
