"""The speed gate and the remembered validation: measured once per engine and machine, kept in the cache."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

import monai_trt
import monai_trt.runtime.lifecycle as lifecycle
from monai_trt.backends.onnxruntime import OnnxRuntimeBackend
from monai_trt.patch import parse_patch
from tests.nets import TinySeg

ORT = {"method": "onnxruntime", "precision": "fp32"}


def _run(net, x):
    with torch.no_grad():
        return net(x)


def _new_process():
    lifecycle._CACHES.clear()  # as a new process would


def _forget_prices() -> None:
    for path in (Path(os.environ["MONAI_TRT_CACHE"]) / "loads").glob("*.json"):
        path.unlink()


def _twin(net: TinySeg) -> TinySeg:
    twin = TinySeg().eval()
    twin.load_state_dict(net.state_dict())
    return twin


FORWARDS: list[int] = []  # a mutable module-level object: not part of the key (a class attribute would be)


class CountingSeg(TinySeg):
    """Counts PyTorch forwards (engines do not run Python code)."""

    def forward(self, x):
        FORWARDS.append(1)
        return super().forward(x)


def test_gate_is_on_for_auto_and_off_for_a_named_method():
    assert parse_patch([{"method": "auto"}])[0].speed_gate == 1.01
    assert parse_patch([ORT])[0].speed_gate == 0
    assert parse_patch([{**ORT, "min_speedup": 1.2}])[0].speed_gate == 1.2


def test_an_engine_slower_than_pytorch_is_not_used_nor_loaded_again(trt_logs, monkeypatch):
    x = torch.randn(2, 1, 12, 12, 12)
    net = monai_trt.apply(TinySeg().eval(), [{**ORT, "min_speedup": 1000.0}])  # no engine is 1000x faster
    torch.testing.assert_close(_run(net, x), _run(monai_trt.remove(_twin(net)), x))
    _run(net, x)
    assert monai_trt.wrappers(net)[""].calls == {"engine": 0, "pytorch": 2}
    assert monai_trt.wrappers(net)[""].builds == 1
    assert trt_logs.text().count("not 1000.00x faster than PyTorch") == 1

    loads = []
    real = OnnxRuntimeBackend.load
    monkeypatch.setattr(OnnxRuntimeBackend, "load", lambda *a, **k: loads.append(1) or real(*a, **k))
    _new_process()
    again = monai_trt.apply(_twin(net), [{**ORT, "min_speedup": 1000.0}])
    _run(again, x)
    wrapper = monai_trt.wrappers(again)[""]
    assert wrapper.calls == {"engine": 0, "pytorch": 1} and wrapper.builds == 0 and loads == []
    assert "measured in an earlier run" in trt_logs.text()


def test_a_faster_engine_serves_and_is_not_measured_again(monkeypatch):
    x = torch.randn(2, 1, 12, 12, 12)
    net = monai_trt.apply(TinySeg().eval(), [{**ORT, "min_speedup": 1e-6}])
    _run(net, x)
    assert monai_trt.wrappers(net)[""].calls == {"engine": 1, "pytorch": 0}
    timed = []
    monkeypatch.setattr(lifecycle, "per_call_seconds", lambda *a, **k: timed.append(1) or 1.0)
    _forget_prices()  # a warm process would rent PyTorch first (test_rent.py)
    _new_process()
    again = monai_trt.apply(_twin(net), [{**ORT, "min_speedup": 1e-6}])
    _run(again, x)
    assert monai_trt.wrappers(again)[""].calls == {"engine": 1, "pytorch": 0} and timed == []


def test_a_cache_hit_skips_the_pytorch_forward_once_validated_here():
    x = torch.randn(2, 1, 12, 12, 12)
    net = monai_trt.apply(CountingSeg().eval(), [ORT])
    _run(net, x)
    assert monai_trt.wrappers(net)[""].calls["engine"] == 1
    _new_process()
    twin = CountingSeg().eval()
    twin.load_state_dict(net.state_dict())
    again = monai_trt.apply(twin, [ORT])
    FORWARDS.clear()
    torch.testing.assert_close(_run(again, x), _run(monai_trt.remove(_twin(net)), x), rtol=1e-4, atol=1e-5)
    assert len(FORWARDS) == 0, "a remembered validation must not run PyTorch again"
    assert monai_trt.wrappers(again)[""].calls == {"engine": 1, "pytorch": 0}

    _new_process()  # a stricter tolerance than the remembered validation used: validated again
    strict = CountingSeg().eval()
    strict.load_state_dict(net.state_dict())
    strict = monai_trt.apply(strict, [{**ORT, "tolerance": 1e-5}])
    FORWARDS.clear()
    _run(strict, x)
    assert len(FORWARDS) >= 1


def test_a_cache_hit_under_autocast_skips_the_pytorch_forward_and_keeps_pytorchs_dtypes():
    """Bundles run under AMP: a warm process must not pay a PyTorch forward there either (it did, 1.1-1.5 s on the
    SwinUNETR bundle on an H200), and its outputs keep the dtype PyTorch returns under that autocast dtype."""
    x = torch.randn(2, 1, 12, 12, 12)
    fp16 = {**ORT, "precision": "fp16"}
    net = monai_trt.apply(CountingSeg().eval(), [fp16])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _run(net, x).dtype == torch.bfloat16
    _new_process()
    twin = CountingSeg().eval()
    twin.load_state_dict(net.state_dict())
    again = monai_trt.apply(twin, [fp16])
    FORWARDS.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _run(again, x)
    assert len(FORWARDS) == 0, "a validation remembered under this autocast dtype must not run PyTorch again"
    assert out.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.float16):  # another autocast dtype: PyTorch's answer is learned anew
        out = _run(again, x)
        expected = _run(monai_trt.remove(_twin(net)), x)
    assert len(FORWARDS) >= 1 and out.dtype == expected.dtype == torch.float16
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)
    assert monai_trt.wrappers(again)[""].calls == {"engine": 2, "pytorch": 0}


def test_refit_engines_are_validated_after_every_refit():
    x = torch.randn(2, 1, 12, 12, 12)
    net = monai_trt.apply(CountingSeg().eval(), [{**ORT, "refit": "refit"}])
    _run(net, x)
    _new_process()
    twin = CountingSeg().eval()
    twin.load_state_dict(net.state_dict())
    again = monai_trt.apply(twin, [{**ORT, "refit": "refit"}])
    FORWARDS.clear()
    _run(again, x)
    assert len(FORWARDS) == 1 and monai_trt.wrappers(again)[""].calls == {"engine": 1, "pytorch": 0}


def test_the_gate_times_what_a_served_call_costs(monkeypatch):
    """The per-call check is part of every served call: a check slower than PyTorch's whole forward makes the
    engine not worth serving, however fast the engine alone is."""
    from monai_trt.runtime.stamps import ModuleState

    real = ModuleState.current
    slow = {"on": False}

    def current(self, *args, **kwargs):
        if slow["on"]:
            time.sleep(0.05)  # far more than TinySeg's forward on 12³
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ModuleState, "current", current)
    x = torch.randn(2, 1, 12, 12, 12)
    net = monai_trt.apply(TinySeg().eval(), [{**ORT, "min_speedup": 1.0}])
    original = lifecycle.EngineSet._time

    def timed(self, *args, **kwargs):
        slow["on"] = True
        try:
            return original(self, *args, **kwargs)
        finally:
            slow["on"] = False

    monkeypatch.setattr(lifecycle.EngineSet, "_time", timed)
    _run(net, x)
    speed = next(e for v in monai_trt.wrappers(net)[""].engines.values() for e in v).verdicts.speed
    assert speed["engine_s"] >= 0.05 and not speed["serve"]


def test_the_speed_verdict_is_kept_per_runtime(cache_dir):
    """A measurement with plain launches says nothing about CUDA graph replays (and back): each is measured once."""
    from monai_trt.runtime.verdicts import Verdicts

    cache, key, cpu = lifecycle.open_cache(cache_dir), "ab" * 32, torch.device("cpu")
    assert Verdicts(cache, key, cpu).record_speed(0.002, 0.001, 1.01) is False
    assert Verdicts(cache, key, cpu).speed["serve"] is False
    assert Verdicts(cache, key, cpu, "cuda_graph").speed is None
    assert Verdicts(cache, key, cpu, "cuda_graph").record_speed(0.0005, 0.001, 1.01) is True
    assert Verdicts(cache, key, cpu).speed["serve"] is False  # both kept
    assert Verdicts(cache, key, cpu, "cuda_graph").speed["serve"] is True


def test_fast_calls_are_timed_back_to_back_and_slow_ones_one_per_round():
    """A sliding window calls the network back to back: the gate times rounds of calls with one synchronisation each,
    enough calls for a round of about 20 ms (a call taking >= 1 ms: at most 20 per round; 30 ms: one)."""
    from monai_trt.runtime.verdicts import per_call_seconds

    for seconds, fewest, most in ((0.001, 1 + 1 + 3 * 5, 1 + 1 + 3 * 20), (0.03, 5, 5)):
        calls: list[int] = []
        per_call = per_call_seconds(lambda s=seconds, c=calls: c.append(1) or time.sleep(s), torch.device("cpu"))
        assert fewest <= len(calls) <= most and per_call >= seconds


def test_a_speed_verdict_timed_another_way_is_measured_again(cache_dir):
    """Verdicts recorded before calls were timed back to back (synchronised single calls: a small network's served
    call looked slower than it serves in a sliding window) do not decide anything now."""
    from monai_trt.runtime.verdicts import TIMING, Verdicts

    cache, key, cpu = lifecycle.open_cache(cache_dir), "cd" * 32, torch.device("cpu")
    verdicts = Verdicts(cache, key, cpu)
    verdicts.record_speed(0.002, 0.001, 1.01)
    record = verdicts._mine["speed"]
    assert record["timing"] == TIMING and Verdicts(cache, key, cpu).speed["serve"] is False
    del record["timing"]
    verdicts._save()
    assert Verdicts(cache, key, cpu).speed is None
