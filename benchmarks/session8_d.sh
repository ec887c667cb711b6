#!/usr/bin/env bash
# Session 8, device call 6 (one H200, nothing else running), issue 16: the example bundle end to end with the aoti
# backend importing what a load needs on a background thread from `apply` on (warm cache vs --trt False, 3 pairs).
# That warm-up was reverted after this call: the load fell from 0.22 to 0.01 s, but the run did not get faster.
# Usage (repo root, wheels installed, PYTHONPATH set): bash benchmarks/session8_d.sh OUT
set -u
out=${1:?out dir}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
timeout 230 python3 benchmarks/bundles_e2e.py /tmp/e2e_spheres --bundles spheres_segmentation --repeats 3 \
  > "$out/e2e_spheres.log" 2>&1
echo "e2e spheres rc=$?" >> "$out/summary.txt"
mkdir -p "$out/e2e_spheres"
cp /tmp/e2e_spheres/bundles_e2e.* /tmp/e2e_spheres/*/runs.jsonl /tmp/e2e_spheres/*/*.log "$out/e2e_spheres/" 2>/dev/null
(cd "$out" && find . -type f \( -name '*.json' -o -name '*.md' -o -name '*.log' -o -name '*.jsonl' -o -name '*.txt' \) \
  -size -12M | tar czf all.tgz -T -)
cat "$out/summary.txt"
