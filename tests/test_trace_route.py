"""Networks torch.export cannot capture: a faithful traced export, or a remembered, explained refusal."""

from __future__ import annotations

import torch
from torch import nn

import monai_trt
import monai_trt.runtime.lifecycle
from monai_trt.export import trace

ORT = {"method": "onnxruntime", "precision": "fp32"}


class ArchitectureCode(nn.Module):
    """DiNTS-like: Python branches on a buffer (the searched architecture), never on the input's values."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("code", torch.tensor([1, 0, 1]))
        self.ops = nn.ModuleList(nn.Conv3d(2, 2, 3, padding=1) for _ in range(3))
        self.stem = nn.Conv3d(1, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        for i, op in enumerate(self.ops):
            if self.code[i]:
                y = y + torch.relu(op(y))
        return y


class InputBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.mean() > 0:  # depends on the input: a trace would answer for one path only
            return y * 2
        return -y


def _run(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net(x)


def _plain(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return monai_trt.remove(net)(x)


def test_decisions_on_buffers_are_fine_decisions_on_inputs_are_found():
    x = torch.randn(2, 1, 6, 6, 6)
    assert trace.input_dependent_decision(ArchitectureCode().eval(), [x]) is None
    found = trace.input_dependent_decision(InputBranch().eval(), [x])
    assert found is not None and found.startswith("__bool__() at") and "test_trace_route.py" in found


def test_buffer_control_flow_gets_a_traced_engine(trt_logs):
    net = ArchitectureCode().eval()
    reference = net.state_dict()
    wrapped = monai_trt.apply(net, [ORT])
    for batch in (3, 1):  # one engine serves the smaller batch too: the trace keeps dim 0 dynamic
        x = torch.randn(batch, 1, 6, 6, 6)
        out = _run(wrapped, x)
        again = ArchitectureCode().eval()
        again.load_state_dict(reference)
        torch.testing.assert_close(out, _run(again, x), rtol=1e-4, atol=1e-5)
    assert monai_trt.wrappers(wrapped)[""].calls == {"engine": 2, "pytorch": 0}
    assert "exported by tracing" in trt_logs.text()


def test_input_control_flow_is_refused_once_and_remembered(trt_logs, monkeypatch):
    x = torch.randn(2, 1, 6, 6, 6)
    net = InputBranch().eval()
    state = net.state_dict()
    wrapped = monai_trt.apply(net, [ORT])
    out = _run(wrapped, x)
    assert monai_trt.wrappers(wrapped)[""].calls == {"engine": 0, "pytorch": 1}
    torch.testing.assert_close(out, _plain(wrapped, x))
    assert "control flow depends on its inputs" in trt_logs.text() and "y.mean() > 0" in trt_logs.text()

    attempts = []
    real = trace.export_onnx_traced
    monkeypatch.setattr("monai_trt.export.program.export_onnx_traced",
                        lambda *a, **k: attempts.append(1) or real(*a, **k))
    monai_trt.runtime.lifecycle._CACHES.clear()  # as a new process would
    again = InputBranch().eval()
    again.load_state_dict(state)
    second = monai_trt.apply(again, [ORT])
    torch.testing.assert_close(_run(second, x), out)
    assert attempts == [] and "remembered from an earlier run" in trt_logs.text()
    assert monai_trt.wrappers(second)[""].calls == {"engine": 0, "pytorch": 1}

    third = monai_trt.apply(InputBranch().eval(), [ORT])  # other weights: another key, tried again (and refused)
    _run(third, x)
    assert attempts == [1]


class BatchBaked(nn.Module):
    """Control flow on a buffer (not exportable) and a Python int taken from the batch size (baked by a trace)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("code", torch.tensor([1]))
        self.conv = nn.Conv3d(1, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.code[0]:
            y = y + torch.ones(int(x.shape[0]), 1, 1, 1, 1)  # a trace keeps the first call's batch here
        return y


def test_a_trace_that_bakes_the_batch_size_is_refused(trt_logs):
    plain = BatchBaked().eval()
    x = torch.randn(3, 1, 6, 6, 6)
    expected = _run(plain, x)
    net = monai_trt.apply(plain, [ORT])
    torch.testing.assert_close(_run(net, x), expected)
    assert "depends on the size of a dynamic dimension" in trt_logs.text()
    assert monai_trt.wrappers(net)[""].calls["engine"] == 0
