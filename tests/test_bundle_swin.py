"""swin_unetr_btcv_segmentation through the real `python -m monai.bundle run` CLI, patch on and off, plus the
model-zoo `trt_compile` → `trt_patch` conversion of docs/zoo_mapping.md.

The CLI runs are shrunk on the command line only, so that they fit a 2-core CPU: one 96x80x64 volume (already at
the bundle's 1.5x1.5x2.0 mm spacing), ROI 64³ with sw_batch_size 3 (4 windows: batches of 3 and 1, so the engine's
dynamic batch range is really used), feature_size 12 (an id of the bundle) and Swin depths [1, 1, 1, 1]
(`network_def#depths`; the ONNX export of the full-depth network alone takes ~100 s on such a machine), fp32.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.networks.nets import SwinUNETR

from monai_trt.patch.spec import parse_patch
from tests.bundle_cli import ROOT, cache_entries, run_bundle

BUNDLE = ROOT / "bundles" / "swin_unetr_btcv_segmentation"
INFERENCE, PATCH = BUNDLE / "configs" / "inference.json", BUNDLE / "configs" / "inference_trt.json"
DOC = ROOT / "docs" / "zoo_mapping.md"
SMALL = [
    "--num_volumes", "1", "--volume_size", "[96,80,64]", "--volume_spacing", "[1.5,1.5,2.0]",
    "--roi_size", "[64,64,64]", "--sw_batch_size", "3", "--feature_size", "12", "--network_def#depths", "[1,1,1,1]",
]


def run(tmp: Path, out: str, *extra: str) -> str:
    return run_bundle(
        BUNDLE, tmp, "--dataset_dir", str(tmp / "data"), "--checkpoint", str(tmp / "model.pt"),
        "--output_dir", str(tmp / out), *SMALL, *extra,
    )


def masks(directory: Path) -> list[np.ndarray]:
    return [np.asarray(nib.load(f).dataobj) for f in sorted(directory.glob("*.nii.gz"))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("swin")
    return tmp, {
        "on": run(tmp, "eval_on", "--trt", "True", "--trt_patch#0#precision", "fp32"),
        "off": run(tmp, "eval_off", "--trt", "False"),
    }


@pytest.mark.slow
def test_patched_run_serves_sliding_window_from_one_dynamic_batch_engine(runs):
    tmp, logs = runs
    assert "auto chose 'onnxruntime' on cpu" in logs["on"]
    assert "engine ready in" in logs["on"]
    assert "falling back to PyTorch" not in logs["on"] and "outside dynamic_batchsize" not in logs["on"]
    (meta,) = cache_entries(tmp / "cache")
    assert (meta["method"], meta["precision"], meta["submodule"]) == ("onnxruntime", "fp32", "")
    assert meta["module_class"] == "monai.networks.nets.swin_unetr.SwinUNETR"
    # batch dynamic over [1, sw_batch_size], spatial dims fixed at the ROI
    assert meta["io"]["profiles"] == [[[[1, 1, 64, 64, 64], [3, 1, 64, 64, 64], [3, 1, 64, 64, 64]]]]


@pytest.mark.slow
def test_switch_off_builds_nothing_and_masks_agree(runs):
    tmp, logs = runs
    assert "monai_trt is off" in logs["off"]
    assert "engine ready" not in logs["off"] and "using cached engine" not in logs["off"]
    on, off = masks(tmp / "eval_on"), masks(tmp / "eval_off")
    assert len(on) == len(off) == 1
    assert on[0].shape == off[0].shape == (96, 80, 64)
    assert (on[0] == off[0]).mean() >= 0.99
    dices = [float(re.findall(r"val_mean_dice: ([0-9.]+)", logs[k])[-1]) for k in ("on", "off")]
    assert abs(dices[0] - dices[1]) < 0.01


@pytest.mark.slow
def test_bundle_generates_btcv_like_data_and_random_weights_once(runs):
    tmp, _ = runs
    image = nib.load(tmp / "data" / "imagesTs" / "img0001.nii.gz")
    label = np.asarray(nib.load(tmp / "data" / "labelsTs" / "label0001.nii.gz").dataobj)
    assert image.shape == label.shape == (96, 80, 64)
    assert nib.aff2axcodes(image.affine) == ("L", "P", "S")  # Orientationd has work to do
    hu = np.asarray(image.dataobj)
    assert hu.min() <= -900 and hu.max() >= 150  # air and contrast-filled vessels
    assert {1, 2, 3, 6, 8} <= set(np.unique(label).tolist()) <= set(range(14))
    assert (tmp / "model.pt").exists()  # written by the first run, loaded by both


def _json_blocks(markdown: str) -> list[dict]:
    return [json.loads(b) for b in re.findall(r"```json\n(.*?)```", markdown, flags=re.DOTALL)]


def _resolved(overlay: dict, id_: str):
    parser = ConfigParser(ConfigParser.load_config_files([str(INFERENCE)]))
    for key, value in overlay.items():
        if key.startswith("+"):
            parser[key[1:]] = parser[key[1:]] + value
        else:
            parser[key] = value
    parser["feature_size"] = 12
    return parser.get_parsed_content(id_)


def test_zoo_trt_args_convert_to_the_bundle_patch():
    before, after = _json_blocks(DOC.read_text())
    assert after == json.loads(PATCH.read_text())
    assert "trt_compile(@network_def.to(@device)" in before["network"]
    args = _resolved(before, "trt_args")
    patch = _resolved(after, "trt_patch")
    assert parse_patch({"submodule": "", **args}) == parse_patch(patch)
    assert parse_patch(patch)[0].dynamic_batchsize == (1, 4, 4)


def test_zoo_before_file_is_a_working_trt_compile_config():
    # Without TensorRT, MONAI's trt_compile warns and returns the network unchanged: the "before" file is valid.
    before, _ = _json_blocks(DOC.read_text())
    network = _resolved(before, "network")
    assert type(network).__name__ == "SwinUNETR" and not hasattr(network, "_trt_compiler")


def test_random_weights_depend_only_on_the_seed():
    spec = importlib.util.spec_from_file_location("swin_bundle_weights", BUNDLE / "scripts" / "weights.py")
    weights = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(weights)
    nets = []
    for construction_seed in (1, 2):
        torch.manual_seed(construction_seed)
        nets.append(SwinUNETR(in_channels=1, out_channels=14, feature_size=12, depths=(1, 1, 1, 1)))
    a, b = (weights.random_state_dict(n, seed=0) for n in nets)
    assert a.keys() == nets[0].state_dict().keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = weights.random_state_dict(nets[0], seed=1)
    assert not all(torch.equal(a[k], other[k]) for k in a)
    nets[0].load_state_dict(a, strict=True)
