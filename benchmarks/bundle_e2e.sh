#!/usr/bin/env bash
# End-to-end example bundle on one machine: patch on (cold cache: build), on again (cache hit), off; wall time each.
# Usage: bash benchmarks/bundle_e2e.sh OUT_DIR [extra monai.bundle args...]
set -euo pipefail
out=${1:?out dir}; shift
b=bundles/spheres_segmentation
cfg="['$b/configs/inference.json','$b/configs/inference_trt.json']"
export MONAI_TRT_CACHE=$out/cache
common=(--bundle_root "$b" --dataset_dir "$out/data" "$@")
python3 -m monai.bundle run --config_file "['$b/configs/inference.json']" "${common[@]}" --output_dir "$out/warm" >/dev/null 2>&1  # data + imports warm
for run in on_cold on_cache off; do
  flag=True; [ "$run" = off ] && flag=False
  start=$(date +%s.%N)
  python3 -m monai.bundle run --config_file "$cfg" "${common[@]}" --output_dir "$out/$run" --trt $flag > "$out/$run.log" 2>&1
  end=$(date +%s.%N)
  dice=$(grep -o "val_mean_dice: [0-9.]*" "$out/$run.log" | tail -1)
  printf '%-9s wall %6.1f s  %s\n' "$run" "$(python3 -c "print($end - $start)")" "$dice" | tee -a "$out/summary.txt"
done
grep -h "monai_trt" "$out"/on_*.log | grep -E "ready|cached|first call|auto chose" | tee -a "$out/summary.txt"
