"""Exporter chatter stays out of the user's log unless they ask for it (MONAI_TRT_DEBUG=1)."""

from __future__ import annotations

import logging

import torch

import monai_trt
from tests.nets import TinySeg

ORT = {"method": "onnxruntime", "precision": "fp32"}


class DataDependent(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # torch.export cannot capture this: the exporter dumps graphs on stderr
            return x * 2
        return x


def _run(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net(x)


def test_failed_export_warns_in_one_short_line_without_colour(capfd, caplog, trt_logs):
    net = monai_trt.apply(DataDependent().eval(), [ORT])
    with caplog.at_level(logging.INFO):
        _run(net, torch.randn(2, 3))
    out, err = capfd.readouterr()
    assert "def forward" not in out + err and "GraphModule" not in out + err
    assert "\x1b[" not in out + err
    warnings = [r.getMessage() for r in trt_logs.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "Could not guard on data-dependent expression" in warnings[0]
    assert "\x1b[" not in warnings[0] and len(warnings[0]) < 900
    assert monai_trt.wrappers(net)[""].calls == {"engine": 0, "pytorch": 1}


def test_debug_switch_shows_the_exporter_output(capfd, monkeypatch):
    monkeypatch.setenv("MONAI_TRT_DEBUG", "1")
    _run(monai_trt.apply(DataDependent().eval(), [ORT]), torch.randn(2, 3))
    out, err = capfd.readouterr()
    assert "def forward" in out + err


def test_successful_build_logs_nothing_from_the_exporters(caplog):
    net = monai_trt.apply(TinySeg().eval(), [ORT])
    with caplog.at_level(logging.INFO):
        _run(net, torch.randn(2, 1, 8, 8, 8))
    assert monai_trt.wrappers(net)[""].calls["engine"] == 1
    foreign = [r.name for r in caplog.records if not r.name.startswith("monai_trt")]
    assert not foreign, f"third-party records in the log: {sorted(set(foreign))}"
