"""Rent before buy (runtime/rent.py): a warm process runs PyTorch until its calls have cost what taking the cached
engine costs, then takes it; PyTorch answers every rented call, so only speed can change."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import monai_trt
import monai_trt.runtime.lifecycle as lifecycle
from monai_trt.backends.onnxruntime import OnnxRuntimeBackend
from monai_trt.patch import parse_patch
from monai_trt.runtime.rent import RECORD, Rent
from tests.conftest import requires_cuda
from tests.nets import TinySeg

GATED = {"method": "onnxruntime", "precision": "fp32", "min_speedup": 1e-6}  # the gate on, the engine always serves


def _run(net, x):
    with torch.no_grad():
        return net(x)


def _twin(net: TinySeg) -> TinySeg:
    twin = TinySeg().eval()
    twin.load_state_dict(net.state_dict())
    return twin


def _records(cache_dir: str) -> list[Path]:
    return sorted((Path(cache_dir) / RECORD).glob("*.json"))


def _set_price(cache_dir: str, **fields: float) -> None:
    (path,) = _records(cache_dir)
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.fixture
def loads(monkeypatch) -> list[int]:
    """Counts engine loads of the onnxruntime backend."""
    counted: list[int] = []
    real = OnnxRuntimeBackend.load
    monkeypatch.setattr(OnnxRuntimeBackend, "load", lambda *a, **k: counted.append(1) or real(*a, **k))
    return counted


def _built(cache_dir: str) -> TinySeg:
    """A process that builds the engine (the gate measures it, the price is remembered), then a new process."""
    net = monai_trt.apply(TinySeg().eval(), [GATED])
    _run(net, torch.randn(2, 1, 12, 12, 12))
    assert monai_trt.wrappers(net)[""].calls == {"engine": 1, "pytorch": 0}
    lifecycle._CACHES.clear()
    return net


@pytest.fixture
def built(cache_dir, loads) -> TinySeg:
    net = _built(cache_dir)
    loads.clear()
    return net


def test_a_warm_process_runs_pytorch_until_the_engine_has_paid_for_itself(cache_dir, built, loads, trt_logs):
    net = built
    (record,) = [json.loads(p.read_text()) for p in _records(cache_dir)]
    assert record["price_s"] > 0 and record["pytorch_s"] > 0 and record["engine_s"] > 0
    _set_price(cache_dir, price_s=0.003, engine_s=0.001, pytorch_s=0.002)  # pays back after 3 calls

    x = torch.randn(2, 1, 12, 12, 12)
    expected = _run(monai_trt.remove(_twin(net)), x)
    again = monai_trt.apply(_twin(net), [GATED])
    wrapper = monai_trt.wrappers(again)[""]
    for _ in range(3):
        torch.testing.assert_close(_run(again, x), expected)
    assert wrapper.calls == {"engine": 0, "pytorch": 3} and loads == []
    assert wrapper.engine_set._state is None, "a rented call must not fingerprint the module (the price includes it)"
    assert "taken after 3 calls in PyTorch" in trt_logs.text()

    torch.testing.assert_close(_run(again, x), expected, rtol=1e-4, atol=1e-5)
    assert wrapper.calls == {"engine": 1, "pytorch": 3} and loads == [1]
    assert "after 3 calls in PyTorch" in trt_logs.text()
    (paid,) = [json.loads(p.read_text()) for p in _records(cache_dir)]
    assert paid["time"] > record["time"] and paid["entry"] == record["entry"], "a warm process remembers its price"
    _run(again, x)
    assert wrapper.calls == {"engine": 2, "pytorch": 3} and loads == [1]


@pytest.mark.parametrize("fields", [{"engine_s": 0.002, "pytorch_s": 0.002}, {"price_s": "soon"}, {"price_s": -1.0},
                                    {"entry": "../elsewhere"}])
def test_a_price_that_promises_nothing_rents_nothing(cache_dir, built, loads, fields):
    net = built
    _set_price(cache_dir, **{"price_s": 0.003, "engine_s": 0.001, "pytorch_s": 0.002, **fields})
    again = monai_trt.apply(_twin(net), [GATED])
    _run(again, torch.randn(2, 1, 12, 12, 12))
    assert monai_trt.wrappers(again)[""].calls == {"engine": 1, "pytorch": 0} and loads == [1]


def test_no_renting_for_an_engine_that_was_cleaned_away(cache_dir, built, loads):
    """The price is of taking a cached engine: once `clean` removed it, the first call builds, as without renting."""
    from monai_trt.cli import commands as cli

    _set_price(cache_dir, price_s=1.0, engine_s=0.001, pytorch_s=0.002)
    cli.clean(all=False, max_size=0, yes=True)
    assert not list((Path(cache_dir) / "entries").iterdir())
    again = monai_trt.apply(_twin(built), [GATED])
    _run(again, torch.randn(2, 1, 12, 12, 12))
    assert monai_trt.wrappers(again)[""].calls == {"engine": 1, "pytorch": 0}
    assert monai_trt.wrappers(again)[""].builds == 1


def test_a_network_of_the_same_class_with_other_sizes_has_its_own_price(cache_dir, built):
    _set_price(cache_dir, price_s=1.0, engine_s=0.001, pytorch_s=0.002)  # would rent 1000 calls
    wider = monai_trt.apply(TinySeg(out_ch=3).eval(), [GATED])
    _run(wider, torch.randn(2, 1, 12, 12, 12))
    assert monai_trt.wrappers(wider)[""].calls == {"engine": 1, "pytorch": 0}


def test_other_settings_or_layouts_have_their_own_price(cache_dir, built):
    net = built
    _set_price(cache_dir, price_s=1.0, engine_s=0.001, pytorch_s=0.002)  # would rent 1000 calls
    stricter = monai_trt.apply(_twin(net), [{**GATED, "tolerance": 1e-3}])  # another entry: no price known
    _run(stricter, torch.randn(2, 1, 12, 12, 12))
    assert monai_trt.wrappers(stricter)[""].calls == {"engine": 1, "pytorch": 0}
    (spec,) = parse_patch([GATED])
    rent = Rent(lambda: lifecycle.open_cache(cache_dir), net, spec, "test")
    layout = next(iter(monai_trt.wrappers(net)[""].engines))
    assert rent.renting(layout) and rent.rented(layout) == 1
    other = dataclasses.replace(layout, dtypes=("float16",))
    assert not rent.renting(other) and rent.rented(other) == 0


def test_renting_needs_the_speed_gate_and_a_plain_entry():
    net = TinySeg().eval()
    spec = {"method": "onnxruntime", "precision": "fp32"}
    for entry, rents in ((spec, False), ({**spec, "min_speedup": 1.01}, True), ({"method": "auto"}, True),
                         ({"method": "auto", "devices": ["cpu"]}, False),
                         ({"method": "auto", "submodule": "auto", "search_depth": 1}, False)):
        (parsed,) = parse_patch([entry])
        engine_set = lifecycle.EngineSet(net, net.forward, parsed, "test")
        assert (engine_set.rent is not None) is rents, entry


def test_a_builder_does_not_replace_a_price_paid_warm(cache_dir):
    net = _built(cache_dir)
    _set_price(cache_dir, price_s=0.5)
    (spec,) = parse_patch([GATED])
    rent = Rent(lambda: lifecycle.open_cache(cache_dir), net, spec, "test")
    layout = next(iter(monai_trt.wrappers(net)[""].engines))
    speed = {"engine_s": 0.001, "pytorch_s": 0.002}
    rent.bought(layout, "ab" * 32, 0.01, speed, measured_warm=False)
    assert json.loads(_records(cache_dir)[0].read_text())["price_s"] == 0.5
    rent.bought(layout, "ab" * 32, 0.25, speed, measured_warm=True)
    assert json.loads(_records(cache_dir)[0].read_text())["price_s"] == 0.25


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CLI test bundle runs on CUDA there (no onnxruntime engine)")
def test_building_ahead_of_time_takes_the_engine_however_few_calls_follow(tmp_path, cache_dir, capsys):
    """`python -m monai_trt build` on a warm cache reports the cached engine; it does not rent PyTorch."""
    from monai_trt.cli import commands as cli
    from tests.test_cli import make_bundle

    bundle = make_bundle(tmp_path / "b", patch=[{"submodule": "", **GATED, "dynamic_batchsize": [1, 2, 4]}])
    cli.build(bundle_root=str(bundle), json=True)
    assert json.loads(capsys.readouterr().out)["failures"] == []
    _set_price(cache_dir, price_s=1.0, engine_s=0.001, pytorch_s=0.002)  # a bundle run would rent 1000 calls
    lifecycle._CACHES.clear()
    cli.build(bundle_root=str(bundle), json=True)
    result = json.loads(capsys.readouterr().out)
    assert result["failures"] == [] and [e["built"] for e in result["engines"]] == [False]


@requires_cuda
def test_a_warm_process_takes_a_cuda_aoti_engine_after_its_rented_calls(cache_dir):
    """The same on a GPU with the engine `auto` picks there (`aoti`, CUDA graph replays): rented calls are
    PyTorch's, then the engine serves and agrees with PyTorch."""
    entry = {"method": "aoti", "precision": "fp32", "min_speedup": 1e-6}
    x = torch.randn(2, 1, 12, 12, 12, device="cuda")
    net = monai_trt.apply(TinySeg().eval().cuda(), [entry])
    _run(net, x)
    assert monai_trt.wrappers(net)[""].calls == {"engine": 1, "pytorch": 0}
    lifecycle._CACHES.clear()
    _set_price(cache_dir, price_s=0.002, engine_s=0.001, pytorch_s=0.002)  # pays back after 2 calls
    twin = TinySeg().eval()
    twin.load_state_dict(net.state_dict())
    expected = _run(monai_trt.remove(_twin(net)).cuda(), x)
    again = monai_trt.apply(twin.cuda(), [entry])
    for _ in range(5):
        torch.testing.assert_close(_run(again, x), expected, rtol=1e-3, atol=1e-4)
    assert monai_trt.wrappers(again)[""].calls == {"engine": 3, "pytorch": 2}
