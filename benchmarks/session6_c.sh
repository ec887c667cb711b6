#!/usr/bin/env bash
# Session 6, device call 3 (nvidia-h200-x2), issue 18:
#   1. W1 one GPU vs two with CUDA graphs (the default now), after the split call checks the original once.
#   2. SwinUNETR bundle, 8 volumes: torchrun --nproc_per_node 2 with a shared cold cache (one build?), then torchrun
#      and one process on the now-warm cache (wall time), masks of one process vs torchrun compared.
# all.tgz is rewritten after each step, so a run cut short keeps what it measured.
# Usage (repo root, wheels installed, PYTHONPATH set): bash benchmarks/session6_c.sh OUT
set -u
out=${1:?out dir}; mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
summary="$out/summary.txt"
pack() { (cd "$out" && find . -type f \( -name '*.json' -o -name '*.md' -o -name '*.txt' -o -name '*.log' \
  -o -name '*.json.gz' \) -size -12M | grep -v all.tgz | tar czf all.tgz -T -); }
now() { date +%s.%N; }
since() { python3 -c "print(round($(now) - $1, 1))"; }

timeout 190 python3 benchmarks/multi_gpu.py --out "$out/mg" --cache /tmp/mgcache --rounds 5 --cuda_graph --trace \
  --budget 150 --no_eager --modes plain_sw8_graph,devices2_sw16_graph,devices2_sw8_graph > "$out/mg.log" 2>&1
echo "multi_gpu rc=$?" >> "$summary"; pack

b=bundles/swin_unetr_btcv_segmentation
one="['$b/configs/inference.json','$b/configs/inference_trt.json']"
ddp="['$b/configs/inference.json','$b/configs/inference_trt.json','$b/configs/multi_gpu_inference.json']"
(cd $b && python3 -c "from scripts.data import ensure_dataset; ensure_dataset('/tmp/swin_data', 8)")
args=(--bundle_root "$b" --dataset_dir /tmp/swin_data --num_volumes 8)
for step in ddp_cold:175 ddp_warm:60 one_warm:70; do
  name=${step%%:*}; limit=${step##*:}; s=$(now)
  if [[ $name == ddp* ]]; then
    MONAI_TRT_CACHE=/tmp/swin_cache timeout "$limit" torchrun --standalone --nproc_per_node 2 -m monai.bundle run \
      --config_file "$ddp" "${args[@]}" --output_dir "/tmp/swin_$name" > "$out/swin_$name.log" 2>&1; rc=$?
  else
    MONAI_TRT_CACHE=/tmp/swin_cache timeout "$limit" python3 -m monai.bundle run --config_file "$one" "${args[@]}" \
      --output_dir "/tmp/swin_$name" > "$out/swin_$name.log" 2>&1; rc=$?
  fi
  echo "swin $name rc=$rc wall_s=$(since "$s") builds=$(grep -c 'engine ready in' "$out/swin_$name.log")" \
    "loaded_built_by_another_process=$(grep -c 'built by another process' "$out/swin_$name.log")" \
    "cached_engine_used=$(grep -c 'using cached engine' "$out/swin_$name.log")" >> "$summary"; pack
done
python3 - >> "$summary" <<'PY'
import pathlib, nibabel as nib, numpy as np
a, b = pathlib.Path("/tmp/swin_one_warm"), pathlib.Path("/tmp/swin_ddp_warm")
files = sorted(p.relative_to(a) for p in a.rglob("*.nii.gz"))
both = [f for f in files if (b / f).exists()]
same = sum(np.array_equal(np.asarray(nib.load(a / f).dataobj), np.asarray(nib.load(b / f).dataobj)) for f in both)
agree = [float((np.asarray(nib.load(a / f).dataobj) == np.asarray(nib.load(b / f).dataobj)).mean()) for f in both]
print(f"swin masks: {len(files)} from one process, {len(both)} also from torchrun, identical: {same}, "
      f"voxel agreement min {min(agree) if agree else float('nan'):.6f}")
PY
pack; cat "$summary"
