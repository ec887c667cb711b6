"""The example bundle through the real `python -m monai.bundle run` CLI, patch on and off."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.bundle_cli import gate_off

ROOT = Path(__file__).parents[1]
BUNDLE = ROOT / "bundles" / "spheres_segmentation"
pytestmark = pytest.mark.slow


def run_bundle(tmp_path: Path, out: str, *extra: str, env: dict | None = None, bundle: Path = BUNDLE) -> str:
    configs = f"['{bundle}/configs/inference.json','{bundle}/configs/inference_trt.json']"
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", configs, "--bundle_root", str(bundle),
        "--dataset_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / out), "--num_test", "1",
        *gate_off(bundle), *extra,
    ]
    full_env = {**os.environ, "MONAI_TRT_CACHE": str(tmp_path / "cache"), **(env or {})}
    done = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def masks(directory: Path) -> list[np.ndarray]:
    return [np.asarray(nib.load(f).dataobj) for f in sorted(directory.glob("*.nii.gz"))]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a > 0, b > 0).sum() / max((a > 0).sum() + (b > 0).sum(), 1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bundle")
    return tmp, {
        "on": run_bundle(tmp, "eval_on", "--trt", "True"),
        "again": run_bundle(tmp, "eval_again"),
        "off": run_bundle(tmp, "eval_off", "--trt", "False"),
        "env_off": run_bundle(tmp, "eval_env", "--trt", "True", env={"MONAI_TRT": "0"}),
    }


def test_patch_on_builds_an_engine_and_saves_masks(runs):
    tmp, logs = runs
    assert "engine ready in" in logs["on"]
    assert len(list((tmp / "cache" / "entries").iterdir())) == 1
    assert len(masks(tmp / "eval_on")) == 1


def test_second_run_reuses_the_engine(runs):
    tmp, logs = runs
    assert "using cached engine" in logs["again"] and "building" not in logs["again"]
    assert len(list((tmp / "cache" / "entries").iterdir())) == 1


@pytest.mark.parametrize("run", ["off", "env_off"])
def test_switch_off_builds_nothing_and_agrees(runs, run):
    tmp, logs = runs
    assert "monai_trt is off" in logs[run]
    assert "engine ready" not in logs[run] and "using cached engine" not in logs[run]
    on, off = masks(tmp / "eval_on"), masks(tmp / f"eval_{run.replace('env_off', 'env')}")
    assert len(on) == len(off) == 1
    assert dice(on[0], off[0]) > 0.99


def test_trained_bundle_really_segments(runs):
    _, logs = runs
    line = next(text for text in logs["on"].splitlines() if "val_mean_dice" in text)
    assert float(line.rsplit(":", 1)[1]) > 0.9


def test_swapped_checkpoint_is_refitted_not_rebuilt(tmp_path):
    """refit: a new models/model.pt of the same architecture reuses the cached engine with the new weights."""
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("eval*", "__pycache__"))
    extra = ("--trt_patch#0#refit", "refit")
    first = run_bundle(tmp_path, "eval_a", *extra, bundle=bundle)
    assert "engine ready in" in first
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    for name in list(state)[-2:]:  # the output convolution: negated logits swap the two classes
        state[name] = -state[name]
    torch.save(state, bundle / "models" / "model.pt")
    second = run_bundle(tmp_path, "eval_b", *extra, bundle=bundle)
    assert "refitted engine" in second and "building" not in second
    (entry,) = (tmp_path / "cache" / "entries").iterdir()
    assert json.loads((entry / "meta.json").read_text())["key_inputs"]["weights"] == "refit"
    off = run_bundle(tmp_path, "eval_b_off", *extra, "--trt", "False", bundle=bundle)
    assert "monai_trt is off" in off
    a, b, b_off = masks(tmp_path / "eval_a")[0], masks(tmp_path / "eval_b")[0], masks(tmp_path / "eval_b_off")[0]
    assert dice(b, b_off) > 0.99 and dice(a, b) < 0.5  # new weights really used, and used correctly
