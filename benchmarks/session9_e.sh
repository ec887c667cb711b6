#!/usr/bin/env bash
# Session 9, device call 5 (one H200, nothing else running), issue 16: the final code (prices keyed by parameter
# shapes and tied to their cache entry) on the example bundle end to end, 3 ABBA pairs, within the device time left.
# Usage (repo root, wheels installed, PYTHONPATH set): bash benchmarks/session9_e.sh OUT
set -u
out=${1:?out dir}
bash "$(dirname "$0")/session9_b.sh" "$out" spheres_segmentation 3 200
grep -h "monai_trt 'network'" "$out"/e2e/on_0.log "$out"/e2e/on_cold.log | cut -c1-260 >> "$out/summary.txt"
