#!/usr/bin/env bash
# Session 6, device call 2 (nvidia-h200-x2), after call 1 (session6_a.sh) showed the copies' captures failing on
# cuda:1 (fixed: capture stream on the engine's device) and CUDA graphs became the default for aoti engines.
#   1. W1 one GPU vs two, with and without CUDA graphs (multi_gpu.py --cuda_graph), one volume per mode traced;
#      meanwhile the CUDA graph tests with real capture, both GPUs visible (tests/test_cuda_graph.py).
#   2. Both bundles end to end, warm cache vs --trt False, defaults (graphs on): SwinUNETR on GPU 0, example on GPU 1.
# Usage (repo root, wheels installed, PYTHONPATH set): bash benchmarks/session6_b.sh OUT
set -u
out=${1:?out dir}; mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
( timeout 230 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graph.py > "$out/pytest_cuda_graph.log" 2>&1
  echo "pytest cuda_graph rc=$?" >> "$out/rc.txt" ) &
timeout 235 python3 benchmarks/multi_gpu.py --out "$out/mg" --cache /tmp/mgcache --rounds 5 --cuda_graph --trace \
  --budget 185 --modes plain_sw8_graph,devices2_sw16,devices2_sw16_graph,devices2_sw8,devices2_sw8_graph,amp_sw8 \
  > "$out/mg.log" 2>&1; echo "multi_gpu rc=$?" >> "$out/rc.txt"
wait
( CUDA_VISIBLE_DEVICES=0 timeout 330 python3 benchmarks/bundles_e2e.py "$out/e2e_swin" \
    --bundles swin_unetr_btcv_segmentation --repeats 3 > "$out/e2e_swin.log" 2>&1
  echo "e2e swin rc=$?" >> "$out/rc.txt" ) &
( CUDA_VISIBLE_DEVICES=1 timeout 330 python3 benchmarks/bundles_e2e.py "$out/e2e_spheres" \
    --bundles spheres_segmentation --repeats 3 > "$out/e2e_spheres.log" 2>&1
  echo "e2e spheres rc=$?" >> "$out/rc.txt" ) &
wait
cd "$out" && find . -type f \( -name '*.json' -o -name '*.md' -o -name '*.txt' -o -name '*.log' -o -name '*.jsonl' \
  -o -name '*.json.gz' \) -size -12M -not -path '*/cache/*' | tar czf all.tgz -T - && ls -la all.tgz && cat rc.txt
