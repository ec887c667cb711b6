"""`submodule: auto`: the search finds the children that convert, remembers the plan, and a warm process probes
nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import monai_trt
import monai_trt.runtime.lifecycle
from monai_trt.backends import onnxruntime as ort_backend
from monai_trt.errors import PatchError
from monai_trt.patch import parse_patch

AUTO = {"submodule": "auto", "method": "onnxruntime", "precision": "fp32", "min_speedup": 0}


class Block(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv3d(c, c, 3, padding=1)
        self.norm = nn.InstanceNorm3d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.conv(x)))


class Branchy(nn.Module):
    """DiNTS-like at the top: which cells run depends on the input's values (neither export nor trace can take it);
    every cell exports on its own."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv3d(1, 4, 3, padding=1)
        self.cells = nn.ModuleList(Block() for _ in range(3))
        self.head = nn.Conv3d(4, 2, 3, padding=1)
        self.act = nn.ReLU()  # no parameters: never tried alone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        for cell in self.cells:
            y = cell(y) if y.mean() > -1e9 else y  # a decision on the input's values
        return self.act(self.head(y))


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Branchy().eval()


def _run(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net(x)


def _counting_builds(monkeypatch) -> list[str]:
    builds: list[str] = []
    original = ort_backend.OnnxRuntimeBackend.build

    def build(self, job, tmp):
        builds.append(job.label)
        return original(self, job, tmp)

    monkeypatch.setattr(ort_backend.OnnxRuntimeBackend, "build", build)
    return builds


def test_auto_spelling_is_validated():
    (entry,) = parse_patch({"submodule": "auto"})
    assert entry.submodule == "" and entry.search_depth == 4
    a, b = parse_patch({"submodule": "auto", "search_under": ["x", "y"], "search_depth": 2, "search_seconds": 60})
    assert (a.submodule, b.submodule, a.search_depth, a.search_seconds) == ("x", "y", 2, 60.0)
    with pytest.raises(PatchError, match="apply only to"):
        parse_patch({"submodule": "stem", "search_depth": 2})
    with pytest.raises(PatchError, match="search_depth"):
        parse_patch({"submodule": "auto", "search_depth": 0})
    with pytest.raises(PatchError, match="search_under"):
        parse_patch({"submodule": "auto", "search_under": []})


class InputBranch(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.inner = Block(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) if x.mean() > -1e9 else x


class BranchyAllTheWay(nn.Module):
    """Every level branches on the input's values, so only the depth budget stops the search."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = InputBranch(), InputBranch()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x)) if x.mean() > -1e9 else x


@pytest.fixture(scope="module")
def cold(tmp_path_factory):
    """One search in a fresh cache: (cache dir, the patched network, its input, PyTorch's output, builds tried)."""
    path = str(tmp_path_factory.mktemp("planner") / "cache")
    builds: list[str] = []
    original = ort_backend.OnnxRuntimeBackend.build

    def build(self, job, tmp):
        builds.append(job.label)
        return original(self, job, tmp)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ort_backend.OnnxRuntimeBackend, "build", build)
        x = torch.randn(2, 1, 8, 8, 8)
        expected = _run(_net(), x)
        net = monai_trt.apply(_net(), {**AUTO, "path": path}, name="network")
        first = _run(net, x)
    return path, net, x, expected, first, builds


ENGINES = ["cells.0", "cells.1", "cells.2", "head", "stem"]


def test_control_flow_at_the_top_converts_the_children(cold):
    path, net, x, expected, first, builds = cold
    torch.testing.assert_close(first, expected, rtol=1e-4, atol=1e-5)
    wrappers = monai_trt.wrappers(net)
    assert sorted(p for p, w in wrappers.items() if w.node.state == "engine") == ENGINES
    assert wrappers[""].node.state == "split" and "depends on its inputs" in wrappers[""].node.reason
    assert "act" not in wrappers  # no parameters: not tried on its own
    assert len(builds) == 6  # the root (export refused) and each child once
    torch.testing.assert_close(_run(net, x), expected, rtol=1e-4, atol=1e-5)
    assert all(wrappers[p].calls["engine"] == 2 for p in ENGINES)
    (record,) = (Path(path) / "plans").glob("*.json")
    nodes = json.loads(record.read_text())["nodes"]
    assert nodes[""]["state"] == "split" and nodes["cells.1"]["state"] == "engine"


def test_warm_process_probes_nothing(cold, monkeypatch, trt_logs):
    path, _, x, expected, _, _ = cold
    monai_trt.runtime.lifecycle._CACHES.clear()  # a new process: nothing in memory
    builds = _counting_builds(monkeypatch)
    exports: list[str] = []
    monkeypatch.setattr("monai_trt.export.trace.input_dependent_decision", lambda *a: exports.append("trace"))
    net = monai_trt.apply(_net(), {**AUTO, "path": path}, name="network")
    torch.testing.assert_close(_run(net, x), expected, rtol=1e-4, atol=1e-5)
    assert builds == [] and exports == []
    wrappers = monai_trt.wrappers(net)
    assert wrappers[""].search.loaded and wrappers[""].calls == {"engine": 0, "pytorch": 1}
    assert sorted(p for p, w in wrappers.items() if w.calls["engine"]) == ENGINES
    assert "using the plan found earlier" in trt_logs.text() and "searching" not in trt_logs.text()


def test_architecture_change_searches_again():
    x = torch.randn(1, 1, 6, 6, 6)
    net = monai_trt.apply(nn.Sequential(nn.Conv3d(1, 2, 3, padding=1)).eval(), AUTO)
    _run(net, x)
    assert monai_trt.wrappers(net)[""].node.state == "engine"
    monai_trt.runtime.lifecycle._CACHES.clear()
    same = monai_trt.apply(nn.Sequential(nn.Conv3d(1, 2, 3, padding=1)).eval(), AUTO)
    _run(same, x)
    assert monai_trt.wrappers(same)[""].search.loaded
    monai_trt.runtime.lifecycle._CACHES.clear()
    other = monai_trt.apply(nn.Sequential(nn.Conv3d(1, 3, 3, padding=1)).eval(), AUTO)
    _run(other, x)
    assert not monai_trt.wrappers(other)[""].search.loaded
    assert monai_trt.wrappers(other)[""].node.state == "engine"


def test_depth_budget_holds(monkeypatch):
    builds = _counting_builds(monkeypatch)
    torch.manual_seed(0)
    plain = BranchyAllTheWay().eval()
    x = torch.randn(2, 4, 6, 6, 6)
    expected = _run(plain, x)
    net = monai_trt.apply(plain, {**AUTO, "search_depth": 1})
    torch.testing.assert_close(_run(net, x), expected, rtol=1e-4, atol=1e-5)
    wrappers = monai_trt.wrappers(net)
    assert sorted(wrappers) == ["", "a", "b"]  # a.inner (depth 2) never tried
    assert all("search_depth reached" in wrappers[p].node.reason for p in ("a", "b"))
    assert len(builds) == 3


def test_vista3d_auto_covers_at_least_the_hand_patch(tmp_path):
    """VISTA3D (small encoder), class prompts through a sliding window: the search converts at least what the hand
    patch (`image_encoder.encoder`) converts, and the masks agree with PyTorch."""
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import vista3d132

    torch.manual_seed(0)
    network = vista3d132(encoder_embed_dim=8).eval()
    image = torch.rand(1, 1, 48, 32, 32, generator=torch.Generator().manual_seed(0))
    classes = torch.tensor([[1], [2], [3]])

    def infer() -> torch.Tensor:
        with torch.no_grad():
            return sliding_window_inference(image, [32, 32, 32], 1, network, 0.25, class_vector=classes,
                                            transpose=True)

    reference = infer()
    monai_trt.apply(network, {**AUTO, "path": str(tmp_path / "cache")}, name="network")
    result = infer()
    engines = [p for p, w in monai_trt.wrappers(network).items() if w.node.state == "engine"]
    assert any("image_encoder.encoder" == p or "image_encoder.encoder".startswith(p + ".") or p == ""
               for p in engines), engines
    assert ((result > 0) == (reference > 0)).float().mean() >= 0.99


def test_plan_command_searches_then_reads_the_plan(tmp_path):
    """`python -m monai_trt plan` on a tiny UNet bundle with `submodule: auto`: the first run searches, the second
    reads the remembered plan; both print the tree with time shares."""
    from tests.test_cli import CONFIGS, make_bundle, run_cli

    bundle = make_bundle(tmp_path / "bundle", patch=[{**AUTO}])
    args = ["monai_trt", "plan", "--bundle_root", str(bundle), "--config_file", CONFIGS]
    first = run_cli(args, tmp_path / "cache", tmp_path)
    assert first.returncode == 0, first.stderr
    assert "searched now" in first.stdout and "network: ENGINE" in first.stdout and "100 % of the time" in first.stdout
    second = run_cli([*args, "--json"], tmp_path / "cache", tmp_path)
    assert second.returncode == 0, second.stderr
    (found,) = json.loads(second.stdout)["plans"]
    assert found["remembered"] and found["nodes"][""]["state"] == "engine"


@pytest.mark.slow
def test_dints_like_bundle_with_input_dependent_top_converts_children(tmp_path):
    """Issue #19: a DiNTS bundle whose network also decides on the input's values at the top (tests/zoo_like.py,
    `dints_gated`), patched with `submodule: auto` and run through the real `monai.bundle run` CLI: the root stays
    in PyTorch (torch.export and the traced route both refuse it), its children become engines that serve every call,
    and the masks agree with a `--trt False` run."""
    from tests.bundle_cli import read_wrappers, report_wrappers_config
    from tests.zoo_like import agreement, make_bundle, read_outputs, run_cli

    bundle = make_bundle("dints_gated", tmp_path / "bundle")
    patch = tmp_path / "inference_trt_auto.json"
    patch.write_text(json.dumps({
        "+imports": ["$import monai_trt"], "trt": True,
        "trt_patch": [{"submodule": "auto", "precision": "fp32", "min_speedup": 0}],  # method auto: onnxruntime
        "+initialize": ["$monai_trt.apply(@network, @trt_patch, enabled=@trt, name='network')"],
    }))
    configs = [bundle.inference, patch, report_wrappers_config(tmp_path, "network")]
    log = run_cli(bundle, configs, tmp_path / "on", tmp_path / "cache")
    off_log = run_cli(bundle, configs, tmp_path / "off", tmp_path / "cache", "--trt", "False")

    served = read_wrappers(log)["network"]
    root = served.pop("<root>")
    assert root["state"] == "split" and root["engine"] == 0 and root["pytorch"] > 0, root
    assert "depends on its inputs" in log and "a traced graph would answer for one path only" in log
    engines = {p: c for p, c in served.items() if c["state"] == "engine"}
    assert "dints_space" in engines  # the cells (most parameters): exported by tracing, their decisions read no input
    assert all(c["engine"] == root["pytorch"] and c["pytorch"] == 0 for c in engines.values()), served
    assert read_wrappers(off_log) == {"network": {}} and "engine ready" not in off_log

    on, off = read_outputs(bundle, tmp_path / "on"), read_outputs(bundle, tmp_path / "off")
    assert 0.2 < float(np.mean(off[0] > 0)) < 0.8  # a mask that depends on the weights, not all one class
    assert agreement(on, off) >= 0.99
