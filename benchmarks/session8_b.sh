#!/usr/bin/env bash
# Session 8, device call 2 (one H200, nothing else running), issue 16: where the example bundle's warm run with the
# patch on spends the time it spends beyond `--trt False` (5 alternating pairs; each run's wall time split by its
# log's timestamps into before the first log line / logged / after; one more pair under py-spy, wall time).
# Usage (repo root, wheels installed into /tmp/site incl. py-spy, PYTHONPATH set): bash benchmarks/session8_b.sh OUT
set -u
out=${1:?out dir}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
timeout 400 python3 benchmarks/bundles_e2e.py /tmp/e2e_spheres --bundles spheres_segmentation --repeats 5 \
  --pyspy /tmp/site/bin/py-spy > "$out/e2e_spheres.log" 2>&1
echo "e2e spheres rc=$?" >> "$out/summary.txt"
for side in on off; do
  python3 benchmarks/pyspy_summary.py /tmp/e2e_spheres/spheres_segmentation/pyspy_$side.pyspy.txt --rate 200 --top 70 \
    > "$out/pyspy_$side.summary.txt" 2>&1
done
mkdir -p "$out/e2e_spheres"
cp /tmp/e2e_spheres/bundles_e2e.* /tmp/e2e_spheres/*/runs.jsonl /tmp/e2e_spheres/*/*.log "$out/e2e_spheres/" 2>/dev/null
(cd "$out" && find . -type f \( -name '*.json' -o -name '*.md' -o -name '*.txt' -o -name '*.log' -o -name '*.jsonl' \) \
  -size -12M | tar czf all.tgz -T -)
cat "$out/summary.txt"
