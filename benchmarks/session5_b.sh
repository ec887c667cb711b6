#!/usr/bin/env bash
# Issue 16, where a cold aoti build's time goes, one process per build, nothing else running: the spheres UNet twice
# (is the fixed cost per process or per machine?), then W1 with the default patch. Raw profiles kept (.pstats).
# Usage (repo root, wheels installed, PYTHONPATH set): bash benchmarks/session5_b.sh OUT
set -u
out=${1:?out dir}; mkdir -p "$out"
for run in spheres_1 spheres_2; do
  CUDA_VISIBLE_DEVICES=0 timeout 150 python3 benchmarks/aoti_levers.py "$out/$run" --network spheres --calls 5 \
    --variants dynamic --fresh_inductor --profile --cache "/tmp/$run" > "$out/$run.log" 2>&1; echo "$run rc=$?" >> "$out/rc.txt"
done
CUDA_VISIBLE_DEVICES=0 timeout 260 python3 benchmarks/aoti_levers.py "$out/w1" --network w1 --calls 5 \
  --variants dynamic --fresh_inductor --profile --cache /tmp/w1 > "$out/w1.log" 2>&1; echo "w1 rc=$?" >> "$out/rc.txt"
cd "$out" && find . -type f \( -name '*.json' -o -name '*.txt' -o -name '*.log' -o -name '*.pstats' \) -size -20M \
  | tar czf all.tgz -T - && ls -la all.tgz && cat rc.txt
