#!/usr/bin/env bash
# Session 7, device call 2 (nvidia-h200), issue 16, after call 1 (session7_a.sh) found a third of W1's cold build in
# Inductor's CPU vector-ISA probe (now skipped for CUDA builds) and one-pass autotuning + no pointwise autotuning
# 20 s faster (now the defaults):
#   1. W1 bench with the default patch engine (cold Inductor cache) against eager fp32, AMP and torch.compile fp16,
#      alone on the machine: build time, s / volume, Dice.
#   2. Where a served call's time goes besides the engine, for the example bundle's UNet (and W1).
# all.tgz is rewritten after each step, so a run cut short keeps what it measured.
# Usage (repo root, wheels installed, PYTHONPATH set): bash benchmarks/session7_b.sh OUT
set -u
out=${1:?out dir}; mkdir -p "$out"
summary="$out/summary.txt"
pack() { (cd "$out" && find . -type f \( -name '*.json' -o -name '*.md' -o -name '*.txt' -o -name '*.log' \) \
  -size -12M -not -path '*/cache*' -not -path '*/inductor*' | tar czf all.tgz -T -); }
# bench keeps its engine caches under --out: it writes to /tmp, its results are copied into OUT
timeout 330 python3 -m monai_trt bench --workload w1 --out /tmp/bench_w1 --modes fp32,amp,aoti_fp16,compile_fp16 \
  --repeats 3 --warmup 1 --skip_startup --budget 300 > "$out/bench_w1.log" 2>&1
echo "bench w1 rc=$?" >> "$summary"; mkdir -p "$out/bench_w1"; cp /tmp/bench_w1/results.* "$out/bench_w1/"; pack
for n in spheres w1; do
  timeout 110 python3 benchmarks/call_overhead.py "$out/overhead" --network $n > "$out/overhead_$n.log" 2>&1
  echo "call_overhead $n rc=$?" >> "$summary"; pack
done
cat "$summary"
