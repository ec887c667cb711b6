"""CUDA graphs for `aoti` engines (`use_cuda_graph`): the bookkeeping on CPU with a capture double, the real thing on
CUDA (skipped without it)."""

from __future__ import annotations

import logging

import pytest
import torch

import monai_trt
from monai_trt.backends import cuda_graph
from monai_trt.backends.cuda_graph import GraphedEngine
from tests.conftest import requires_cuda
from tests.nets import TinySeg

CPU = torch.device("cpu")


def cpu_capture(run, pool, device):
    """A CPU stand-in for a CUDA graph: bound to the static buffers at capture, each replay recomputes from them into
    the static outputs (so an input that was not copied in, or an output handed out without a copy, shows)."""
    outputs = run()

    def replay() -> None:
        for static, fresh in zip(outputs, run()):
            static.copy_(fresh)

    return replay, outputs


class Affine:
    """An engine: two outputs, fresh tensors each call; counts its runs."""

    def __init__(self) -> None:
        self.runs = 0

    def __call__(self, inputs):
        self.runs += 1
        (x,) = inputs
        return [x * 2 + 1, x.sum(dim=0, keepdim=True)]


def test_replays_answer_each_calls_own_inputs_and_hand_out_copies():
    engine = GraphedEngine(Affine(), CPU, capture=cpu_capture)
    xs = [torch.randn(4, 3, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    answers = [engine([x]) for x in xs]
    for x, (doubled, summed) in zip(xs, answers):  # earlier answers are not overwritten by later replays
        torch.testing.assert_close(doubled, x * 2 + 1)
        torch.testing.assert_close(summed, x.sum(dim=0, keepdim=True))
    assert (engine.plain, engine.captures, engine.replays) == (1, 1, 3)


def test_each_input_layout_gets_its_own_graph_up_to_the_limit(monkeypatch, trt_logs):
    monkeypatch.setattr(cuda_graph, "MAX_GRAPHS", 2)
    engine = GraphedEngine(Affine(), CPU, capture=cpu_capture)
    for batch in (4, 2, 4, 2, 3, 3):
        x = torch.randn(batch, 3)
        torch.testing.assert_close(engine([x])[0], x * 2 + 1)
    assert (engine.captures, engine.replays, engine.plain) == (2, 2, 4)  # batch 3: no room, plain every time
    assert "2 input layouts captured in CUDA graphs" in trt_logs.text()


def test_a_failing_capture_turns_graphs_off_with_a_warning(trt_logs):
    def broken(run, pool, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    engine = GraphedEngine(Affine(), CPU, capture=broken)
    x = torch.randn(4, 3)
    for _ in range(3):
        torch.testing.assert_close(engine([x])[0], x * 2 + 1)
    assert engine.refused and engine.plain == 3 and engine.replays == 0
    assert "CUDA graphs turned off" in trt_logs.text(logging.WARNING)


def test_a_replay_that_disagrees_with_the_plain_run_turns_graphs_off(trt_logs):
    """An engine whose answer depends on host work a graph would not repeat (here: a Python counter)."""
    calls = {"n": 0}

    def host_dependent(inputs):
        calls["n"] += 1
        return [inputs[0] + calls["n"]]

    def frozen_capture(run, pool, device):  # a real graph replays the kernels with the values captured: no host work
        outputs = run()
        return (lambda: None), outputs

    engine = GraphedEngine(host_dependent, CPU, capture=frozen_capture)
    x = torch.zeros(2)
    torch.testing.assert_close(engine([x]), [x + 1])
    assert engine.refused and "disagreed" in engine.refused
    assert "CUDA graphs turned off" in trt_logs.text(logging.WARNING)
    torch.testing.assert_close(engine([x]), [x + 3])  # plain from now on


def test_forget_captures_again():
    inner = Affine()
    engine = GraphedEngine(inner, CPU, capture=cpu_capture)
    x = torch.randn(4, 3)
    engine([x]), engine([x])
    engine.forget()
    torch.testing.assert_close(engine([x])[0], x * 2 + 1)
    assert (engine.captures, engine.replays, engine.plain) == (2, 1, 2)


def test_use_cuda_graph_on_cpu_runs_without_graphs_and_says_so(trt_logs):
    """Explicitly asked for on CPU: a warning; left unset (the default), nothing is said."""
    net = monai_trt.apply(TinySeg().eval(), [{"method": "aoti", "precision": "fp32", "use_cuda_graph": True}])
    default = monai_trt.apply(TinySeg().eval(), [{"method": "aoti", "precision": "fp32"}])
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        want = net.__dict__["forward"].original(x)
        got = net(x)
        default(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    (loaded,) = [e for engines in net.__dict__["forward"].engine_set.by_layout.values() for e in engines]
    assert loaded.engine.graphs is None
    assert trt_logs.text(logging.WARNING).count("use_cuda_graph has no effect with method 'aoti' on cpu") == 1


@requires_cuda
@pytest.mark.parametrize("refit", ["none", "refit"])
def test_aoti_engine_replays_cuda_graphs_on_cuda(refit):
    """Real capture and replay: the engine serves every call, replays from the second call of a shape on, answers
    like PyTorch for new inputs each call; after a checkpoint swap (refit) the graphs are captured again."""
    torch.manual_seed(0)
    net = TinySeg().eval().cuda()
    wrapped = monai_trt.apply(net, [{"method": "aoti", "precision": "fp32", "use_cuda_graph": True, "refit": refit,
                                     "dynamic_batchsize": [1, 4, 4]}])
    wrapper = wrapped.__dict__["forward"]
    with torch.no_grad():
        for batch in (4, 4, 2, 4, 2):
            x = torch.randn(batch, 1, 16, 16, 16, device="cuda")
            torch.testing.assert_close(wrapped(x), wrapper.original(x), rtol=1e-3, atol=1e-3)
        (loaded,) = [e for engines in wrapper.engine_set.by_layout.values() for e in engines]
        graphs = loaded.engine.graphs
        assert graphs is not None and graphs.refused is None
        assert graphs.captures == 2 and graphs.replays >= 3
        assert wrapper.calls["pytorch"] == 0
        if refit == "refit":
            wrapped.load_state_dict({k: v * 0.5 for k, v in wrapped.state_dict().items()})
            for _ in range(2):
                x = torch.randn(4, 1, 16, 16, 16, device="cuda")
                torch.testing.assert_close(wrapped(x), wrapper.original(x), rtol=1e-3, atol=1e-3)
            assert graphs.captures == 3


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_split_across_two_gpus_replays_graphs_on_both():
    """The copy on cuda:1 captures from a worker thread whose caller's current device is cuda:0 (torch's shared
    default capture stream would be on the wrong device there)."""
    torch.manual_seed(0)
    wrapped = monai_trt.apply(TinySeg().eval().cuda(0), [{"method": "aoti", "precision": "fp32", "devices": [0, 1],
                                                          "dynamic_batchsize": [1, 4, 4]}])
    wrapper = wrapped.__dict__["forward"]
    with torch.no_grad():
        for _ in range(4):
            x = torch.randn(8, 1, 16, 16, 16, device="cuda:0")
            torch.testing.assert_close(wrapped(x), wrapper.original(x), rtol=1e-3, atol=1e-3)
    serving = [w for _, w in wrapper.replicas.replicas()]
    graphs = [e.engine.graphs for w in serving for engines in w.engine_set.by_layout.values() for e in engines]
    assert len(graphs) == 2 and all(g is not None and g.refused is None and g.replays >= 2 for g in graphs)
    assert wrapper.calls["pytorch"] == 0
