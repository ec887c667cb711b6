"""apply/remove: wrapping in place keeps state_dict keys, strict checkpoint loads, no double wrapping."""

from __future__ import annotations

import copy

import pytest
import torch

import monai_trt
from monai_trt.errors import BackendUnavailable, PatchError
from tests.nets import Composite, TinySeg

ORT = {"method": "onnxruntime", "precision": "fp32"}


def test_wrapping_keeps_state_dict_and_strict_load_before_and_after():
    net = Composite()
    keys = list(net.state_dict())
    checkpoint = copy.deepcopy(Composite().state_dict())
    monai_trt.apply(net, [{**ORT, "submodule": "encoder"}])
    assert list(net.state_dict()) == keys
    net.load_state_dict(checkpoint, strict=True)  # after wrapping: the bundle's CheckpointLoader path
    assert torch.equal(net.encoder[0].weight, checkpoint["encoder.0.weight"])
    monai_trt.remove(net)
    net.load_state_dict(checkpoint, strict=True)
    assert list(net.state_dict()) == keys


def test_forward_is_redirected_on_the_instance_only():
    net, other = Composite(), Composite()
    monai_trt.apply(net, [{**ORT, "submodule": "decoder.head"}])
    assert set(monai_trt.wrappers(net)) == {"decoder.head"}
    assert "forward" in net.decoder["head"].__dict__
    assert "forward" not in other.decoder["head"].__dict__


def test_apply_twice_does_not_double_wrap_and_new_patch_replaces():
    net = Composite()
    monai_trt.apply(net, [{**ORT, "submodule": "encoder"}])
    first = monai_trt.wrappers(net)["encoder"]
    monai_trt.apply(net, [{**ORT, "submodule": "encoder"}])
    assert monai_trt.wrappers(net)["encoder"] is first
    monai_trt.apply(net, [{**ORT, "submodule": "decoder.head"}])
    assert set(monai_trt.wrappers(net)) == {"decoder.head"}
    assert "forward" not in net.encoder.__dict__


def test_remove_restores_a_previous_instance_forward():
    net = TinySeg()

    def custom(x):
        return torch.zeros(1)

    net.forward = custom
    monai_trt.apply(net, [ORT])
    monai_trt.remove(net)
    assert net.forward is custom


@pytest.mark.parametrize("enabled", [False, "false", 0, "off"])
def test_switch_off_removes_wrapping(enabled):
    net = Composite()
    monai_trt.apply(net, [ORT])
    monai_trt.apply(net, [ORT], enabled=enabled)
    assert monai_trt.wrappers(net) == {}


def test_env_switch_overrides_enabled(monkeypatch):
    net = Composite()
    monkeypatch.setenv("MONAI_TRT", "0")
    monai_trt.apply(net, [ORT], enabled=True)
    assert monai_trt.wrappers(net) == {}
    monkeypatch.setenv("MONAI_TRT", "1")
    monai_trt.apply(net, [ORT], enabled=False)
    assert set(monai_trt.wrappers(net)) == {""}


def test_unknown_submodule_lists_nearest_names():
    expected = r"submodule 'decoder.haed' not found in Composite; nearest valid names: \['decoder.head'"
    with pytest.raises(PatchError, match=expected):
        monai_trt.apply(Composite(), [{"submodule": "decoder.haed"}])


def test_bad_input_leaves_network_untouched():
    net = Composite()
    monai_trt.apply(net, [{**ORT, "submodule": "encoder"}])
    with pytest.raises(PatchError):
        monai_trt.apply(net, [{**ORT, "submodule": "nope"}])
    assert set(monai_trt.wrappers(net)) == {"encoder"}


def test_unknown_build_arg_lists_accepted_keys():
    expected = r"build_args \['workspace'\] are not accepted by method 'onnxruntime'; accepted keys: \["
    with pytest.raises(PatchError, match=expected):
        monai_trt.apply(TinySeg(), [{**ORT, "build_args": {"workspace": 1}}])


def test_ill_typed_build_arg_is_refused():
    with pytest.raises(PatchError, match=r"build_args\['intra_op_num_threads'\] for method 'onnxruntime' must be int"):
        monai_trt.apply(TinySeg(), [{**ORT, "build_args": {"intra_op_num_threads": "two"}}])


def test_auto_accepts_any_backend_key_but_not_unknown_ones():
    monai_trt.apply(TinySeg(), [{"build_args": {"max_autotune": True}}])
    with pytest.raises(PatchError, match="not accepted by any method"):
        monai_trt.apply(TinySeg(), [{"build_args": {"bogus": 1}}])


def test_unsupported_precision_for_method_is_refused():
    with pytest.raises(PatchError, match="does not support precision 'bf16'"):
        monai_trt.apply(TinySeg(), [{"method": "onnxruntime", "precision": "bf16"}])


def test_not_a_module_is_refused():
    with pytest.raises(PatchError, match="needs a torch.nn.Module"):
        monai_trt.apply({"not": "a module"}, [ORT])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_unavailable_explicit_method_warns_or_raises(trt_logs):
    net = TinySeg()
    monai_trt.apply(net, [{"method": "onnx", "precision": "fp16"}])
    assert "method 'onnx' is not available on cpu" in trt_logs.text()
    with pytest.raises(BackendUnavailable, match="method 'onnx' is not available"):
        monai_trt.apply(TinySeg(), [{"method": "onnx", "fallback": False}])


def test_deepcopy_of_wrapped_network_is_wrapped_independently():
    net = Composite()
    monai_trt.apply(net, [{**ORT, "submodule": "encoder"}])
    clone = copy.deepcopy(net)
    assert monai_trt.wrappers(clone)["encoder"].module is clone.encoder
    assert monai_trt.wrappers(net)["encoder"].module is net.encoder


def test_refit_mode_is_checked_against_the_method():
    with pytest.raises(PatchError, match="method 'torch_trt' does not support refit 'identical'"):
        monai_trt.apply(TinySeg(), [{**ORT, "method": "torch_trt", "refit": "identical"}])
    assert monai_trt.wrappers(monai_trt.apply(TinySeg(), [{**ORT, "refit": "identical"}]))


def test_precision_auto_is_fp32_on_cpu():
    """CPUs without fast fp16 get fp32 engines by default; a CUDA module gets fp16 (resolved at apply)."""
    net = monai_trt.apply(TinySeg(), [{"method": "onnxruntime"}])
    assert monai_trt.wrappers(net)[""].spec.precision == "fp32"
    net = monai_trt.apply(TinySeg(), [{"method": "onnxruntime", "precision": "fp16"}])
    assert monai_trt.wrappers(net)[""].spec.precision == "fp16"
