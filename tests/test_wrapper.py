"""The engine wrapper with real onnxruntime / AOTInductor engines: lazy build, reuse, keys, I/O, fallback."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from monai.inferers import SlidingWindowInferer

import monai_trt
from monai_trt.errors import EngineBuildError
from tests.nets import Composite, DataDependent, MultiIO, TinySeg

ORT = {"method": "onnxruntime", "precision": "fp32"}


def entries(cache_dir: str) -> list[str]:
    root = Path(cache_dir) / "entries"
    return sorted(os.listdir(root)) if root.exists() else []


def run(net, *args, **kwargs):
    with torch.no_grad():
        return net(*args, **kwargs)


def reference(net, *args, **kwargs):
    plain = copy.deepcopy(net)
    monai_trt.remove(plain)
    return run(plain, *args, **kwargs)


@pytest.fixture
def x():
    return torch.randn(2, 1, 12, 12, 12, generator=torch.Generator().manual_seed(0))


def test_first_call_builds_and_matches_pytorch(cache_dir, x, trt_logs):
    net = monai_trt.apply(TinySeg().eval(), [ORT])
    out = run(net, x)
    torch.testing.assert_close(out, reference(net, x), rtol=1e-4, atol=1e-5)
    assert len(entries(cache_dir)) == 1
    assert "building onnxruntime engine" in trt_logs.text()
    assert monai_trt.wrappers(net)[""].builds == 1


def test_outputs_are_fresh_tensors(x):
    net = monai_trt.apply(TinySeg().eval(), [ORT])
    first = run(net, x)
    kept = first.clone()
    second = run(net, x * 2)
    assert torch.equal(first, kept)
    assert first.data_ptr() != second.data_ptr()


def test_second_run_reuses_engine(cache_dir, x, trt_logs):
    net = TinySeg().eval()
    run(monai_trt.apply(net, [ORT]), x)
    again = monai_trt.apply(copy.deepcopy(net), [ORT])  # a fresh wrapper, as in a new process
    run(again, x)
    assert monai_trt.wrappers(again)[""].builds == 0
    assert "using cached engine" in trt_logs.text()
    assert len(entries(cache_dir)) == 1
    usage = (Path(cache_dir) / "entries" / entries(cache_dir)[0] / "usage.json").read_text()
    assert '"hits": 2' in usage


@pytest.mark.parametrize(
    "change",
    [
        {"precision": "fp16"},
        {"build_args": {"graph_optimization_level": "basic"}},
        {"dynamic_batchsize": [1, 2, 4]},
        {"export_args": {"opset_version": 17}},
    ],
)
def test_changing_what_matters_gives_a_new_key(cache_dir, x, change):
    net = TinySeg().eval()
    run(monai_trt.apply(net, [ORT]), x)
    run(monai_trt.apply(copy.deepcopy(net), [{**ORT, **change}]), x)
    assert len(entries(cache_dir)) == 2


def test_same_entry_elsewhere_or_other_tolerance_keeps_the_key(cache_dir, x):
    net = TinySeg().eval()
    run(monai_trt.apply(net, [ORT]), x)
    run(monai_trt.apply(copy.deepcopy(net), [{**ORT, "tolerance": 0.5, "max_engines": 2}]), x)
    assert len(entries(cache_dir)) == 1


def test_changing_submodule_gives_a_new_key(cache_dir):
    net = Composite().eval()
    x = torch.randn(1, 1, 8, 8, 8)
    run(monai_trt.apply(net, [{**ORT, "submodule": "encoder"}]), x)
    run(monai_trt.apply(net, [{**ORT, "submodule": "decoder.head"}]), x)
    assert len(entries(cache_dir)) == 2


def test_new_weights_never_reuse_the_old_engine(cache_dir, x):
    net = monai_trt.apply(TinySeg().eval(), [ORT])
    run(net, x)
    net.load_state_dict(TinySeg().state_dict())  # in place, as CheckpointLoader does
    out = run(net, x)
    torch.testing.assert_close(out, reference(net, x), rtol=1e-4, atol=1e-5)
    assert len(entries(cache_dir)) == 2


def test_changing_input_shape_builds_another_engine_up_to_max_engines(cache_dir, trt_logs):
    net = monai_trt.apply(TinySeg().eval(), [{**ORT, "max_engines": 2}])
    for size in (8, 10, 12):
        x = torch.randn(1, 1, size, size, size)
        torch.testing.assert_close(run(net, x), reference(net, x), rtol=1e-4, atol=1e-5)
    assert len(entries(cache_dir)) == 2
    assert "max_engines" in trt_logs.text()


def test_dynamic_batch_serves_smaller_batches_and_refuses_outside_range(cache_dir, trt_logs):
    net = monai_trt.apply(TinySeg().eval(), [{**ORT, "dynamic_batchsize": [1, 2, 3]}])
    for batch in (3, 1, 2, 5):
        x = torch.randn(batch, 1, 8, 8, 8)
        torch.testing.assert_close(run(net, x), reference(net, x), rtol=1e-4, atol=1e-5)
    assert len(entries(cache_dir)) == 1
    assert "batch size 5 is outside dynamic_batchsize [1, 2, 3]" in trt_logs.text()


def test_input_profiles_pick_the_matching_range(cache_dir):
    profiles = [{"x": [[1, 1, 8, 8, 8], [1, 1, 8, 8, 8], [2, 1, 8, 8, 8]]},
                {"x": [[1, 1, 16, 16, 16], [2, 1, 16, 16, 16], [4, 1, 16, 16, 16]]}]
    net = monai_trt.apply(TinySeg().eval(), [{**ORT, "input_profiles": profiles}])
    for shape in ((2, 1, 8, 8, 8), (3, 1, 16, 16, 16), (1, 1, 16, 16, 16)):
        x = torch.randn(*shape)
        torch.testing.assert_close(run(net, x), reference(net, x), rtol=1e-4, atol=1e-5)
    assert len(entries(cache_dir)) == 2


def test_sliding_window_with_a_smaller_last_batch():
    net = monai_trt.apply(TinySeg().eval(), [{**ORT, "dynamic_batchsize": [1, 4, 4]}])
    batches = []
    net.register_forward_pre_hook(lambda _, args: batches.append(args[0].shape[0]))
    inferer = SlidingWindowInferer(roi_size=(8, 8, 8), sw_batch_size=4, overlap=0.25)
    volume = torch.randn(1, 1, 20, 14, 8)  # 3 x 2 x 1 = 6 windows: batches of 4 and 2
    with torch.no_grad():
        out = inferer(volume, net)
    assert batches[-1] < 4 and set(batches[:-1]) == {4}
    with torch.no_grad():
        ref = inferer(volume, monai_trt.remove(copy.deepcopy(net)))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert monai_trt.wrappers(net)[""].builds == 1


@pytest.mark.parametrize("method", ["onnxruntime", "aoti"])
def test_multi_input_multi_dtype_kwargs_and_structured_outputs(method):
    net = monai_trt.apply(MultiIO().eval(), [{"method": method, "precision": "fp32"}])
    image, labels = torch.randn(2, 2, 6, 6), torch.tensor([1, 7])
    scale = torch.tensor(0.5)
    out, extra = run(net, image, labels, scale=scale, mode="diff")
    ref_out, ref_extra = reference(net, image, labels, scale=scale, mode="diff")
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    assert set(extra) == {"pooled", "argmax"}
    assert extra["argmax"].dtype == torch.int64
    torch.testing.assert_close(extra["pooled"], ref_extra["pooled"], rtol=1e-4, atol=1e-5)
    assert torch.equal(extra["argmax"], ref_extra["argmax"])
    wrapper = monai_trt.wrappers(net)[""]
    # a different constant (mode) or a None keyword is another call layout → another engine, still correct
    out2, _ = run(net, image, labels, mode="sum")
    torch.testing.assert_close(out2, reference(net, image, labels, mode="sum")[0], rtol=1e-4, atol=1e-5)
    assert wrapper.builds == 2


def test_float64_input_is_refused_like_pytorch_then_cast_once_an_engine_exists():
    net = monai_trt.apply(TinySeg().eval(), [ORT])
    x64 = torch.randn(1, 1, 8, 8, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="should be the same"):
        run(net, x64)  # no engine yet: PyTorch's own error, unchanged
    wrapper = monai_trt.wrappers(net)[""]
    assert not wrapper.disabled
    run(net, x64.float())
    out = run(net, x64)
    assert out.dtype == torch.float32 and wrapper.builds == 1
    torch.testing.assert_close(out, reference(net, x64.float()), rtol=1e-4, atol=1e-5)


def test_autocast_returns_the_dtype_pytorch_would(x):
    net = monai_trt.apply(TinySeg().eval(), [{**ORT, "precision": "fp16"}])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(net, x)
        ref = reference(net, x)
    assert out.dtype == ref.dtype == torch.bfloat16
    with torch.inference_mode():
        assert net(x).dtype == torch.float32
    wrapper = monai_trt.wrappers(net)[""]
    assert wrapper.calls == {"engine": 2, "pytorch": 0} and not wrapper.disabled  # the engine served both


def test_training_mode_runs_pytorch(cache_dir, x):
    net = monai_trt.apply(TinySeg().train(), [ORT])
    out = net(x)
    assert out.requires_grad
    assert entries(cache_dir) == []


def test_unexportable_submodule_falls_back_once_with_a_warning(trt_logs):
    net = monai_trt.apply(DataDependent().eval(), [ORT])
    x = torch.randn(3, 4)
    torch.testing.assert_close(run(net, x), reference(net, x))
    torch.testing.assert_close(run(net, -x), reference(net, -x))
    warnings = [r.getMessage() for r in trt_logs.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "'DataDependent' (onnxruntime, fp32)" in warnings[0] and "falling back to PyTorch" in warnings[0]
    assert monai_trt.wrappers(net)[""].disabled


def test_fallback_false_raises_the_build_error():
    net = monai_trt.apply(DataDependent().eval(), [{**ORT, "fallback": False}])
    with pytest.raises(EngineBuildError, match="control flow depends on its inputs"):
        run(net, torch.randn(3, 4))


def test_an_engine_that_disagrees_with_pytorch_is_never_used(monkeypatch, x, trt_logs):
    from monai_trt.backends.onnxruntime import OnnxRuntimeBackend

    real_load = OnnxRuntimeBackend.load

    def wrong_load(self, entry_dir, meta, device, **options):
        engine = real_load(self, entry_dir, meta, device, **options)
        return lambda inputs: [o * 1.5 for o in engine(inputs)]

    monkeypatch.setattr(OnnxRuntimeBackend, "load", wrong_load)
    net = monai_trt.apply(TinySeg().eval(), [ORT])
    torch.testing.assert_close(run(net, x), reference(net, x))
    assert "disagrees with PyTorch" in trt_logs.text()



def test_an_engine_right_only_on_its_first_run_is_never_used(monkeypatch, x, trt_logs):
    """Validation runs the engine twice: one that carries state between runs (seen on an H200: an Inductor engine
    that answered right once, then NaN on every later run) is refused before it serves a call."""
    from monai_trt.backends.onnxruntime import OnnxRuntimeBackend

    real_load = OnnxRuntimeBackend.load

    def stateful_load(self, entry_dir, meta, device, **options):
        engine = real_load(self, entry_dir, meta, device, **options)
        runs = []

        def call(inputs):
            runs.append(1)
            outputs = engine(inputs)
            return outputs if len(runs) == 1 else [torch.full_like(o, float("nan")) for o in outputs]

        return call

    monkeypatch.setattr(OnnxRuntimeBackend, "load", stateful_load)
    net = monai_trt.apply(TinySeg().eval(), [ORT])
    for _ in range(2):
        torch.testing.assert_close(run(net, x), reference(net, x))
    assert "disagrees with PyTorch on its second run with the same inputs" in trt_logs.text()
    assert monai_trt.wrappers(net)[""].calls == {"engine": 0, "pytorch": 2}

def test_corrupt_entry_is_moved_aside_and_rebuilt(cache_dir, x, trt_logs):
    net = TinySeg().eval()
    run(monai_trt.apply(net, [ORT]), x)
    (key,) = entries(cache_dir)
    onnx_file = Path(cache_dir) / "entries" / key / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:100])  # truncated
    again = monai_trt.apply(copy.deepcopy(net), [ORT])
    torch.testing.assert_close(run(again, x), reference(net, x), rtol=1e-4, atol=1e-5)
    assert monai_trt.wrappers(again)[""].builds == 1
    assert "does not match its sha256" in trt_logs.text()
    assert len(os.listdir(Path(cache_dir) / "quarantine")) == 1


@pytest.mark.parametrize("damage", ["delete", "garble"])
def test_missing_or_garbled_meta_is_rebuilt(cache_dir, x, damage, trt_logs):
    net = TinySeg().eval()
    run(monai_trt.apply(net, [ORT]), x)
    meta = Path(cache_dir) / "entries" / entries(cache_dir)[0] / "meta.json"
    meta.unlink() if damage == "delete" else meta.write_text("{not json")
    again = monai_trt.apply(copy.deepcopy(net), [ORT])
    torch.testing.assert_close(run(again, x), reference(net, x), rtol=1e-4, atol=1e-5)
    assert monai_trt.wrappers(again)[""].builds == 1
    assert "meta.json is" in trt_logs.text()


def test_build_reports_its_phases_in_order(x):
    from monai_trt.events import reporting_to

    class Sink:
        def __init__(self) -> None:
            self.events: list[tuple[str, str | None]] = []

        def event(self, event) -> None:
            self.events.append((event.kind, event.phase))

    sink = Sink()
    net = monai_trt.apply(TinySeg().eval(), [ORT])
    with reporting_to(sink):
        run(net, x)
    assert sink.events == [
        ("phase", "building onnxruntime engine"), ("phase", "export"),
        ("phase", "engine build (ONNX Runtime session)"), ("phase", "save"), ("built", None),
    ]
    sink.events.clear()
    monai_trt.runtime.lifecycle._CACHES.clear()  # as a new process would
    again = TinySeg().eval()
    again.load_state_dict(net.state_dict())
    with reporting_to(sink):
        run(monai_trt.apply(again, [ORT]), x)
    assert sink.events == [("cache_hit", None)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: an input on another device than the module")
@pytest.mark.parametrize("module_device, input_device", [("cuda", "cpu"), ("cpu", "cuda")])
def test_input_on_another_device_gets_pytorchs_own_error(module_device, input_device, cache_dir):
    net = monai_trt.apply(TinySeg().eval().to(module_device), [{"method": "aoti", "precision": "fp32"}])
    x = torch.randn(2, 1, 8, 8, 8, device=input_device)
    plain = monai_trt.remove(copy.deepcopy(net))
    with pytest.raises(RuntimeError) as expected:
        run(plain, x)
    with pytest.raises(type(expected.value)):
        run(net, x)
    assert not monai_trt.wrappers(net)[""].disabled  # the caller's error, not the engine's: still enabled
    same = torch.randn(2, 1, 8, 8, 8, device=module_device)
    torch.testing.assert_close(run(net, same), run(plain, same), rtol=1e-4, atol=1e-4)


class Timestepped(torch.nn.Module):
    """Latents of batch N plus a one-element timestep shared by the batch (as MONAI's diffusion inferers pass)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * t.float().view(-1, 1, 1, 1)


def test_dynamic_batch_leaves_inputs_without_the_batch_dim_as_observed(cache_dir, trt_logs):
    net = monai_trt.apply(Timestepped().eval(), [{**ORT, "dynamic_batchsize": [2, 2, 4]}])
    t = torch.tensor([3])  # dim 0 of 1 lies outside [2, 4]: only the latents are batched
    for batch in (3, 2, 4):
        x = torch.randn(batch, 2, 6, 6)
        torch.testing.assert_close(run(net, x, t), reference(net, x, t), rtol=1e-4, atol=1e-5)
    assert len(entries(cache_dir)) == 1 and "runs in PyTorch" not in trt_logs.text()


def test_calls_count_how_each_call_was_served(cache_dir):
    net = monai_trt.apply(TinySeg().eval(), [{**ORT, "dynamic_batchsize": [1, 2, 2]}])
    for batch in (2, 1, 3):  # 3 lies outside the engine's range: PyTorch
        run(net, torch.randn(batch, 1, 8, 8, 8))
    assert monai_trt.wrappers(net)[""].calls == {"engine": 2, "pytorch": 1}


def test_one_engine_serves_every_smaller_batch_by_default(cache_dir):
    """A sliding window's last, smaller batch uses the engine built for the window batch: no second build."""
    net = monai_trt.apply(TinySeg().eval(), [ORT])
    for batch in (4, 3, 1):
        xb = torch.randn(batch, 1, 12, 12, 12)
        torch.testing.assert_close(run(net, xb), reference(net, xb), rtol=1e-4, atol=1e-5)
    wrapper = monai_trt.wrappers(net)[""]
    assert wrapper.builds == 1 and wrapper.calls == {"engine": 3, "pytorch": 0}
    assert len(entries(cache_dir)) == 1


@pytest.mark.parametrize("spin", [None, True])
def test_onnxruntime_threads_do_not_spin_between_calls_unless_asked(x, spin):
    """Spinning idle ORT threads took the cores the example bundle's evaluator needed between engine calls."""
    build_args = {} if spin is None else {"build_args": {"allow_spinning": spin}}
    net = monai_trt.apply(TinySeg().eval(), [{**ORT, **build_args}])
    run(net, x)
    (loaded,) = [e for engines in monai_trt.wrappers(net)[""].engines.values() for e in engines]
    options = loaded.engine._session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == ("1" if spin else "0")
