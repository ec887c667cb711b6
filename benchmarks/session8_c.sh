#!/usr/bin/env bash
# Session 8, device call 5 (one H200, nothing else running), issue 16, the final code: aoti loads import onnxruntime
# first (calls 2-4: without it every load died with SIGSEGV on this machine), the speed gate times calls back to back.
#   1. the example bundle end to end, warm cache vs --trt False, 5 alternating pairs (benchmarks/bundles_e2e.py);
#   2. its per-volume inferer time: eager fp32, AMP, the default patch's engine (bench, 20 repeats);
#   3. the SwinUNETR bundle's per-volume inferer time (bench, 3 repeats), as in session 7.
# Usage (repo root, wheels installed, PYTHONPATH set): bash benchmarks/session8_c.sh OUT
set -u
out=${1:?out dir}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
summary="$out/summary.txt"
pack() { (cd "$out" && find . -type f \( -name '*.json' -o -name '*.md' -o -name '*.txt' -o -name '*.log' \
  -o -name '*.jsonl' \) -size -12M -not -path '*/cache*' | tar czf all.tgz -T -); }
bench() {  # bench NAME BUNDLE REPEATS WARMUP LIMIT
  timeout "$5" python3 -m monai_trt bench --bundle_root "bundles/$2" --out "/tmp/bench_$1" --modes fp32,amp,aoti_fp16 \
    --precisions fp16 --repeats "$3" --warmup "$4" --skip_e2e --skip_startup --budget $(( $5 - 20 )) \
    > "$out/bench_$1.log" 2>&1
  echo "bench $1 rc=$?" >> "$summary"; mkdir -p "$out/bench_$1"; cp /tmp/bench_$1/results.* "$out/bench_$1/"; pack
}
timeout 260 python3 benchmarks/bundles_e2e.py /tmp/e2e_spheres --bundles spheres_segmentation --repeats 5 \
  > "$out/e2e_spheres.log" 2>&1
echo "e2e spheres rc=$?" >> "$summary"
mkdir -p "$out/e2e_spheres"
cp /tmp/e2e_spheres/bundles_e2e.* /tmp/e2e_spheres/*/runs.jsonl /tmp/e2e_spheres/*/*.log "$out/e2e_spheres/" 2>/dev/null
pack
bench spheres spheres_segmentation 20 5 70
bench swin swin_unetr_btcv_segmentation 3 1 190
pack; cat "$summary"
