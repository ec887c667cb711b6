"""Never wrong, never silent (issue 13, cases 5-12): an engine answers exactly what PyTorch would, or PyTorch answers.

Each test names its case; each asserts the answer against plain PyTorch and how the calls were served.
"""

from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from monai.data import MetaTensor, decollate_batch, list_data_collate
from monai.data.meta_obj import get_track_meta, set_track_meta
from monai.inferers import SimpleInferer
from monai.transforms import Compose, Invertd, Resized

import monai_trt
from monai_trt.errors import PatchError
from monai_trt.runtime.hook import report_unused
from monai_trt.runtime.validate import compare_outputs
from tests.nets import Bypassing, Composite, Dropped, Seg2D, TinySeg

ORT = {"method": "onnxruntime", "precision": "fp32"}
ROOT = Path(__file__).resolve().parents[1]


def run(net, *args, **kwargs):
    with torch.no_grad():
        return net(*args, **kwargs)


def plain_copy(net):
    return monai_trt.remove(copy.deepcopy(net))


def calls(net, path: str = "") -> dict[str, int]:
    return monai_trt.wrappers(net)[path].calls


def warnings(logs) -> list[str]:
    return [r.getMessage() for r in logs.records if r.levelno >= logging.WARNING]


@pytest.fixture
def x():
    return torch.randn(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------- 5. metadata (MONAI MetaTensor)
PRE = Compose([Resized(keys="image", spatial_size=(24, 40))])


def _batch(name: str, seed: int) -> dict:
    image = MetaTensor(torch.randn(1, 12, 20, generator=torch.Generator().manual_seed(seed)),
                       affine=torch.diag(torch.tensor([2.0, 3.0, 1.0, 1.0])), meta={"filename_or_obj": name})
    return list_data_collate([PRE({"image": image})])


def test_simpleinferer_outputs_carry_pytorchs_metadata_and_invert(trt_logs):
    """Case 5: a 2D SimpleInferer flow gets a MetaTensor with the image's metadata, so Invertd restores 12x20."""
    net = monai_trt.apply(Seg2D().eval(), [ORT], name="network")
    plain = plain_copy(net)
    for seed, name in enumerate(("case1.nii.gz", "case2.nii.gz")):  # the 2nd: engine only, its own input's meta
        batch = _batch(name, seed)
        with torch.no_grad():
            out, ref = SimpleInferer()(batch["image"], net), SimpleInferer()(batch["image"], plain)
        assert type(out) is MetaTensor and out.is_batch == ref.is_batch
        assert out.meta.keys() == ref.meta.keys() and out.meta["filename_or_obj"] == [name]
        assert torch.equal(out.affine, ref.affine) and len(out.applied_operations) == len(ref.applied_operations)
        torch.testing.assert_close(out.as_tensor(), ref.as_tensor(), rtol=1e-4, atol=1e-5)
        batch["pred"] = out
        inverted = Invertd(keys="pred", transform=PRE, orig_keys="image")(decollate_batch(batch)[0])["pred"]
        assert inverted.shape == (2, 12, 20) and inverted.meta["filename_or_obj"] == name
    assert calls(net) == {"engine": 2, "pytorch": 0}
    assert not warnings(trt_logs)


def test_output_type_follows_each_calls_inputs():
    """Case 5: unbatched MetaTensor → MetaTensor; plain tensor → plain; MONAI's track_meta off → plain."""
    net = monai_trt.apply(Seg2D().eval(), [ORT])
    plain = plain_copy(net)
    image = MetaTensor(torch.randn(1, 1, 12, 20), affine=torch.eye(4) * 2, meta={"filename_or_obj": "a.nii"})
    out, ref = run(net, image), run(plain, image)
    assert type(out) is MetaTensor and not out.is_batch and out.meta["filename_or_obj"] == "a.nii"
    assert torch.equal(out.affine, ref.affine) and out.meta is not image.meta  # a copy, as MONAI's ops make
    assert type(run(net, image.as_tensor())) is torch.Tensor
    assert get_track_meta()
    set_track_meta(False)
    try:
        assert type(run(net, image)) is type(run(plain, image)) is torch.Tensor
    finally:
        set_track_meta(True)
    assert calls(net) == {"engine": 3, "pytorch": 0}


class Relabelled(Seg2D):
    """Writes its own metadata into the output: not what MONAI's propagation from the input gives."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if isinstance(y, MetaTensor):
            y.meta["written_by"] = "network"
        return y


def test_metadata_an_engine_cannot_reproduce_runs_pytorch(trt_logs):
    """Case 5: outputs whose metadata is not an input's: PyTorch answers those calls, with one warning."""
    net = monai_trt.apply(Relabelled().eval(), [ORT])
    image = MetaTensor(torch.randn(1, 1, 12, 20), meta={"filename_or_obj": "a.nii"})
    for _ in range(2):
        out = run(net, image)
        assert type(out) is MetaTensor and out.meta["written_by"] == "network"
    assert type(run(net, image.as_tensor())) is torch.Tensor  # plain inputs still use the engine
    assert calls(net) == {"engine": 1, "pytorch": 2}
    (warning,) = warnings(trt_logs)
    assert "metadata is not that of any MetaTensor input" in warning and "run in PyTorch" in warning


# ------------------------------------------------------------------------------- 6. deepcopy and instance forwards
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_deepcopy_keeps_a_forward_overridden_on_the_instance(x, precision):
    """Case 6: the one-replica-per-device pattern: the copy computes the instance forward, with its own weights."""
    net = TinySeg().eval()
    net.forward = types.MethodType(lambda self, inp: self.head(self.body(inp)) * 2 + 1, net)
    monai_trt.apply(net, [{**ORT, "precision": precision}])
    clone = copy.deepcopy(net)
    with torch.no_grad():
        clone.head.bias += 1  # the copy's own weights
        expected = clone.head(clone.body(x)) * 2 + 1
    torch.testing.assert_close(run(clone, x), expected, rtol=1e-2 if precision == "fp16" else 1e-4, atol=1e-2)
    assert calls(clone) == {"engine": 1, "pytorch": 0}  # validated against the override: the engine computes it
    monai_trt.remove(clone)
    assert clone.forward.__self__ is clone and "forward" in clone.__dict__


# ------------------------------------------------------------------------------- 7. NaN / Inf in the first input
def test_nan_and_inf_in_the_first_input_keep_the_engine(trt_logs):
    """Case 7: engine and PyTorch agree where both are finite and on NaN/Inf positions: the engine stays on."""
    net = monai_trt.apply(Composite().eval(), [ORT])
    x = torch.randn(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    x[0, 0, 2, 2, 2], x[0, 0, 5, 5, 5] = float("nan"), float("inf")
    out, ref = run(net, x), run(plain_copy(net), x)
    assert not torch.isfinite(ref).all()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5, equal_nan=True)
    clean = torch.randn(1, 1, 8, 8, 8)
    torch.testing.assert_close(run(net, clean), run(plain_copy(net), clean), rtol=1e-4, atol=1e-5)
    assert not monai_trt.wrappers(net)[""].disabled and calls(net) == {"engine": 2, "pytorch": 0}
    assert not warnings(trt_logs)


def test_comparison_treats_non_finite_values_by_position():
    """Case 7: NaN where PyTorch has NaN agrees; other non-finite differences do not."""
    ref = torch.tensor([1.0, float("nan"), float("inf"), -2.0])
    assert compare_outputs([torch.tensor([1.0, 0.0, float("inf"), -2.0])], [ref], "fp32") == ""
    assert compare_outputs([torch.tensor([1.0, float("nan"), float("inf"), -2.0])], [ref], "fp32") == ""
    assert "non-finite" in compare_outputs([torch.tensor([1.0, 0.0, 5.0, -2.0])], [ref], "fp32")
    assert "non-finite" in compare_outputs([torch.tensor([1.0, 0.0, float("-inf"), -2.0])], [ref], "fp32")
    assert "non-finite" in compare_outputs([torch.tensor([float("nan"), 0.0, float("inf"), -2.0])], [ref], "fp32")
    assert "relative L2 error" in compare_outputs([torch.tensor([9.0, 0.0, float("inf"), -2.0])], [ref], "fp32")


# ------------------------------------------------------------------------------- 8. training mode
def test_training_mode_without_training_behaviour_serves_calls_without_gradients(x):
    """Case 8: conv + instance norm (no running stats) compute the same in training mode: the engine serves."""
    net = monai_trt.apply(TinySeg().train(), [ORT])
    plain = plain_copy(net).train()
    torch.testing.assert_close(run(net, x), run(plain, x), rtol=1e-4, atol=1e-5)
    assert calls(net) == {"engine": 1, "pytorch": 0}
    assert all(m.training for m in net.modules())  # building did not switch the user's module to eval


def test_training_mode_with_dropout_runs_pytorch_and_says_how_to_fix_it_once(x, trt_logs):
    """Case 8: a layer that behaves differently in training: PyTorch, one warning naming the layer and the fix."""
    net = monai_trt.apply(Dropped().train(), [ORT], name="network")
    outs = [run(net, x) for _ in range(2)]
    assert not torch.equal(outs[0], outs[1])  # dropout is live, as in PyTorch
    (warning,) = warnings(trt_logs)
    assert "'drop' (Dropout)" in warning and '"$@network.eval()"' in warning and "'network'" in warning
    assert calls(net) == {"engine": 0, "pytorch": 2}
    net.eval()
    torch.testing.assert_close(run(net, x), run(plain_copy(net), x), rtol=1e-4, atol=1e-5)
    net.drop.train()  # Monte-Carlo dropout on an eval network: PyTorch again
    assert not torch.equal(run(net, x), run(net, x))
    assert calls(net) == {"engine": 1, "pytorch": 4}


# ------------------------------------------------------------------------------- 9. autograd
def test_autograd_gets_pytorchs_graph_and_one_message(x, trt_logs):
    """Case 9: eval mode with gradients on: PyTorch (backward works); no_grad or frozen weights: the engine."""
    net = monai_trt.apply(TinySeg().eval(), [ORT])
    plain = plain_copy(net)
    for _ in range(2):
        net(x).sum().backward()
        plain(x).sum().backward()
    for ours, theirs in zip(net.parameters(), plain.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad)
    assert calls(net) == {"engine": 0, "pytorch": 2}
    (warning,) = warnings(trt_logs)
    assert "requires grad" in warning and "torch.no_grad()" in warning
    assert not run(net, x).requires_grad and calls(net)["engine"] == 1
    with torch.inference_mode():
        assert not net(x).requires_grad
    net.requires_grad_(False)  # nothing requires grad: PyTorch returns no graph either
    assert not net(x).requires_grad and calls(net) == {"engine": 3, "pytorch": 2}
    assert net(x.requires_grad_()).requires_grad and calls(net)["pytorch"] == 3  # an input that requires grad


# ------------------------------------------------------------------------------- 10. meta device
def test_meta_device_input_gets_pytorchs_meta_output(trt_logs):
    """Case 10: shape inference on `meta` tensors: PyTorch's meta output, no error, no warning, engine intact."""
    net = monai_trt.apply(TinySeg().eval(), [ORT]).to("meta")
    out = run(net, torch.empty(2, 1, 8, 8, 8, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 2, 8, 8, 8)
    assert calls(net) == {"engine": 0, "pytorch": 1} and not monai_trt.wrappers(net)[""].disabled
    assert not warnings(trt_logs)


# ------------------------------------------------------------------------------- 11. a module under two names
def test_module_under_two_names_is_wrapped_once_and_always_unwrapped():
    """Case 11: re-applying keeps the wrapper; another name of the same module replaces it; remove/off unwrap."""
    net = Composite()
    net.alias = net.encoder
    monai_trt.apply(net, [{**ORT, "submodule": "alias"}])
    first = monai_trt.wrappers(net)["alias"]
    monai_trt.apply(net, [{**ORT, "submodule": "alias"}])
    assert monai_trt.wrappers(net) == {"alias": first}
    monai_trt.apply(net, [{**ORT, "submodule": "encoder"}])
    assert net.encoder.__dict__["forward"].previous_forward is None  # replaced, not stacked
    monai_trt.remove(net)
    assert "forward" not in net.encoder.__dict__
    monai_trt.apply(net, [{**ORT, "submodule": "alias"}])
    monai_trt.apply(net, [ORT], enabled=False)
    assert "forward" not in net.encoder.__dict__ and monai_trt.wrappers(net) == {}


def test_two_entries_reaching_one_module_or_nested_by_alias_are_refused():
    """Case 11: one module under two entries (or one inside another under an alias) would stack wrappers."""
    net = Composite()
    net.alias = net.encoder
    with pytest.raises(PatchError, match="'alias' and 'encoder' are the same module"):
        monai_trt.apply(net, [{**ORT, "submodule": ["alias", "encoder"]}])
    with pytest.raises(PatchError, match="lies inside 'alias'"):
        monai_trt.apply(net, [{**ORT, "submodule": ["alias", "encoder.0"]}])
    assert monai_trt.wrappers(net) == {}


def test_wrapping_an_already_wrapped_module_replaces_the_wrapper():
    """Case 11: a new wrapper on a wrapped module keeps the user's forward beneath, never the old wrapper."""
    from monai_trt.patch.spec import parse_patch
    from monai_trt.runtime.wrapper import EngineWrapper

    net = Composite()
    custom = types.MethodType(type(net.encoder).forward, net.encoder)
    net.encoder.forward = custom
    monai_trt.apply(net, [{**ORT, "submodule": "encoder"}])
    (entry,) = parse_patch([{**ORT, "submodule": "encoder"}])
    net.encoder.forward = EngineWrapper(net.encoder, entry)
    assert net.encoder.__dict__["forward"].previous_forward is custom
    monai_trt.remove(net)
    assert net.encoder.__dict__["forward"] is custom


# ------------------------------------------------------------------------------- 12. names and unused wrappers
def test_messages_name_the_config_id_and_default_labels_differ(x, trt_logs):
    """Case 12: `name=` puts the config id in every label; without it, the class name keeps labels apart."""
    net = monai_trt.apply(Composite().eval(), [{**ORT, "submodule": "encoder"}], name="autoencoder")
    run(net, torch.randn(1, 1, 8, 8, 8))
    text = trt_logs.text()
    assert "monai_trt 'autoencoder.encoder' (onnxruntime, fp32) will build" in text
    assert "monai_trt 'autoencoder.encoder' (onnxruntime, fp32): engine ready" in text
    one = monai_trt.wrappers(monai_trt.apply(TinySeg(), [ORT]))[""].label
    other = monai_trt.wrappers(monai_trt.apply(Composite(), [ORT]))[""].label
    assert one == "monai_trt 'TinySeg' (onnxruntime, fp32)" and other == "monai_trt 'Composite' (onnxruntime, fp32)"
    with pytest.raises(PatchError, match="name must be the network's config id"):
        monai_trt.apply(TinySeg(), [ORT], name="")


def test_wrappers_that_never_served_a_call_are_reported_once(x, trt_logs):
    """Case 12: a patched module whose caller bypasses forward is named in the end-of-run report."""
    net = monai_trt.apply(Bypassing().eval(), [{**ORT, "submodule": "block"}], name="network")
    served = monai_trt.apply(TinySeg().eval(), [ORT], name="other")
    run(net, x)
    run(served, x)
    assert calls(net, "block") == {"engine": 0, "pytorch": 0}
    assert report_unused() == ["monai_trt 'network.block' (onnxruntime, fp32)"]
    assert "never served a call" in trt_logs.text(logging.WARNING)
    assert report_unused() == []  # once


def test_never_served_wrappers_are_reported_when_the_process_exits(tmp_path):
    """Case 12: the report runs by itself at exit (what a `python -m monai.bundle run` would show)."""
    code = ("import torch, monai_trt; from tests.nets import Bypassing, TinySeg\n"
            "net = monai_trt.apply(Bypassing().eval(), [{'submodule': 'block', 'method': 'onnxruntime'}], "
            "name='network')\n"
            "copies = [monai_trt.apply(TinySeg(), {'method': 'onnxruntime'}, name='template')]\n"
            "copies.append(__import__('copy').deepcopy(copies[0]).to('meta'))\n"
            "with torch.no_grad():\n"
            "    net(torch.randn(1, 1, 4, 4, 4))\n"
            "    copies[1](torch.empty(1, 1, 4, 4, 4, device='meta'))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MONAI_TRT_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "never served a call" in line]
    assert len(lines) == 1 and "monai_trt 'network.block' (onnxruntime, fp32)" in lines[0]
    assert "template" not in lines[0]  # its copy served a call: the template was used


def test_build_reports_wrappers_that_never_served_a_call(tmp_path):
    """Case 12: `python -m monai_trt build` names the wrapper its forward calls never reached."""
    from monai_trt.bundle.build import build_engines
    from monai_trt.bundle.load import Bundle
    from monai_trt.patch.spec import parse_patch

    raw = [{**ORT, "submodule": "block"}]
    fmt = {"inputs": {"image": {"num_channels": 1, "spatial_shape": [8, 8, 8], "dtype": "float32"}}}
    bundle = Bundle(root=tmp_path, name="b", metadata={"network_data_format": fmt}, meta_file=None,
                    network=Bypassing().eval(), weights=None, patch=parse_patch(raw), raw_patch=raw, config={},
                    net_id="network")
    engines, failures = build_engines(bundle)
    assert engines == [] and len(failures) == 1
    assert failures[0].startswith("monai_trt 'network.block' (onnxruntime, fp32): never served a call")
    assert report_unused() == []  # build reported it: not again at exit
