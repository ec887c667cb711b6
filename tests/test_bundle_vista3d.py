"""bundles/vista3d_segmentation: only `image_encoder.encoder` becomes an engine; prompts stay in PyTorch."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.apps.vista3d.inferer import point_based_window_inferer
from monai.networks.nets import vista3d132

import monai_trt
from tests.bundle_cli import ROOT, cache_entries, run_bundle

BUNDLE = ROOT / "bundles" / "vista3d_segmentation"
pytestmark = pytest.mark.slow

# A small volume and encoder (encoder_embed_dim 8), two overlapping 32^3 windows, three class prompts, fp32 engine.
SMALL = [
    "--image_shape", "[48,32,32]", "--patch_size", "[32,32,32]", "--network_def#encoder_embed_dim", "8",
    "--label_prompt", "[1,2,3]", "--trt_patch#0#precision", "fp32",
]


def mask(directory: Path) -> np.ndarray:
    files = sorted(directory.glob("*_seg.nii.gz"))
    assert len(files) == 1
    return np.asarray(nib.load(files[0]).dataobj)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vista3d")
    common = ["--dataset_dir", str(tmp / "data"), "--ckpt_path", str(tmp / "model.pt"), *SMALL]
    return tmp, {
        "on": run_bundle(BUNDLE, tmp, *common, "--output_dir", str(tmp / "on"), "--trt", "True"),
        "off": run_bundle(BUNDLE, tmp, *common, "--output_dir", str(tmp / "off"), "--trt", "False"),
    }


def test_only_the_image_encoder_becomes_an_engine(runs):
    tmp, logs = runs
    assert logs["on"].count("engine ready in") == 1
    (meta,) = cache_entries(tmp / "cache")
    assert meta["submodule"] == "image_encoder.encoder"
    assert meta["module_class"].endswith("SegResEncoder")
    assert meta["io"]["names"] == ["x"] and meta["io"]["dtypes"] == ["float32"]
    assert len(json.loads(meta["outputs"]["spec"])) > 1  # the encoder returns its 5 feature maps as a list
    assert "monai_trt 'network.image_encoder.encoder'" in logs["on"]
    assert "engine disabled" not in logs["on"] and "runs in PyTorch" not in logs["on"]


def test_switch_off_builds_nothing(runs):
    _, logs = runs
    assert "monai_trt is off" in logs["off"]
    assert "engine ready" not in logs["off"] and "using cached engine" not in logs["off"]


def test_class_prompt_masks_agree_with_pytorch(runs):
    tmp, _ = runs
    on, off = mask(tmp / "on"), mask(tmp / "off")
    assert on.shape == (48, 32, 32)
    assert set(np.unique(off)) <= {0, 1, 2, 3} and len(np.unique(off)) > 1
    assert (on == off).mean() >= 0.99
    for label in np.unique(off)[1:]:
        a, b = on == label, off == label
        assert 2.0 * (a & b).sum() / (a.sum() + b.sum()) >= 0.99


def test_point_prompts_through_the_network(tmp_path):
    """Point prompts (float coordinates, int64 labels) with point-centred windows, engine vs PyTorch."""
    spec = importlib.util.spec_from_file_location("vista3d_weights", BUNDLE / "scripts" / "weights.py")
    weights = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(weights)
    network = vista3d132(encoder_embed_dim=8).eval()
    network.load_state_dict(weights.random_state_dict(network, seed=0))
    image = torch.rand(1, 1, 48, 48, 40, generator=torch.Generator().manual_seed(0))
    points = torch.tensor([[[20.0, 24.0, 18.0]]])  # one object, one click: one 32^3 window around it
    labels = torch.tensor([[1]])

    def infer() -> torch.Tensor:
        with torch.no_grad():
            return point_based_window_inferer(image, [32, 32, 32], network, points, labels, transpose=True)

    reference = infer()
    patch = json.loads((BUNDLE / "configs" / "inference_trt.json").read_text())["trt_patch"]
    patch = [{**entry, "precision": "fp32", "path": str(tmp_path / "cache")} for entry in patch]
    monai_trt.apply(network, patch)
    try:
        result = infer()
        wrapper = monai_trt.wrappers(network)["image_encoder.encoder"]
        assert list(monai_trt.wrappers(network)) == ["image_encoder.encoder"]
        assert wrapper.builds == 1 and wrapper.disabled is None
    finally:
        monai_trt.remove(network)
    assert result.shape == reference.shape == (1, 1, 48, 48, 40)
    window = torch.isfinite(reference)  # voxels outside every point-centred window are NaN by design
    assert torch.equal(torch.isfinite(result), window) and window.sum() == 32**3
    assert ((result[window] > 0) == (reference[window] > 0)).float().mean() >= 0.99
    assert torch.allclose(result[window], reference[window], rtol=1e-3, atol=1e-3)
