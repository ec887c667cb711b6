#!/usr/bin/env bash
# Session 9, device call 1 (one H200, nothing else running), issue 16: rent before buy (runtime/rent.py).
#   1. where a warm process's first engine call goes when it takes the engine at once (key vs load; gate off);
#   2. the example bundle end to end, warm cache vs --trt False, 7 alternating pairs (benchmarks/bundles_e2e.py):
#      warm runs now rent PyTorch until the engine would have paid for taking it.
# Usage (repo root, wheels installed, PYTHONPATH set): bash benchmarks/session9_a.sh OUT
set -u
out=${1:?out dir}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
summary="$out/summary.txt"
pack() { (cd "$out" && find . -type f \( -name '*.json' -o -name '*.md' -o -name '*.txt' -o -name '*.log' \
  -o -name '*.jsonl' \) -size -12M -not -path '*/cache*' | tar czf all.tgz -T -); }
timeout 100 python3 benchmarks/warm_first_call.py "$out/warm" --device cuda > "$out/warm.log" 2>&1
echo "warm_first_call rc=$?" >> "$summary"; pack
timeout 330 python3 benchmarks/bundles_e2e.py /tmp/e2e_spheres --bundles spheres_segmentation --repeats 7 \
  > "$out/e2e_spheres.log" 2>&1
echo "e2e spheres rc=$?" >> "$summary"
mkdir -p "$out/e2e_spheres"
cp /tmp/e2e_spheres/bundles_e2e.* /tmp/e2e_spheres/*/runs.jsonl /tmp/e2e_spheres/*/*.log "$out/e2e_spheres/" 2>/dev/null
ls /tmp/e2e_spheres/cache/loads >> "$summary" 2>&1; cat /tmp/e2e_spheres/cache/loads/*.json >> "$summary" 2>&1
pack; cat "$summary"
