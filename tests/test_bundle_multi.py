"""Data-parallel bundle runs: `torchrun --nproc_per_node 2 -m monai.bundle run` with the example bundle's
`configs/multi_gpu_inference.json` (gloo on CPU): two ranks share one cache, exactly one builds the engine, and the
masks equal a single-process run's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.bundle_cli import ROOT, cache_entries

BUNDLE = ROOT / "bundles" / "spheres_segmentation"
pytestmark = pytest.mark.slow


def bundle_run(tmp: Path, out: str, configs: list[str], launcher: list[str]) -> str:
    files = repr([str(BUNDLE / "configs" / c) for c in configs])
    cmd = [*launcher, "-m", "monai.bundle", "run", "--config_file", files, "--bundle_root", str(BUNDLE),
           "--dataset_dir", str(tmp / "data"), "--output_dir", str(tmp / out), "--num_test", "2",
           "--trt_patch#0#min_speedup", "0"]  # engines serve even where they are not faster (this loaded CPU)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {k: v for k, v in os.environ.items() if k not in ("MONAI_TRT", "LOCAL_RANK", "RANK", "WORLD_SIZE")}
    env.update({"MONAI_TRT_CACHE": str(tmp / "cache"), "PYTHONPATH": path, "CUDA_VISIBLE_DEVICES": ""})
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done.stdout + done.stderr


def masks(folder: Path) -> dict[str, np.ndarray]:
    return {f.name: np.asarray(nib.load(f).dataobj) for f in sorted(folder.glob("*.nii.gz"))}


def test_torchrun_ranks_build_once_and_match_a_single_process(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    logs = bundle_run(tmp_path, "ddp", ["inference.json", "inference_trt.json", "multi_gpu_inference.json"], torchrun)
    assert logs.count("engine ready in") == 1  # one rank built ...
    assert logs.count("(built by another process)") == 1  # ... the other waited and loaded the same entry
    assert len(cache_entries(tmp_path / "cache")) == 1
    assert logs.count("val_mean_dice: ") >= 2  # both ranks report the metric gathered over both shards
    single = bundle_run(tmp_path, "single", ["inference.json", "inference_trt.json"], [sys.executable])
    assert "using cached engine" in single and "engine ready in" not in single
    ddp, one = masks(tmp_path / "ddp"), masks(tmp_path / "single")
    assert list(ddp) == list(one) == ["000_img_seg.nii.gz", "001_img_seg.nii.gz"]  # each rank wrote its own case
    assert all(np.array_equal(ddp[name], one[name]) for name in one)
