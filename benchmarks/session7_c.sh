#!/usr/bin/env bash
# Session 7, device call 3 (nvidia-h200-x2), issue 16, with this session's build defaults and the module check's
# CUDA part replayed as a graph:
#   GPU 0: the SwinUNETR bundle end to end (warm cache vs --trt False, median of 3, bundles_e2e.py), then its
#          per-volume inferer time: eager fp32, AMP, the default patch's engine (bench).
#   GPU 1: the GPU tests of this session's code (module check graphs, aoti ISA skip, CUDA graphs), the call-overhead
#          breakdown of the example bundle's UNet, the example bundle end to end, then its per-volume bench.
# The two GPUs share 32 CPU cores: e2e on/off runs alternate, so contention hits both alike.
# Usage (repo root, wheels installed, PYTHONPATH set): bash benchmarks/session7_c.sh OUT
set -u
out=${1:?out dir}; mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
summary="$out/summary.txt"
pack() { (cd "$out" && find . -type f \( -name '*.json' -o -name '*.md' -o -name '*.txt' -o -name '*.log' \
  -o -name '*.jsonl' \) -size -12M -not -path '*/cache*' | tar czf all.tgz -T -); }
bench() {  # bench NAME BUNDLE MODES LIMIT: per-volume medians, no end-to-end runs (bundles_e2e.py does those)
  timeout "$4" python3 -m monai_trt bench --bundle_root "bundles/$2" --out "/tmp/bench_$1" --modes "$3" \
    --precisions fp16 --repeats 3 --warmup 1 --skip_e2e --skip_startup --budget $(( $4 - 30 )) > "$out/bench_$1.log" 2>&1
  echo "bench $1 rc=$?" >> "$summary"; mkdir -p "$out/bench_$1"; cp /tmp/bench_$1/results.* "$out/bench_$1/"; pack
}
(
  export CUDA_VISIBLE_DEVICES=0
  timeout 330 python3 benchmarks/bundles_e2e.py /tmp/e2e_swin --bundles swin_unetr_btcv_segmentation --repeats 3 \
    > "$out/e2e_swin.log" 2>&1
  echo "e2e swin rc=$?" >> "$summary"
  mkdir -p "$out/e2e_swin"; cp /tmp/e2e_swin/bundles_e2e.* /tmp/e2e_swin/*/runs.jsonl /tmp/e2e_swin/*/*.log "$out/e2e_swin/" 2>/dev/null; pack
  bench swin swin_unetr_btcv_segmentation fp32,amp,aoti_fp16 170
) &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_module_check.py tests/test_aoti_isa.py \
    tests/test_cuda_graph.py > "$out/pytest_gpu.log" 2>&1
  echo "pytest gpu rc=$?" >> "$summary"; pack
  timeout 70 python3 benchmarks/call_overhead.py "$out/overhead" --network spheres > "$out/overhead_spheres.log" 2>&1
  echo "call_overhead spheres rc=$?" >> "$summary"; pack
  timeout 220 python3 benchmarks/bundles_e2e.py /tmp/e2e_spheres --bundles spheres_segmentation --repeats 3 \
    > "$out/e2e_spheres.log" 2>&1
  echo "e2e spheres rc=$?" >> "$summary"
  mkdir -p "$out/e2e_spheres"; cp /tmp/e2e_spheres/bundles_e2e.* /tmp/e2e_spheres/*/runs.jsonl /tmp/e2e_spheres/*/*.log "$out/e2e_spheres/" \
    2>/dev/null; pack
  bench spheres spheres_segmentation fp32,amp,aoti_fp16 100
) &
wait
pack; cat "$summary"
