"""bundles/diffusion_generation through the real CLI: two networks, each patched by its own trt_patch entry (the
hand-written configs/inference_trt.json, and configs/inference_trt_auto.json where `submodule: auto` searches)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.networks.nets import DiffusionModelUNet

from tests.bundle_cli import ROOT, cache_entries, read_wrappers, report_wrappers_config, run_bundle

BUNDLE = ROOT / "bundles" / "diffusion_generation"
pytestmark = pytest.mark.slow

# Tiny networks and latents, 3 DDIM steps; fp32 engines (onnxruntime on CPU) so outputs can be compared closely.
SMALL = [
    "--num_inference_steps", "3", "--latent_shape", "[3,8,8]", "--context_dim", "16",
    "--network_def#channels", "[16,16,16]", "--network_def#num_res_blocks", "1",
    "--network_def#attention_levels", "[False,False,True]", "--network_def#num_head_channels", "[0,0,16]",
    "--network_def#norm_num_groups", "8",
    "--autoencoder_def#channels", "[8,16,16]", "--autoencoder_def#num_res_blocks", "1",
    "--autoencoder_def#norm_num_groups", "8",
    "--trt_patch#0#precision", "fp32", "--trt_patch_autoencoder#0#precision", "fp32",
]


def images(directory: Path) -> list[np.ndarray]:
    return [np.asarray(nib.load(f).dataobj) for f in sorted(directory.glob("*_sample.nii.gz"))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("diffusion")
    common = ["--model_dir", str(tmp / "models"), *SMALL]
    return tmp, {
        "on": run_bundle(BUNDLE, tmp, *common, "--output_dir", str(tmp / "on"), "--trt", "True"),
        "off": run_bundle(BUNDLE, tmp, *common, "--output_dir", str(tmp / "off"), "--trt", "False"),
    }


@pytest.fixture(scope="module")
def auto_run(runs):
    """The same small run with configs/inference_trt_auto.json (fresh cache; speed gate off as in every bundle test),
    reporting each wrapper's planned state and engine/PyTorch call counts at the end of `run`."""
    tmp, _ = runs
    cwd = tmp / "auto"
    cwd.mkdir()
    report = report_wrappers_config(cwd, "network", "autoencoder")
    log = run_bundle(BUNDLE, cwd, "--model_dir", str(tmp / "models"), *SMALL, "--output_dir", str(cwd / "on"),
                     "--trt", "True", trt_config="inference_trt_auto.json", extra_configs=(report,))
    return cwd, log


def _covers(engine: str, path: str) -> bool:
    """An engine for module `engine` runs module `path` (the same module, or one of its ancestors)."""
    return engine == "" or engine == path or path.startswith(engine + ".")


def test_auto_patch_is_the_hand_patch_with_auto_entries():
    """A drop-in alternative: same keys and apply calls as inference_trt.json; each section searches."""
    configs = BUNDLE / "configs"
    hand = json.loads((configs / "inference_trt.json").read_text())
    auto = json.loads((configs / "inference_trt_auto.json").read_text())
    assert set(auto) == set(hand) and auto["+initialize"] == hand["+initialize"]
    for key in ("trt_patch", "trt_patch_autoencoder"):
        assert all(entry["submodule"] == "auto" for entry in auto[key])


def test_auto_converts_at_least_what_the_hand_patch_converts(auto_run):
    """Issue #19: `auto` on both networks covers the hand patch (the whole UNet; the autoencoder's decoder, searched
    under `decoder` because sampling calls `decode_stage_2_outputs`, not the autoencoder's forward) and its engines
    serve every call."""
    cwd, log = auto_run
    served = read_wrappers(log)
    hand = json.loads((BUNDLE / "configs" / "inference_trt.json").read_text())
    for network, section in (("network", "trt_patch"), ("autoencoder", "trt_patch_autoencoder")):
        engines = {("" if p == "<root>" else p): c for p, c in served[network].items() if c["state"] == "engine"}
        assert engines, served
        assert all(c["engine"] > 0 and c["pytorch"] == 0 for c in engines.values()), served
        for entry in hand[section]:
            assert any(_covers(e, entry["submodule"]) for e in engines), (network, entry, served)
    assert served["network"]["<root>"]["engine"] == 3  # one call per DDIM step
    assert len(list((cwd / "cache" / "plans").glob("*.json"))) == 2  # one remembered plan per search root
    assert "engine disabled" not in log and "runs in PyTorch" not in log


def test_auto_images_equal_the_pytorch_run(runs, auto_run):
    tmp, _ = runs
    cwd, _ = auto_run
    on, off = images(cwd / "on"), images(tmp / "off")
    assert len(on) == len(off) == 2
    for a, b in zip(on, off):
        value_range = float(b.max() - b.min())
        assert value_range > 0.1
        assert np.abs(a - b).max() <= 1e-3 * value_range


def test_unet_and_decoder_each_get_an_engine(runs):
    tmp, logs = runs
    assert logs["on"].count("engine ready in") == 2
    metas = {m["submodule"]: m for m in cache_entries(tmp / "cache")}
    assert set(metas) == {"", "decoder"}
    unet, decoder = metas[""], metas["decoder"]
    assert unet["module_class"].endswith("DiffusionModelUNet")
    assert unet["io"]["names"] == ["x", "timesteps", "context"]
    assert unet["io"]["dtypes"] == ["float32", "int64", "float32"]
    assert decoder["module_class"].endswith("autoencoderkl.Decoder")
    assert decoder["io"]["names"] == ["x"]
    assert "engine disabled" not in logs["on"] and "runs in PyTorch" not in logs["on"]


def test_switch_off_builds_nothing(runs):
    _, logs = runs
    assert "monai_trt is off" in logs["off"]
    assert "engine ready" not in logs["off"] and "using cached engine" not in logs["off"]


def test_same_seed_gives_the_same_images_with_and_without_engines(runs):
    tmp, _ = runs
    on, off = images(tmp / "on"), images(tmp / "off")
    assert len(on) == len(off) == 2
    for a, b in zip(on, off):
        assert a.shape == (32, 32) and np.isfinite(a).all()
        value_range = float(b.max() - b.min())
        assert value_range > 0.1  # the random UNet and decoder really produce structure, not a constant
        assert np.abs(a - b).max() <= 1e-3 * value_range
    assert np.abs(on[0] - on[1]).max() > 0.01 * float(on[0].max() - on[0].min())  # samples differ from each other


def test_random_weights_are_labelled(runs):
    tmp, _ = runs
    for name in ("model.pt", "model_autoencoder.pt"):
        record = json.loads((tmp / "models" / f"{name}.json").read_text())
        assert record["weights"] == "random, not trained"


def test_random_weights_depend_only_on_seed_and_leave_no_zero_layer():
    spec = importlib.util.spec_from_file_location("diffusion_weights", BUNDLE / "scripts" / "weights.py")
    weights = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(weights)

    def unet() -> DiffusionModelUNet:  # zero-initialises its output convolution
        return DiffusionModelUNet(2, 3, 3, channels=(8, 8), attention_levels=(False, False), num_res_blocks=1,
                                  norm_num_groups=8)

    first, second = weights.random_state_dict(unet(), seed=3), weights.random_state_dict(unet(), seed=3)
    other = weights.random_state_dict(unet(), seed=4)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
    assert all(t.abs().sum() > 0 for t in first.values() if t.is_floating_point() and t.numel())
