#!/usr/bin/env bash
# Issue 18 on two H200s (nvidia-h200-x2). Parts (second argument, comma separated; default all):
#   mg      W1 one GPU vs two (benchmarks/multi_gpu.py; its .md/.json are rewritten after every round)
#   spheres the example bundle, 8 volumes: one process (own cold cache) vs torchrun --nproc_per_node 2 (shared cold
#           cache); wall time, engine builds, masks compared
#   swin    the same for the SwinUNETR bundle (8 volumes)
# Each part appends its lines to OUT/summary.txt as it finishes, so a run cut short keeps what it measured.
# The one-process run goes first: it writes the bundle's data and checkpoint, which torchrun's ranks then reuse
# (and it leaves Inductor's own kernel cache warm for torchrun's build: the engine cache is cold, Inductor's is not).
# Usage (repo root, wheels installed): bash benchmarks/gpu_x2.sh OUT [mg,spheres,swin] [mg_timeout_s] [bundle_timeout_s]
set -u
out=${1:?out dir}; parts=${2:-mg,spheres,swin}; mg_timeout=${3:-400}; bundle_timeout=${4:-200}; mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
summary="$out/summary.txt"
nvidia-smi topo -m | head -4 >> "$summary"
now() { date +%s.%N; }
since() { python3 -c "print(round($(now) - $1, 1))"; }

bundle_pair() {  # name bundle_dir timeout_s extra-args...: one process vs torchrun x2, 8 volumes each
  local name=$1 b=$2 limit=$3; shift 3
  local cfg="['$b/configs/inference.json','$b/configs/inference_trt.json']"
  local ddp="['$b/configs/inference.json','$b/configs/inference_trt.json','$b/configs/multi_gpu_inference.json']"
  local s rc
  s=$(now); MONAI_TRT_CACHE=/tmp/${name}_cache_one timeout "$limit" python3 -m monai.bundle run --config_file "$cfg" \
    --bundle_root "$b" "$@" --output_dir /tmp/${name}_out_one > "$out/${name}_one.log" 2>&1; rc=$?
  echo "$name one process rc=$rc wall_s=$(since "$s")" >> "$summary"
  s=$(now); MONAI_TRT_CACHE=/tmp/${name}_cache_ddp timeout "$limit" torchrun --standalone --nproc_per_node 2 \
    -m monai.bundle run --config_file "$ddp" --bundle_root "$b" "$@" --output_dir /tmp/${name}_out_ddp \
    > "$out/${name}_ddp.log" 2>&1; rc=$?
  echo "$name torchrun x2 rc=$rc wall_s=$(since "$s")" >> "$summary"
  echo "$name engine builds: one=$(grep -c 'engine ready in' "$out/${name}_one.log")" \
    "ddp=$(grep -c 'engine ready in' "$out/${name}_ddp.log")" \
    "ddp loads built by another process=$(grep -c 'built by another process' "$out/${name}_ddp.log")" >> "$summary"
  NAME=$name python3 - >> "$summary" <<'PY'
import os, pathlib, nibabel as nib, numpy as np
n = os.environ["NAME"]
a, b = pathlib.Path(f"/tmp/{n}_out_one"), pathlib.Path(f"/tmp/{n}_out_ddp")
files = sorted(p.relative_to(a) for p in a.rglob("*.nii.gz"))
both = [f for f in files if (b / f).exists()]
same = sum(np.array_equal(np.asarray(nib.load(a / f).dataobj), np.asarray(nib.load(b / f).dataobj)) for f in both)
print(f"{n} masks: {len(files)} from one process, {len(both)} also from torchrun, identical: {same}")
PY
  grep -h "val_mean_dice" "$out/${name}_one.log" "$out/${name}_ddp.log" | tail -3 >> "$summary"
}

for part in ${parts//,/ }; do  # in the order given
  case $part in
    mg) timeout "$mg_timeout" python3 benchmarks/multi_gpu.py --out "$out/mg" --cache /tmp/mgcache --rounds 3 \
          --budget $((mg_timeout - 60)) > "$out/mg.log" 2>&1; echo "multi_gpu rc=$?" >> "$summary" ;;
    spheres) bundle_pair spheres bundles/spheres_segmentation "$bundle_timeout" --dataset_dir /tmp/spheres_data \
          --num_test 8 ;;
    swin) bundle_pair swin bundles/swin_unetr_btcv_segmentation "$bundle_timeout" --dataset_dir /tmp/swin_data \
          --num_volumes 8 ;;
    *) echo "unknown part $part" >> "$summary" ;;
  esac
done
cat "$summary"
