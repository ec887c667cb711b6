"""Weight-stripped engines (`refit: identical | refit`) on the real engines here: aoti and onnxruntime (CPU)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import monai_trt
from monai_trt.backends import aoti as aoti_backend
from monai_trt.backends import onnxruntime as ort_backend
from monai_trt.errors import EngineBuildError, PatchError
from tests.nets import TinySeg
from tests.test_wrapper import entries, reference, run

METHODS = ["onnxruntime", "aoti"]



class BatchNormSeg(nn.Module):
    """Conv + batch norm (whose eval-mode scale and shift an exporter would fold) + a non-persistent buffer."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.norm = nn.BatchNorm3d(4)
        self.head = nn.Conv3d(4, 2, 1)
        self.register_buffer("gain", torch.rand(4) + 0.5, persistent=False)
        with torch.no_grad():
            self.norm.running_mean.uniform_(-1, 1)
            self.norm.running_var.uniform_(0.5, 2)
            self.norm.weight.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.conv(x)) * self.gain.view(1, 4, 1, 1, 1)) + torch.tensor(0.25)


def patch(method: str, refit: str = "refit", **extra) -> list[dict]:
    return [{"method": method, "precision": "fp32", "refit": refit, "dynamic_batchsize": [1, 2, 2], **extra}]


def meta_of(cache_dir: str) -> dict:
    (key,) = entries(cache_dir)
    return json.loads((Path(cache_dir) / "entries" / key / "meta.json").read_text())


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 1, 10, 10, 10, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", METHODS)
def test_swapped_checkpoint_is_refitted_without_a_rebuild(method, cache_dir, x, trt_logs):
    net = monai_trt.apply(BatchNormSeg(seed=1).eval(), patch(method))
    torch.testing.assert_close(run(net, x), reference(net, x), rtol=1e-4, atol=1e-5)
    net.load_state_dict(BatchNormSeg(seed=2).state_dict())  # in place, as CheckpointLoader does
    out = run(net, x)
    torch.testing.assert_close(out, reference(net, x), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out, reference(BatchNormSeg(seed=1).eval(), x), atol=1e-3)  # really new weights
    (wrapper,) = monai_trt.wrappers(net).values()
    assert wrapper.builds == 1 and len(entries(cache_dir)) == 1
    assert trt_logs.text().count("refitted engine") == 2  # once after build, once for the new weights
    assert meta_of(cache_dir)["key_inputs"]["weights"] == "refit"


@pytest.mark.parametrize("method", METHODS)
def test_another_process_with_other_weights_reuses_the_entry(method, cache_dir, x, trt_logs):
    first = monai_trt.apply(BatchNormSeg(seed=1).eval(), patch(method))
    run(first, x)
    second = monai_trt.apply(BatchNormSeg(seed=3).eval(), patch(method))
    monai_trt.runtime.lifecycle._CACHES.clear()  # as a new process would
    torch.testing.assert_close(run(second, x), reference(second, x), rtol=1e-4, atol=1e-5)
    (wrapper,) = monai_trt.wrappers(second).values()
    assert wrapper.builds == 0 and len(entries(cache_dir)) == 1
    assert "using cached engine" in trt_logs.text()


@pytest.mark.parametrize("method", METHODS)
def test_stored_engine_holds_no_weights(method, cache_dir, x):
    big = nn.Sequential(nn.Conv3d(1, 64, 3, padding=1), nn.Conv3d(64, 64, 3, padding=1), nn.Conv3d(64, 2, 1)).eval()
    weight_bytes = sum(p.numel() * 4 for p in big.parameters())  # ~450 kB
    net = monai_trt.apply(big, patch(method))
    run(net, x)
    entry = Path(cache_dir) / "entries" / entries(cache_dir)[0]
    stored = sum(f.stat().st_size for f in entry.iterdir() if f.name != "meta.json")
    baked_cache = Path(cache_dir).parent / "baked"
    baked = monai_trt.apply(big, patch(method, refit="none", path=str(baked_cache)))
    run(baked, x)
    baked_entry = next((baked_cache / "entries").iterdir())
    baked_size = sum(f.stat().st_size for f in baked_entry.iterdir() if f.name != "meta.json")
    assert baked_size - stored > 0.9 * weight_bytes


@pytest.mark.parametrize("method", ["onnxruntime"])  # aoti: same wrapper logic, slower build
def test_identical_rebuilds_for_other_weights(method, cache_dir, x, trt_logs):
    net = monai_trt.apply(TinySeg().eval(), patch(method, refit="identical"))
    run(net, x)
    net.load_state_dict(TinySeg().state_dict())
    torch.testing.assert_close(run(net, x), reference(net, x), rtol=1e-4, atol=1e-5)
    assert len(entries(cache_dir)) == 2
    assert "dropped" in trt_logs.text()


@pytest.mark.parametrize("method", METHODS)
def test_engine_missing_a_weight_is_never_run(method, x, monkeypatch, trt_logs):
    run(monai_trt.apply(BatchNormSeg(seed=1).eval(), patch(method)), x)  # builds the entry
    real = monai_trt.runtime.lifecycle.engine_weights

    def drop_one(*args, **kwargs):
        weights = real(*args, **kwargs)
        weights.pop(sorted(weights)[0])
        return weights

    monkeypatch.setattr(monai_trt.runtime.lifecycle, "engine_weights", drop_one)
    monai_trt.runtime.lifecycle._CACHES.clear()  # as a new process would
    net = monai_trt.apply(BatchNormSeg(seed=1).eval(), patch(method))
    torch.testing.assert_close(run(net, x), reference(net, x))  # exactly PyTorch: the fallback
    assert "weights the engine needs are missing" in trt_logs.text()
    with pytest.raises(EngineBuildError, match="weights the engine needs are missing"):
        run(monai_trt.apply(BatchNormSeg(seed=1).eval(), patch(method, fallback=False)), x)


@pytest.mark.parametrize("method", ["onnxruntime"])  # aoti: same wrapper logic, slower build
def test_unrefitted_engine_refuses_to_run(method, cache_dir, x):
    run(monai_trt.apply(TinySeg().eval(), patch(method)), x)
    entry = Path(cache_dir) / "entries" / entries(cache_dir)[0]
    meta = json.loads((entry / "meta.json").read_text())
    backend = {"aoti": aoti_backend.AotiBackend, "onnxruntime": ort_backend.OnnxRuntimeBackend}[method]()
    engine = backend.load(entry, meta, torch.device("cpu"))
    with pytest.raises(EngineBuildError, match="has not been refitted"):
        engine([x])


@pytest.mark.parametrize("method", ["onnxruntime"])  # aoti: same wrapper logic, slower build
def test_planted_stale_engine_is_refused(method, cache_dir, x, trt_logs):
    """An entry built with old weights, copied under the key of new weights (meta rewritten to match)."""
    old = monai_trt.apply(TinySeg().eval(), patch(method, refit="none"))
    run(old, x)
    (old_key,) = entries(cache_dir)
    new = monai_trt.apply(TinySeg().eval(), patch(method, refit="none"))
    new_key = _plant(cache_dir, old_key, new)
    out = run(new, x)
    torch.testing.assert_close(out, reference(new, x), rtol=1e-4, atol=1e-5)
    assert "disagrees with PyTorch" in trt_logs.text()
    assert new_key in entries(cache_dir)  # it verified (consistent meta), was loaded, and was refused


def _plant(cache_dir: str, old_key: str, new_net: nn.Module) -> str:
    """Copy the old entry under the key the new weights would use, with a meta that claims the new weights."""
    from monai_trt.cache.keys import engine_key
    from monai_trt.runtime.stamps import WeightsHasher

    root = Path(cache_dir) / "entries"
    meta = json.loads((root / old_key / "meta.json").read_text())
    inputs = {**meta["key_inputs"], "weights": WeightsHasher(new_net).digest()}
    new_key = engine_key(inputs)
    shutil.copytree(root / old_key, root / new_key)
    meta.update(key=new_key, key_inputs=inputs)
    (root / new_key / "meta.json").write_text(json.dumps(meta))
    return new_key


def test_refit_mode_needs_a_method_that_supports_it():
    with pytest.raises(PatchError, match="does not support refit 'refit'; methods that do: .*aoti"):
        monai_trt.apply(TinySeg(), [{"method": "torch_trt", "refit": "refit"}])


def test_cli_verify_refits_weightless_entries_with_the_bundle_weights(cache_dir, x):
    from monai_trt.bundle.build import verify_entries

    net = monai_trt.apply(TinySeg().eval(), patch("onnxruntime"))
    run(net, x)
    other = TinySeg().eval()  # another checkpoint of the same architecture
    (verdict,), others = verify_entries(other, [cache_dir])
    assert verdict.outcome == "pass", verdict.detail
