"""No stale engine (issue 13, cases 1-4): what the cache key and the per-call check must see.

Engines are built with `validate: false` where the first-call comparison with PyTorch would otherwise hide a stale
engine; each test checks both that the output equals PyTorch's and that an engine (not PyTorch) served the call.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import subprocess
import sys
import types
from pathlib import Path

import monai
import numpy as np
import pytest
import torch
from monai.networks.nets import SwinUNETR
from torch import nn

import monai_trt
from monai_trt.runtime.content_check import EXACT_ELEMENTS
from monai_trt.runtime.stamps import architecture_fingerprint
from tests import nets
from tests.nets import ActBase, FlagSeg, TinySeg, WideSeg
from tests.test_wrapper import entries, reference, run

ORT = {"method": "onnxruntime", "precision": "fp32", "validate": False}  # validation would mask a stale engine


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0))


def wrapper(net: nn.Module) -> monai_trt.runtime.wrapper.EngineWrapper:
    return monai_trt.wrappers(net)[""]


def assert_matches_pytorch(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = run(net, x)
    torch.testing.assert_close(out, reference(net, x), rtol=1e-4, atol=1e-5)
    return out


def twin(net: nn.Module, **kwargs) -> nn.Module:
    """Another instance of `net`'s class built with `kwargs`, with `net`'s state_dict (persistent tensors)."""
    other = type(net)(**kwargs).eval()
    other.load_state_dict(net.state_dict())
    return monai_trt.apply(other, [ORT])


# ---------------------------------------------------------------- case 1: writes that bypass the version counter
def _negate_data(weight: torch.Tensor) -> None:
    weight.data.mul_(-1)  # what EMA helpers and hand-written loaders do


def _negate_numpy(weight: torch.Tensor) -> None:
    array = weight.detach().numpy()  # a numpy view: writes through it never touch the version counter
    np.negative(array, out=array)


@pytest.mark.parametrize("refit", ["none", "identical", "refit"])
@pytest.mark.parametrize("write", [_negate_data, _negate_numpy], ids=["data", "numpy"])
def test_weights_written_behind_the_version_counter_are_seen(refit, write, x):
    net = monai_trt.apply(WideSeg().eval(), [{**ORT, "refit": refit}])
    run(net, x)
    assert net.mid.weight.numel() > EXACT_ELEMENTS  # checked by statistics, not byte for byte
    version = net.mid.weight._version
    write(net.mid.weight)
    assert net.mid.weight._version == version  # the write really bypassed the counter
    assert_matches_pytorch(net, x)
    assert wrapper(net).calls == {"engine": 2, "pytorch": 0}
    assert wrapper(net).builds == (1 if refit == "refit" else 2)  # refit: the same engine, given the new weights


@pytest.mark.parametrize("tensor", ["mid.weight", "head.bias"], ids=["large", "small"])
def test_a_single_element_written_through_data_is_seen(tensor, x):
    net = monai_trt.apply(WideSeg().eval(), [ORT])
    run(net, x)
    net.get_parameter(tensor).data.view(-1)[1] += 0.5
    assert_matches_pytorch(net, x)
    assert wrapper(net).calls == {"engine": 2, "pytorch": 0} and wrapper(net).builds == 2


def test_a_write_behind_the_counter_before_a_first_autocast_call_rebuilds_rather_than_disables(x):
    """The per-call content check is read after the engine call is queued; a validation (here: the first call under
    autocast) must not run on its provisional answer, or it would blame the engine for the changed weights."""
    net = monai_trt.apply(WideSeg().eval(), [{"method": "onnxruntime", "precision": "fp16"}])  # validated
    run(net, x)
    _negate_data(net.mid.weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(net, x)
        expected = reference(net, x)
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)
    assert not wrapper(net).disabled
    assert wrapper(net).calls == {"engine": 2, "pytorch": 0} and wrapper(net).builds == 2


# ---------------------------------------------------------------- case 2: non-persistent buffers
def test_networks_differing_only_in_a_non_persistent_buffer_get_different_keys(x, cache_dir):
    first = monai_trt.apply(FlagSeg(gain=1.0).eval(), [ORT])
    run(first, x)
    second = twin(first, gain=3.0)  # equal state_dict: `gain` is not in it
    assert_matches_pytorch(second, x)
    assert len(entries(cache_dir)) == 2
    assert wrapper(second).calls == {"engine": 1, "pytorch": 0}


def test_a_changed_non_persistent_buffer_is_seen(x):
    net = monai_trt.apply(FlagSeg(gain=1.0).eval(), [ORT])
    run(net, x)
    net.gain.mul_(3.0)
    assert_matches_pytorch(net, x)
    assert wrapper(net).calls == {"engine": 2, "pytorch": 0} and wrapper(net).builds == 2


# ---------------------------------------------------------------- case 3: structure changed after the first call
def test_a_replaced_submodule_is_seen(x):
    net = monai_trt.apply(TinySeg().eval(), [ORT])
    run(net, x)
    net.head = nn.Conv3d(4, 3, 1)
    out = assert_matches_pytorch(net, x)
    assert out.shape == (1, 3, 8, 8, 8)
    assert wrapper(net).calls == {"engine": 2, "pytorch": 0} and wrapper(net).builds == 2


def test_a_submodule_added_deep_in_the_tree_is_seen(x):
    net = monai_trt.apply(TinySeg().eval(), [ORT])
    run(net, x)
    net.body.append(nn.Conv3d(4, 4, 1))
    assert_matches_pytorch(net, x)
    assert wrapper(net).calls == {"engine": 2, "pytorch": 0} and wrapper(net).builds == 2


def test_a_hook_added_to_a_submodule_is_seen(x):
    net = monai_trt.apply(TinySeg().eval(), [ORT])
    run(net, x)
    net.body.register_forward_hook(lambda module, args, out: out * 2)
    assert_matches_pytorch(net, x)
    assert wrapper(net).calls == {"engine": 2, "pytorch": 0} and wrapper(net).builds == 2


# ---------------------------------------------------------------- case 4: behaviour beyond tensors
def test_an_attribute_that_changes_forward_is_in_the_key(x, cache_dir):
    first = monai_trt.apply(FlagSeg(normalize=False).eval(), [ORT])
    run(first, x)
    second = twin(first, normalize=True)
    assert_matches_pytorch(second, x)
    assert len(entries(cache_dir)) == 2 and wrapper(second).calls == {"engine": 1, "pytorch": 0}


def test_flipping_an_attribute_after_the_build_is_seen(x):
    net = monai_trt.apply(FlagSeg(normalize=False).eval(), [ORT])
    run(net, x)
    net.normalize = True
    assert_matches_pytorch(net, x)
    assert wrapper(net).calls == {"engine": 2, "pytorch": 0} and wrapper(net).builds == 2


@pytest.mark.parametrize("flag", ["normalize", "use_flash_attention"])
def test_monai_swinunetr_flags_change_the_key(flag):
    """MONAI's own flags: equal weights and layers, other forward."""
    kwargs = {"in_channels": 1, "out_channels": 2, "feature_size": 12, "spatial_dims": 2, "depths": (1, 1, 1, 1),
              "num_heads": (1, 1, 1, 1)}
    on, off = SwinUNETR(**kwargs, **{flag: True}), SwinUNETR(**kwargs, **{flag: False})
    off.load_state_dict(on.state_dict())
    assert architecture_fingerprint(on) != architecture_fingerprint(off)


def _doubled(self: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    return nn.Conv3d.forward(self, x) * 2


def test_an_instance_level_forward_override_is_seen(x, cache_dir):
    base = TinySeg().eval()
    plain = monai_trt.apply(copy.deepcopy(base), [ORT])
    run(plain, x)
    overridden = copy.deepcopy(base)
    overridden.head.forward = types.MethodType(_doubled, overridden.head)
    monai_trt.apply(overridden, [ORT])
    assert_matches_pytorch(overridden, x)
    assert len(entries(cache_dir)) == 2
    plain.head.forward = types.MethodType(_doubled, plain.head)  # after the build: seen by the per-call check
    assert_matches_pytorch(plain, x)
    assert wrapper(plain).calls == {"engine": 2, "pytorch": 0}


def _leaky(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return nn.functional.leaky_relu(x, 0.5)


def _sigmoid_squash(x: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(x)


@pytest.mark.parametrize("target, name, replacement", [(ActBase, "act", _leaky), (nets, "squash", _sigmoid_squash)],
                         ids=["base class method", "module-level helper"])
def test_code_a_forward_reaches_is_in_the_key(target, name, replacement, x, cache_dir, monkeypatch):
    first = monai_trt.apply(FlagSeg().eval(), [ORT])
    run(first, x)
    monkeypatch.setattr(target, name, replacement)  # as an edited file in the next process would be
    second = twin(first)
    assert_matches_pytorch(second, x)
    assert len(entries(cache_dir)) == 2 and wrapper(second).calls == {"engine": 1, "pytorch": 0}


def test_monai_and_python_versions_are_in_the_key(x, cache_dir):
    run(monai_trt.apply(TinySeg().eval(), [ORT]), x)
    (key,) = entries(cache_dir)
    inputs = json.loads((Path(cache_dir) / "entries" / key / "meta.json").read_text())["key_inputs"]
    assert inputs["libraries"]["monai"] == monai.__version__
    assert inputs["libraries"]["python"] == platform.python_version()
    assert inputs["versions"]["onnxruntime"]  # the backend's own


# ---------------------------------------------------------------- what only refresh() sees
def test_refresh_sees_code_changed_after_the_build(x, monkeypatch):
    net = monai_trt.apply(FlagSeg().eval(), [ORT])
    run(net, x)
    monkeypatch.setattr(ActBase, "act", _leaky)  # code is not re-read per call
    monai_trt.refresh(net)
    assert_matches_pytorch(net, x)
    assert wrapper(net).calls == {"engine": 2, "pytorch": 0} and wrapper(net).builds == 2


def test_refresh_sees_a_write_the_per_call_check_misses(x):
    """Swapping two elements of a large tensor keeps its statistics; with weights on a coarse grid exactly so."""
    net = WideSeg().eval()
    with torch.no_grad():  # every sum of these is exact in float32, in any order: norm, sum, max cannot move
        levels = torch.tensor([-0.5, -0.25, 0.25, 0.5])
        picks = torch.randint(0, 4, net.mid.weight.shape, generator=torch.Generator().manual_seed(0))
        net.mid.weight.copy_(levels[picks])
    net = monai_trt.apply(net, [ORT])
    run(net, x)
    weight = net.mid.weight.data.view(-1)
    first, other = 0, int((weight != weight[0]).nonzero()[0])
    weight[first], weight[other] = weight[other].clone(), weight[first].clone()  # the documented blind spot
    stale = run(net, x)
    assert not torch.equal(stale, reference(net, x))  # if this fails, the per-call check got stronger: update README
    monai_trt.refresh(net)
    assert_matches_pytorch(net, x)
    assert wrapper(net).calls == {"engine": 3, "pytorch": 0} and wrapper(net).builds == 2


# ---------------------------------------------------------------- no false alarms, same key everywhere
def test_an_unchanged_module_is_never_rehashed(x, trt_logs):
    net = monai_trt.apply(FlagSeg().eval(), [ORT])
    for _ in range(3):
        run(net, x)
    net.train()
    net.eval()
    run(net, x)
    assert "fingerprints recomputed" not in trt_logs.text()
    assert wrapper(net).calls == {"engine": 4, "pytorch": 0} and wrapper(net).builds == 1


def test_wrapped_and_plain_modules_have_the_same_fingerprint():
    plain = FlagSeg()
    wrapped = monai_trt.apply(copy.deepcopy(plain), [ORT])
    assert architecture_fingerprint(plain) == architecture_fingerprint(wrapped)


_FRESH = """
import sys
if sys.argv[1] == "more":
    import monai.bundle, monai.transforms, monai_trt.cli  # other imports, other registries
import torch
from tests.nets import FlagSeg
from monai.networks.nets import UNet
from monai_trt.runtime import stamps
from monai_trt.runtime.stamps import architecture_fingerprint
torch.manual_seed(0)
print(architecture_fingerprint(FlagSeg()), architecture_fingerprint(UNet(3, 1, 2, (4, 8), (2,), num_res_units=1)))
"""


def test_the_fingerprint_is_the_same_in_another_process():
    """Another process, other imports, other hash seed: the same key (a cache hit, not a rebuild)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    outputs = [
        subprocess.run([sys.executable, "-c", _FRESH, imports], cwd=root, capture_output=True, text=True, check=True,
                       env={**env, "PYTHONHASHSEED": seed}).stdout.split()[-2:]
        for imports, seed in (("few", "1"), ("more", "2"))
    ]
    assert outputs[0] == outputs[1]
    assert outputs[0][0] == architecture_fingerprint(FlagSeg())  # and in this process (pytest, all test imports)
