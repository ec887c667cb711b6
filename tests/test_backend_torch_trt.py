"""The `torch_trt` (Torch-TensorRT) backend, against the Torch-TensorRT double and, when present, the real one.

Double combinations: TensorRT 10 + Torch-TensorRT 2.5 (weak typing: enabled_precisions), TensorRT 10 +
Torch-TensorRT 2.14 (explicit typing by default) and TensorRT 11 + Torch-TensorRT 2.14 (explicit typing only).
Real runs are marked `tensorrt`: `pytest -m tensorrt tests/test_backend_torch_trt.py`.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch

import monai_trt
from monai_trt.backends import torch_trt as torch_trt_backend
from monai_trt.cache.store import EngineCache
from monai_trt.errors import PatchError
from tests.nets import TinySeg
from tests.trt_double import installed

COMBOS = [("10.13.0", "2.5.0"), ("10.13.0", "2.14.0"), ("11.4.0", "2.14.0")]
ENTRY = {"method": "torch_trt", "dynamic_batchsize": [1, 2, 4], "fallback": False}


def _real_torch_tensorrt() -> ModuleType | None:
    if not torch.cuda.is_available():
        return None
    try:
        return importlib.import_module("torch_tensorrt")
    except Exception:  # a broken install is "not available"
        return None


REAL = _real_torch_tensorrt()


@pytest.fixture(params=[*COMBOS, pytest.param("real", marks=[
    pytest.mark.tensorrt, pytest.mark.skipif(REAL is None, reason="needs Torch-TensorRT and CUDA")])])
def tt(request) -> Iterator[tuple[ModuleType, torch.device]]:
    """(torch_tensorrt module, device): a double combination on CPU, or the real package on CUDA."""
    if request.param == "real":
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch_trt_backend, "torch_tensorrt", REAL)
            patch.setattr(torch_trt_backend, "_HAS_TORCH_TRT", True)
            yield REAL, torch.device("cuda")
        return
    trt_version, torch_trt_version = request.param
    with installed(trt_version, torch_trt_version):
        yield importlib.import_module("torch_tensorrt"), torch.device("cpu")


@pytest.fixture(autouse=True)
def backend_state_is_restored() -> Iterator[None]:
    """Every test (and fixture) must leave the backend module as it found it."""
    before = (torch_trt_backend.torch_tensorrt, torch_trt_backend._HAS_TORCH_TRT)
    yield
    assert (torch_trt_backend.torch_tensorrt, torch_trt_backend._HAS_TORCH_TRT) == before


def seg(device: torch.device) -> TinySeg:
    torch.manual_seed(0)
    return TinySeg().eval().to(device)


def explicit(module: ModuleType) -> bool:
    return module.__version__ != "2.5.0"


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_matches_pytorch_and_gets_the_precision_settings(tt, precision) -> None:
    module, device = tt
    net = seg(device)
    x2, x1 = torch.randn(2, 1, 8, 8, 8, device=device), torch.randn(1, 1, 8, 8, 8, device=device)
    with torch.no_grad():
        expected = [net(x2), net(x1)]
        monai_trt.apply(net, [{**ENTRY, "precision": precision}])
        outputs = [net(x2), net(x1)]
    tolerance = 1e-4 if precision == "fp32" else 3e-2
    for out, ref in zip(outputs, expected):
        assert out.dtype == ref.dtype and float((out - ref).norm() / ref.norm()) < tolerance
    assert monai_trt.wrappers(net)[""].builds == 1
    if not hasattr(module, "COMPILES"):
        return
    settings = module.COMPILES[-1]
    assert settings["disable_tf32"] == (precision == "fp32")
    (spec,) = settings["inputs"]
    assert (spec.min_shape, spec.opt_shape, spec.max_shape) == ((1, 1, 8, 8, 8), (2, 1, 8, 8, 8), (4, 1, 8, 8, 8))
    half = precision == "fp16"
    if explicit(module):  # precision is in the graph
        assert settings["use_explicit_typing"] and set(settings["enabled_precisions"]) == {torch.float32}
        assert spec.dtype == (torch.float16 if half else torch.float32)
    else:  # fp32 graph, TensorRT may pick fp16 kernels
        assert not settings["use_explicit_typing"] and spec.dtype == torch.float32
        assert set(settings["enabled_precisions"]) == ({torch.float32, torch.float16} if half else {torch.float32})
    assert (settings["min_block_size"], settings["optimization_level"]) == (5, 3)


def test_saved_through_torch_tensorrt_and_loaded_from_the_cache(tt, cache_dir) -> None:
    _, device = tt
    x = torch.randn(2, 1, 8, 8, 8, device=device)
    with torch.no_grad():
        monai_trt.apply(seg(device), [{**ENTRY, "precision": "fp32"}])(x)
        again = monai_trt.apply(seg(device), [{**ENTRY, "precision": "fp32"}])
        out = again(x)
        expected = seg(device)(x)
    assert monai_trt.wrappers(again)[""].builds == 0
    assert torch.allclose(out, expected, atol=1e-4)
    (entry,) = list(EngineCache.open(cache_dir).entries())
    assert (entry / torch_trt_backend.ARTIFACT).is_file()
    reloaded = torch.export.load(str(entry / torch_trt_backend.ARTIFACT)).module()
    assert torch.allclose(reloaded(x)[0], expected, atol=1e-4)


@pytest.mark.parametrize("tt", [COMBOS[0]], indirect=True)
@pytest.mark.parametrize("build_args, match", [
    ({"compile_settings": {"enabled_precisions": {torch.float16}}}, "may not set"),
    ({"compile_settings": {"min_block_size": 1}}, "may not set"),
    ({"compile_settings": {"no_such_setting": 1}}, "does not accept"),
])
def test_compile_settings_are_validated(tt, build_args, match) -> None:
    module, _ = tt
    net = monai_trt.apply(seg(torch.device("cpu")), [{**ENTRY, "build_args": build_args}])
    with pytest.raises(PatchError, match=match), torch.no_grad():
        net(torch.randn(2, 1, 8, 8, 8))
    assert module.COMPILES == []


@pytest.mark.parametrize("tt", [COMBOS[0]], indirect=True)
def test_build_args_are_checked_and_passed(tt) -> None:
    module, _ = tt
    with pytest.raises(PatchError, match="not accepted"):
        monai_trt.apply(seg(torch.device("cpu")), [{**ENTRY, "build_args": {"precision_constraints": "obey"}}])
    with pytest.raises(PatchError, match="must be int"):
        monai_trt.apply(seg(torch.device("cpu")), [{**ENTRY, "build_args": {"min_block_size": "one"}}])
    args = {"min_block_size": 1, "torch_executed_ops": ["torch.ops.aten.relu.default"],
            "compile_settings": {"use_fp32_acc": True}}
    with torch.no_grad():
        monai_trt.apply(seg(torch.device("cpu")), [{**ENTRY, "precision": "fp32", "build_args": args}])(
            torch.randn(2, 1, 8, 8, 8))
    settings = module.COMPILES[-1]
    assert settings["min_block_size"] == 1 and settings["use_fp32_acc"] is True
    assert list(settings["torch_executed_ops"]) == ["torch.ops.aten.relu.default"]


def test_availability(monkeypatch) -> None:
    backend = torch_trt_backend.TorchTensorRTBackend()
    monkeypatch.setattr(torch_trt_backend, "_HAS_TORCH_TRT", False)
    assert "not installed" in backend.unavailable_reason(torch.device("cuda"))
    with installed("11.4.0"):
        assert backend.unavailable_reason(torch.device("cpu")) is None
        assert "CPU tensors only" in backend.unavailable_reason(torch.device("cuda"))
        versions = backend.versions()
        assert versions["torch_tensorrt"] == "2.14.0" and versions["tensorrt"] == "11.4.0"
        assert backend.graph_precision("fp16") == "fp16"
    with installed("10.13.0", "2.5.0"):
        assert backend.graph_precision("fp16") == "fp32" and backend.graph_precision("bf16") == "fp32"
