#!/usr/bin/env bash
# Session 8, device call 1 (one H200, nothing else running), issue 16: the example bundle with the speed gate timing
# calls back to back and the served call's module-tree walk deferred behind the engine call.
#   1. the GPU tests of the per-call check, CUDA graphs and the speed gate;
#   2. the call-overhead breakdown of the example bundle's UNet (benchmarks/call_overhead.py);
#   3. its per-volume inferer time: eager fp32, AMP, the default patch's engine (bench, 20 repeats: a volume is ms);
#   4. the example bundle end to end, warm cache vs --trt False (benchmarks/bundles_e2e.py, median of 3).
# Usage (repo root, wheels installed, PYTHONPATH set): bash benchmarks/session8_a.sh OUT
set -u
out=${1:?out dir}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
summary="$out/summary.txt"
pack() { (cd "$out" && find . -type f \( -name '*.json' -o -name '*.md' -o -name '*.txt' -o -name '*.log' \
  -o -name '*.jsonl' \) -size -12M -not -path '*/cache*' | tar czf all.tgz -T -); }
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_module_check.py tests/test_cuda_graph.py \
  tests/test_speed_gate.py > "$out/pytest_gpu.log" 2>&1
echo "pytest gpu rc=$?" >> "$summary"; pack
timeout 90 python3 benchmarks/call_overhead.py "$out/overhead" --network spheres > "$out/overhead_spheres.log" 2>&1
echo "call_overhead spheres rc=$?" >> "$summary"; pack
timeout 120 python3 -m monai_trt bench --bundle_root bundles/spheres_segmentation --out /tmp/bench_spheres \
  --modes fp32,amp,aoti_fp16 --precisions fp16 --repeats 20 --warmup 5 --skip_e2e --skip_startup --budget 100 \
  > "$out/bench_spheres.log" 2>&1
echo "bench spheres rc=$?" >> "$summary"; mkdir -p "$out/bench_spheres"; cp /tmp/bench_spheres/results.* "$out/bench_spheres/"
pack
timeout 200 python3 benchmarks/bundles_e2e.py /tmp/e2e_spheres --bundles spheres_segmentation --repeats 3 \
  > "$out/e2e_spheres.log" 2>&1
echo "e2e spheres rc=$?" >> "$summary"
mkdir -p "$out/e2e_spheres"
cp /tmp/e2e_spheres/bundles_e2e.* /tmp/e2e_spheres/*/runs.jsonl /tmp/e2e_spheres/*/*.log "$out/e2e_spheres/" 2>/dev/null
pack; cat "$summary"
