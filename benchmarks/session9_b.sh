#!/usr/bin/env bash
# Session 9, device call 2 (one H200, nothing else running), issue 16, rent before buy: a bundle end to end, warm
# cache vs --trt False, in ABBA pairs (benchmarks/bundles_e2e.py), and the remembered prices.
# Usage (repo root, wheels installed, PYTHONPATH set): bash benchmarks/session9_b.sh OUT BUNDLE PAIRS LIMIT_S
set -u
out=${1:?out dir}; bundle=${2:?bundle}; pairs=${3:?pairs}; limit=${4:?seconds}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
summary="$out/summary.txt"
pack() { (cd "$out" && find . -type f \( -name '*.json' -o -name '*.md' -o -name '*.txt' -o -name '*.log' \
  -o -name '*.jsonl' \) -size -12M -not -path '*/cache*' | tar czf all.tgz -T -); }
timeout "$limit" python3 benchmarks/bundles_e2e.py "/tmp/e2e_$bundle" --bundles "$bundle" --repeats "$pairs" \
  > "$out/e2e.log" 2>&1
echo "e2e $bundle rc=$?" >> "$summary"
mkdir -p "$out/e2e"
cp /tmp/e2e_$bundle/bundles_e2e.* /tmp/e2e_$bundle/*/runs.jsonl /tmp/e2e_$bundle/*/*.log "$out/e2e/" 2>/dev/null
cat /tmp/e2e_$bundle/cache/loads/*.json >> "$summary" 2>&1
pack; cat "$summary"; cat "$out/e2e/bundles_e2e.md"
