#!/usr/bin/env bash
# Session 7, device call 1 (nvidia-h200), issue 16: where a cold `aoti` build's wall time goes.
#   1. W1 (SwinUNETR fs48, fp16, [1, 8] window batch), today's default engine, empty Inductor/Triton cache,
#      under py-spy (wall-time samples of every thread, idle included) when py-spy can attach here.
#   2. The spheres UNet the same way: the fixed part of every build.
#   3. W1 with two build levers at once (`act`: autotune at compile time, `nopw`: no pointwise autotuning).
# all.tgz is rewritten after each step, so a run cut short keeps what it measured.
# Usage (repo root, wheels installed into /tmp/site incl. py-spy, PYTHONPATH set): bash benchmarks/session7_a.sh OUT
set -u
out=${1:?out dir}; mkdir -p "$out"
summary="$out/summary.txt"
pack() { (cd "$out" && find . -type f \( -name '*.json' -o -name '*.txt' -o -name '*.log' \) -size -12M \
  | tar czf all.tgz -T -); }
spy=/tmp/site/bin/py-spy
if "$spy" record --format raw -o /tmp/spy_probe.txt -- python3 -c "import time; time.sleep(0.3)" > /dev/null 2>&1; then
  echo "py-spy: attaches" >> "$summary"; use_spy=1
else
  echo "py-spy: cannot attach here, running unprofiled" >> "$summary"; use_spy=0
fi
profiled() {  # profiled NAME LIMIT_S command...
  local name=$1 limit=$2; shift 2
  if (( use_spy )); then
    # py-spy must start python itself; at the limit it gets SIGINT (writes its samples), then the child is killed
    timeout -s INT "$limit" "$spy" record --idle --threads --format raw --rate 20 -o "$out/$name.pyspy.txt" -- "$@" \
      > "$out/$name.log" 2>&1; rc=$?
    pkill -f aoti_levers.py
    python3 benchmarks/pyspy_summary.py "$out/$name.pyspy.txt" --top 90 > "$out/$name.pyspy_summary.txt" 2>&1
  else
    timeout "$limit" "$@" > "$out/$name.log" 2>&1; rc=$?
  fi
  echo "$name rc=$rc" >> "$summary"; pack
}
levers=(python3 benchmarks/aoti_levers.py --fresh_inductor --calls 10)
profiled w1_dynamic 240 "${levers[@]}" "$out/w1_dynamic" --network w1 --variants dynamic --cache /tmp/lc1
profiled spheres_dynamic 120 "${levers[@]}" "$out/spheres_dynamic" --network spheres --variants dynamic --cache /tmp/lc2
profiled w1_act_nopw 200 "${levers[@]}" "$out/w1_act_nopw" --network w1 --variants dynamic+act+nopw --cache /tmp/lc3
pack; cat "$summary"
