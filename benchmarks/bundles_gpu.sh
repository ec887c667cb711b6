#!/usr/bin/env bash
# Full-size GPU runs of the VISTA3D and diffusion example bundles, patch on (cold cache, then cache hit) and off.
# Usage (GPU machine, repo root): bash benchmarks/bundles_gpu.sh OUT_DIR
set -u
out=${1:?output dir}
mkdir -p "$out"
export MONAI_TRT_CACHE="$out/cache"
for b in diffusion_generation vista3d_segmentation; do
  cfg="['bundles/$b/configs/inference.json','bundles/$b/configs/inference_trt.json']"
  for run in off on_cold on_hit; do
    flag=(); [ "$run" = off ] && flag=(--trt False)
    start=$(date +%s.%N)
    python3 -m monai.bundle run --config_file "$cfg" --bundle_root "bundles/$b" --output_dir "$out/$b/$run" "${flag[@]}" \
      > "$out/$b.$run.log" 2>&1
    rc=$?
    echo "$b $run rc=$rc wall_s=$(echo "$(date +%s.%N) - $start" | bc)" | tee -a "$out/summary.txt"
    grep -hE "engine ready|using cached engine|first call took|disabled|Dice|dice" "$out/$b.$run.log" | tail -4 >> "$out/summary.txt"
  done
done
