"""The `onnx` (TensorRT) backend, against the TensorRT 10 and 11 test doubles and, when present, real TensorRT.

Tests using the `env` fixture run on the doubles (CPU) and on real TensorRT (CUDA; marked `tensorrt`, skipped
without it): `pytest -m tensorrt tests/test_backend_tensorrt.py` checks a real installation. Tests using `double`
assert what was configured, which only the double records.

ONNX exports are memoised by content (weights, architecture, call layout, shape ranges) to keep the suite fast: each
distinct graph is still exported once by the core's exporter.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace

import onnx
import pytest
import torch

import monai_trt
import monai_trt.runtime.refit
from monai_trt.backends import tensorrt as trt_backend
from monai_trt.backends.trt_runtime import MAX_GRAPH_RECAPTURES, check_weights, require, set_flag, torch_dtype
from monai_trt.cache.keys import digest
from monai_trt.cache.store import EngineCache
from monai_trt.errors import BackendUnavailable, EngineBuildError, PatchError
from monai_trt.runtime.stamps import WeightsHasher, architecture_fingerprint
from tests.nets import MultiIO, TinySeg
from tests.trt_double import DOUBLE_DIR, installed, real_tensorrt

VERSIONS = ("10.13.0", "11.4.0")
REAL_TRT = real_tensorrt()
_REAL = pytest.param(
    "real", marks=[pytest.mark.tensorrt, pytest.mark.skipif(REAL_TRT is None, reason="needs TensorRT and CUDA")]
)
ENTRY = {"method": "onnx", "dynamic_batchsize": [1, 2, 4], "fallback": False}
_EXPORTS: dict[str, tuple[Path, list[str]]] = {}


@dataclass
class Env:
    trt: ModuleType
    device: torch.device

    @property
    def is_double(self) -> bool:
        return bool(getattr(self.trt, "__monai_trt_double__", False))


@pytest.fixture(params=[*VERSIONS, _REAL])
def env(request) -> Iterator[Env]:
    """The TensorRT 10 double, the TensorRT 11 double, or real TensorRT on CUDA."""
    if request.param == "real":
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(trt_backend, "trt", REAL_TRT)
            patch.setattr(trt_backend, "_HAS_TRT", True)
            yield Env(REAL_TRT, torch.device("cuda"))
    else:
        with installed(request.param) as trt:
            yield Env(trt, torch.device("cpu"))


@pytest.fixture(params=VERSIONS)
def double(request) -> Iterator[ModuleType]:
    with installed(request.param) as trt:
        yield trt


@pytest.fixture(autouse=True)
def backend_state_is_restored() -> Iterator[None]:
    """Every test (and fixture) must leave the backend modules as it found them."""
    before = (trt_backend.trt, trt_backend._HAS_TRT)
    yield
    assert (trt_backend.trt, trt_backend._HAS_TRT) == before


@pytest.fixture(autouse=True)
def memo_export(monkeypatch, tmp_path_factory) -> None:
    """Reuse an earlier export of the very same graph (same weights, architecture, call, shape ranges, options)."""
    export = trt_backend.export_onnx

    def memoised(job, path: str) -> list[str]:
        key = digest({
            "weights": WeightsHasher(job.module).digest(), "architecture": architecture_fingerprint(job.module),
            "call": job.module._rebuild.__self__.layout.to_json(),  # the captured call whose `rebuild` it replays
            "ranges": job.ranges, "names": [job.input_names, job.output_names],
            "export": dict(job.export_args),
        })
        if key not in _EXPORTS:
            files = export(job, path)
            keep = tmp_path_factory.mktemp("onnx")
            for name in files:
                shutil.copy(Path(path).parent / name, keep / name)
            _EXPORTS[key] = (keep, files)
        keep, files = _EXPORTS[key]
        for name in files:
            shutil.copy(keep / name, Path(path).parent / name)
        return files

    monkeypatch.setattr(trt_backend, "export_onnx", memoised)


def seg(device: torch.device | None = None) -> TinySeg:
    torch.manual_seed(0)
    return TinySeg().eval().to(device or "cpu")


def patched(net: torch.nn.Module, **entry) -> torch.nn.Module:
    return monai_trt.apply(net, [{**ENTRY, **entry}])


def build(trt: ModuleType) -> dict:
    """The last build the double recorded."""
    assert trt.DOUBLE.builds, "no TensorRT build happened"
    return trt.DOUBLE.builds[-1]


def load_engine(cache_dir: str, device: torch.device, use_cuda_graph: bool = False):
    """Load the single cache entry with the backend, as the wrapper does."""
    cache = EngineCache.open(cache_dir)
    (path,) = list(cache.entries())
    entry = cache.verify(path.name, path)
    return trt_backend.TensorRTBackend().load(entry.path, entry.meta, device, use_cuda_graph=use_cuda_graph)


def stored_initializers(cache_dir: str) -> list:
    """The initializers inside the double's stored plan (magic line, header line, ONNX model)."""
    (path,) = list(EngineCache.open(cache_dir).entries())
    model = onnx.ModelProto.FromString((path / "engine.plan").read_bytes().split(b"\n", 2)[2])
    return [onnx.numpy_helper.to_array(i) for i in model.graph.initializer]


# ---------------------------------------------------------------------------------------------------- availability
def test_installing_the_double_is_undone() -> None:
    before = (trt_backend.trt, trt_backend._HAS_TRT, list(sys.path))
    before_modules = {k: v for k, v in sys.modules.items() if k.split(".")[0] == "tensorrt"}
    with installed("11.4.0") as trt:
        assert trt_backend.trt is trt and sys.modules["tensorrt"] is trt
        assert os.environ["MONAI_TRT_DOUBLE_VERSION"] == "11.4.0"
    assert (trt_backend.trt, trt_backend._HAS_TRT, list(sys.path)) == before
    assert {k: v for k, v in sys.modules.items() if k.split(".")[0] == "tensorrt"} == before_modules
    assert "MONAI_TRT_DOUBLE_VERSION" not in os.environ and str(DOUBLE_DIR) not in sys.path


def test_cpu_is_accepted_only_with_the_double(double) -> None:
    backend = trt_backend.TensorRTBackend()
    assert backend.unavailable_reason(torch.device("cpu")) is None
    assert "CPU tensors only" in backend.unavailable_reason(torch.device("cuda"))
    assert backend.versions()["tensorrt"] == double.__version__ and backend.versions()["tensorrt_double"] == "1"
    with pytest.MonkeyPatch.context() as patch:  # undone before the double is uninstalled
        patch.delattr(double, "__monai_trt_double__")
        assert "CUDA" in backend.unavailable_reason(torch.device("cpu"))
        patch.setattr(double, "__version__", "8.6.1")
        assert "too old" in backend.unavailable_reason(torch.device("cuda"))
        patch.setattr(trt_backend, "_HAS_TRT", False)
        assert "not installed" in backend.unavailable_reason(torch.device("cuda"))


def test_graph_precision_follows_the_major_version(double) -> None:
    backend = trt_backend.TensorRTBackend()
    half = ("fp32", "fp32") if double.__version__.startswith("10.") else ("fp16", "bf16")
    assert (backend.graph_precision("fp16"), backend.graph_precision("bf16")) == half
    assert (backend.graph_precision("fp32"), backend.graph_precision("tf32")) == ("fp32", "tf32")


def test_missing_tensorrt_features_are_named_with_the_version(double) -> None:
    config = double.Builder(None).create_builder_config()
    set_flag(double, config, "TF32")
    if double.__version__.startswith("11."):
        with pytest.raises(BackendUnavailable, match=r"BuilderFlag\.FP16 is not available in TensorRT 11\.4\.0"):
            set_flag(double, config, "FP16")
    else:
        set_flag(double, config, "FP16")
        assert "FP16" in config.flags
    with pytest.raises(BackendUnavailable, match="IBuilderConfig.tiling is not available"):
        require(double, "IBuilderConfig.tiling", lambda: config.tiling)


# ---------------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_matches_pytorch(env, precision, cache_dir) -> None:
    net = seg(env.device)
    x2, x1 = torch.randn(2, 1, 8, 8, 8, device=env.device), torch.randn(1, 1, 8, 8, 8, device=env.device)
    with torch.no_grad():
        expected = [net(x2), net(x1)]
    patched(net, precision=precision)
    with torch.no_grad():
        outputs = [net(x2), net(x1)]
    tolerance = 1e-4 if precision == "fp32" else 3e-2
    for out, ref in zip(outputs, expected):
        assert out.dtype == ref.dtype and out.device == ref.device
        assert float((out - ref).norm() / ref.norm()) < tolerance
    assert monai_trt.wrappers(net)[""].builds == 1  # one engine serves both batch sizes
    version = env.trt.__version__
    assert list((Path(cache_dir) / "timing").glob(f"trt{version}-*.cache")), "timing cache not persisted"
    if env.is_double:
        context = env.trt.DOUBLE.contexts[-1]
        assert {c[1] for c in context.calls if c[0] == "execute_async_v3"} == {0}  # null stream on CPU
        uncast = precision == "fp32" or version.startswith("10.")  # else the core casts the input to fp16 first
        assert context.calls.count(("set_tensor_address", "x", x1.data_ptr())) == int(uncast)


def test_several_inputs_int64_and_nested_outputs(env) -> None:
    torch.manual_seed(0)
    net = MultiIO().eval().to(env.device)
    image = torch.randn(2, 2, 5, 5, device=env.device)
    labels = torch.tensor([3, 7], device=env.device)
    scale = torch.full((1,), 0.5, device=env.device)
    with torch.no_grad():
        expected = net(image, labels, scale=scale)
        patched(net, precision="fp32", dynamic_batchsize=None)
        combined, extra = net(image, labels, scale=scale)
    assert torch.allclose(combined, expected[0], atol=1e-5)
    assert torch.allclose(extra["pooled"], expected[1]["pooled"], atol=1e-5)
    assert torch.equal(extra["argmax"], expected[1]["argmax"]) and extra["argmax"].dtype == torch.int64


def test_profiles_are_chosen_at_run_time(env) -> None:
    net = seg(env.device)
    profiles = [
        {"x": [[1, 1, 8, 8, 8], [1, 1, 8, 8, 8], [2, 1, 8, 8, 8]]},
        {"x": [[3, 1, 8, 8, 8], [4, 1, 8, 8, 8], [4, 1, 8, 8, 8]]},
    ]
    inputs = [torch.randn(b, 1, 8, 8, 8, device=env.device) for b in (1, 4, 2)]
    with torch.no_grad():
        expected = [net(x) for x in inputs]
        patched(net, precision="fp32", dynamic_batchsize=None, input_profiles=profiles)
        outputs = [net(x) for x in inputs]
    for out, ref in zip(outputs, expected):
        assert torch.allclose(out, ref, atol=1e-4)
    assert monai_trt.wrappers(net)[""].builds == 1
    if env.is_double:
        assert build(env.trt)["profiles"] == [{"x": p["x"]} for p in profiles]
        switches = [c[1:] for c in env.trt.DOUBLE.contexts[-1].calls if c[0] == "set_optimization_profile_async"]
        assert switches == [(1, 0), (0, 0)]  # batch 4 → profile 1, back to profile 0 for batch 2


def test_outputs_are_fresh_and_inputs_are_checked(env, cache_dir) -> None:
    net = patched(seg(env.device), precision="fp32")
    a, b = torch.randn(2, 1, 8, 8, 8, device=env.device), torch.randn(2, 1, 8, 8, 8, device=env.device)
    with torch.no_grad():
        first = net(a)
        kept = first.clone()
        second = net(b)
    assert torch.equal(first, kept) and not torch.equal(first, second)
    engine = load_engine(cache_dir, env.device)
    out1, out2 = engine([a])[0], engine([a])[0]
    assert out1.data_ptr() != out2.data_ptr() and torch.equal(out1, out2)
    with pytest.raises(TypeError, match="expects torch.float32"):
        engine([a.double()])
    with pytest.raises(ValueError, match="outside every optimisation profile"):
        engine([torch.randn(5, 1, 8, 8, 8, device=env.device)])


def test_cached_engine_is_loaded_not_rebuilt(env) -> None:
    x = torch.randn(2, 1, 8, 8, 8, device=env.device)
    with torch.no_grad():
        patched(seg(env.device), precision="fp32")(x)
        again = patched(seg(env.device), precision="fp32")
        out = again(x)
        expected = seg(env.device)(x)
    assert monai_trt.wrappers(again)[""].builds == 0
    assert torch.allclose(out, expected, atol=1e-4)


# ---------------------------------------------------------------------------------------------------- precision
@pytest.mark.parametrize("double", ["10.13.0"], indirect=True)
@pytest.mark.parametrize("constraints, norms", [("obey", True), ("prefer", True), ("none", True), ("obey", False)])
def test_trt10_half_precision_uses_flags_and_fp32_norms(double, constraints, norms, trt_logs) -> None:
    net = patched(seg(), precision="fp16", build_args={"precision_constraints": constraints, "norms_fp32": norms})
    with torch.no_grad():
        net(torch.randn(2, 1, 8, 8, 8))
    record = build(double)
    expected_flag = {"obey": {"OBEY_PRECISION_CONSTRAINTS"}, "prefer": {"PREFER_PRECISION_CONSTRAINTS"}, "none": set()}
    constraint_flags = {f for f in record["flags"] if f.endswith("PRECISION_CONSTRAINTS")}
    assert {"FP16", "TF32"} <= set(record["flags"]) and constraint_flags == expected_flag[constraints]
    assert not record["strongly_typed"] and record["inputs"] == {"x": "FLOAT"} and "Cast" not in record["ops"]
    norms_set = {n: p for n, p in record["layer_precisions"].items() if record["layer_types"][n] == "NORMALIZATION"}
    assert norms_set == ({"node_instance_norm": ["FLOAT", {"0": "FLOAT"}]} if norms else {})
    assert ("precision_constraints is 'none'" in trt_logs.text(logging.WARNING)) == (constraints == "none" and norms)


@pytest.mark.parametrize("double", ["11.4.0"], indirect=True)
def test_trt11_half_precision_is_a_strongly_typed_cast_graph(double) -> None:
    assert not hasattr(double.BuilderFlag, "FP16") and not hasattr(double.BuilderFlag, "OBEY_PRECISION_CONSTRAINTS")
    net = seg()
    x = torch.randn(2, 1, 8, 8, 8)
    with torch.no_grad():
        expected = net(x)
        out = patched(net, precision="fp16")(x)
    record = build(double)
    strongly_typed = 1 << int(double.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert record["strongly_typed"] and record["network_flags"] == strongly_typed
    assert record["flags"] == ["TF32"] and record["layer_precisions"] == {}
    assert record["inputs"] == {"x": "HALF"} and record["ops"].count("Cast") >= 2  # norm kept fp32 behind casts
    assert float((out - expected).norm() / expected.norm()) < 3e-2
    assert dict(seg().state_dict()).keys() == net.state_dict().keys()  # user's module untouched


def test_bf16_engines(double, cache_dir) -> None:
    net = seg()
    x = torch.randn(2, 1, 8, 8, 8)
    with torch.no_grad():
        expected = net(x)
        out = patched(net, precision="bf16", fallback=True)(x)
    record = build(double)
    if double.__version__.startswith("10."):
        assert "BF16" in record["flags"] and record["inputs"] == {"x": "FLOAT"}
        assert float((out - expected).norm() / expected.norm()) < 6e-2
    else:  # bf16 graph; the double cannot execute bf16 (no onnxruntime kernels), so only the engine I/O is checked
        assert "BF16" not in record["flags"] and record["inputs"] == {"x": "BF16"}
        assert load_engine(cache_dir, torch.device("cpu")).output_dtypes == [torch.bfloat16]
    assert torch_dtype(double, double.DataType.BF16) is torch.bfloat16
    assert torch_dtype(double, double.DataType.HALF) is torch.float16


@pytest.mark.parametrize("precision, tf32", [("fp32", False), ("tf32", True)])
def test_tf32_flag(double, precision, tf32) -> None:
    with torch.no_grad():
        patched(seg(), precision=precision)(torch.randn(2, 1, 8, 8, 8))
    assert ("TF32" in build(double)["flags"]) == tf32


# ---------------------------------------------------------------------------------------------------- build options
def test_build_args_reach_the_builder(double) -> None:
    args = {
        "builder_optimization_level": 5, "workspace_size": 1 << 20,
        "memory_pool_limits": {"tactic_shared_memory": 4096},
        "hardware_compatibility": "ampere_plus", "version_compatible": True,
    }
    net = seg()
    x = torch.randn(2, 1, 8, 8, 8)
    with torch.no_grad():
        expected = net(x)
        out = patched(net, precision="fp32", build_args=args)(x)  # runs only if host code was allowed at load
    record = build(double)
    assert record["optimization_level"] == 5 and record["hardware_compatibility_level"] == "AMPERE_PLUS"
    assert record["pools"] == {"WORKSPACE": 1 << 20, "TACTIC_SHARED_MEMORY": 4096}
    assert "VERSION_COMPATIBLE" in record["flags"] and double.DOUBLE.plugins_initialised
    assert torch.allclose(out, expected, atol=1e-4)


@pytest.mark.parametrize("args, where", [
    ({"precision_constraints": "sometimes"}, "call"),
    ({"builder_optimization_level": 9}, "call"),
    ({"memory_pool_limits": {"workspace": -1}}, "call"),
    ({"workspace_size": "1GB"}, "apply"),
    ({"no_such_option": 1}, "apply"),
])
def test_bad_build_args_are_rejected_before_building(double, args, where) -> None:
    net = seg()
    if where == "apply":
        with pytest.raises(PatchError):
            patched(net, build_args=args)
        return
    patched(net, build_args=args)
    with pytest.raises(PatchError, match="build_args"), torch.no_grad():
        net(torch.randn(2, 1, 8, 8, 8))
    assert double.DOUBLE.builds == []


def test_parser_errors_name_the_node_and_fall_back(double, trt_logs) -> None:
    double.DOUBLE.unsupported_ops.add("InstanceNormalization")
    net = seg()
    x = torch.randn(2, 1, 8, 8, 8)
    with torch.no_grad():
        expected = net(x)
        assert torch.equal(patched(net, fallback=True)(x), expected)
        warning = trt_logs.text(logging.WARNING)
        assert "falling back to PyTorch" in warning and "'node_instance_norm' (InstanceNormalization)" in warning
        no_importer = r"node \d+ 'node_instance_norm' \(InstanceNormalization\): No importer"
        with pytest.raises(EngineBuildError, match=no_importer):
            patched(seg(), precision="fp32")(x)


@pytest.mark.parametrize("every_s", [trt_backend._PROGRESS_EVERY_S, 0.0])
def test_progress_monitor_logs_build_phases(double, every_s, trt_logs, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger=trt_backend.logger.name)
    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        patch.setattr(trt_backend, "_PROGRESS_EVERY_S", every_s)
        patched(seg(), precision="fp32")(torch.randn(2, 1, 8, 8, 8))
    assert isinstance(build(double)["config"].progress_monitor, double.IProgressMonitor)
    info, debug = trt_logs.text(logging.INFO), trt_logs.text(logging.DEBUG)
    assert "TensorRT phase 'Building engine' started (2 steps)" in info
    assert "TensorRT phase 'Building engine' finished in" in info
    assert "phase 'Tactic selection' started" not in info and "TensorRT phase 'Tactic selection' finished" in debug
    layers = len(build(double)["ops"])
    step_line = f"TensorRT phase 'Tactic selection': step {layers} of {layers}"
    assert (step_line in info) == (every_s == 0.0)  # steps are logged at most every _PROGRESS_EVERY_S


def test_timing_cache_is_merged_under_the_lock(double, cache_dir, monkeypatch) -> None:
    path = Path(cache_dir) / "timing" / f"trt{double.__version__}-cpu.cache"
    with torch.no_grad():
        patched(seg(), precision="fp32")(torch.randn(2, 1, 8, 8, 8))
    first = set(json.loads(path.read_bytes())["entries"])
    assert first and build(double)["timing_cache"]

    real_build = double.Builder.build_serialized_network

    def build_while_another_process_saves(self, network, config):
        data = json.loads(path.read_bytes())
        data["entries"]["OTHER-PROCESS"] = "tactic"
        path.write_text(json.dumps(data))
        return real_build(self, network, config)

    monkeypatch.setattr(double.Builder, "build_serialized_network", build_while_another_process_saves)
    with torch.no_grad():  # another engine (other flags: other tactics) of the same graph
        patched(seg(), precision="tf32")(torch.randn(2, 1, 8, 8, 8))
    merged = set(json.loads(path.read_bytes())["entries"])
    assert first < merged and "OTHER-PROCESS" in merged and len(merged - first) > 1


def test_timing_cache_can_be_switched_off(double, cache_dir) -> None:
    with torch.no_grad():
        patched(seg(), precision="fp32", build_args={"timing_cache": False})(torch.randn(2, 1, 8, 8, 8))
    assert not build(double)["timing_cache"] and not list((Path(cache_dir) / "timing").glob("*.cache"))


# ---------------------------------------------------------------------------------------------------- refit, graphs
@pytest.mark.parametrize("mode, flag", [("identical", "REFIT_IDENTICAL"), ("refit", "REFIT")])
def test_refit_modes_build_stripped_plans_refitted_from_the_module(double, mode, flag, cache_dir, trt_logs) -> None:
    net = seg()
    x = torch.randn(2, 1, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(patched(net, precision="fp32", refit=mode)(x), seg()(x), rtol=1e-4, atol=1e-4)
        assert {"STRIP_PLAN", flag} <= set(build(double)["flags"])
        assert "refitted engine" in trt_logs.text()
        assert not any(w.any() for w in stored_initializers(cache_dir))  # the stored plan holds zeros, no weights
        torch.manual_seed(5)
        net.load_state_dict(TinySeg().state_dict())  # a new checkpoint, loaded in place
        plain = monai_trt.remove(copy.deepcopy(net))
        torch.testing.assert_close(net(x), plain(x), rtol=1e-4, atol=1e-4)
    builds = len(double.DOUBLE.builds)
    assert builds == (1 if mode == "refit" else 2)  # identical engines hold only their build weights: rebuilt


def test_stripped_plan_is_refused_until_refitted(double, cache_dir) -> None:
    x = torch.randn(2, 1, 8, 8, 8)
    with torch.no_grad():
        patched(seg(), precision="fp32", refit="refit")(x)
    engine = load_engine(cache_dir, torch.device("cpu"))
    with pytest.raises(EngineBuildError, match="has not been refitted"):
        engine([x])
    weights = monai_trt.runtime.refit.engine_weights(seg(), seg().forward, "fp32")
    with pytest.raises(EngineBuildError, match="weights the engine needs are missing"):
        engine.refit({k: v for k, v in weights.items() if not k.endswith("head.bias")})
    engine.refit(weights)
    torch.testing.assert_close(engine([x])[0], seg()(x), rtol=1e-4, atol=1e-4)


def test_bf16_weights_are_passed_by_pointer(double) -> None:
    tensor = torch.tensor([1.5, -2.0, 0.25], dtype=torch.bfloat16)
    assert double.Weights(double.DataType.BF16, tensor.data_ptr(), 3).array.tolist() == [1.5, -2.0, 0.25]


def test_real_tensorrt_on_a_machine_without_cuda_warns_and_runs_pytorch(trt_logs) -> None:
    """An entry that needs CUDA (TensorRT) on a CPU machine: one warning, PyTorch results; or a clear error."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trt_backend, "trt", SimpleNamespace(__version__="10.13.0"))  # a real-looking tensorrt
        mp.setattr(trt_backend, "_HAS_TRT", True)
        _check_cpu_only_tensorrt(trt_logs)


def _check_cpu_only_tensorrt(trt_logs) -> None:
    net, x = seg(), torch.randn(2, 1, 8, 8, 8)
    with torch.no_grad():
        expected = net(x)
        patched(net, precision="fp16", fallback=True)
        torch.testing.assert_close(net(x), expected, rtol=0, atol=0)
        net(x)
    assert trt_logs.text(logging.WARNING).count("TensorRT engines need a CUDA device") == 1
    with pytest.raises(BackendUnavailable, match="TensorRT engines need a CUDA device"):
        patched(seg(), precision="fp16", fallback=False)


def test_refittable_engine_with_all_weights_is_accepted(double) -> None:
    header = {"refittable": True, "stripped": False, "weights": ["w"], "inputs": {}, "outputs": {}, "profiles": []}
    check_weights(double, double.ICudaEngine(header, b"", None))
    with pytest.raises(EngineBuildError, match="missing 1 weights"):
        check_weights(double, double.ICudaEngine({**header, "stripped": True}, b"", None))


def test_cuda_graph_replays_and_recaptures_when_addresses_move(double, cache_dir, trt_logs) -> None:
    net = seg()
    x = torch.randn(2, 1, 8, 8, 8)
    with torch.no_grad():
        patched(net, precision="fp32", use_cuda_graph=True)(x)
        engine = load_engine(cache_dir, torch.device("cpu"), use_cuda_graph=True)
        context = double.DOUBLE.contexts[-1]
        assert torch.allclose(engine([x])[0], net(x), atol=1e-4)  # capture
        shapes_set = sum(c[0] == "set_input_shape" for c in context.calls)
        x.mul_(2)  # same buffer, new values: replayed, reads the live buffer
        assert torch.allclose(engine([x])[0], net(x), atol=1e-4)
        assert sum(c[0] == "set_input_shape" for c in context.calls) == shapes_set  # replay binds nothing
        for _ in range(MAX_GRAPH_RECAPTURES + 1):  # new buffers every call: re-captured, then refused
            y = torch.randn(2, 1, 8, 8, 8)
            assert torch.allclose(engine([y])[0], net(y), atol=1e-4)
    assert "CUDA graph disabled for this engine" in trt_logs.text(logging.WARNING)


def test_double_refuses_plans_of_another_version(cache_dir) -> None:
    with installed("10.13.0"), torch.no_grad():
        patched(seg(), precision="fp32")(torch.randn(2, 1, 8, 8, 8))
    with installed("11.4.0"), pytest.raises(EngineBuildError, match="could not deserialize"):
        load_engine(cache_dir, torch.device("cpu"))


def test_tensorrt_log_messages_go_to_logging(double, trt_logs) -> None:
    from monai_trt.backends.trt_runtime import trt_logger

    log = trt_logger(double)
    log.log(double.ILogger.Severity.WARNING, "repeated warning")
    log.log(double.ILogger.Severity.WARNING, "repeated warning")
    log.log(double.ILogger.Severity.ERROR, "an error")
    assert trt_logs.text(logging.WARNING).count("repeated warning") == 1
    assert "an error" in log.recent_errors() and isinstance(log, double.ILogger)


# ---------------------------------------------------------------------------------------------------- real CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_streams_and_graphs_with_a_copy_engine(trt_logs) -> None:
    """The CUDA path of TensorRTEngine on a real GPU, with an engine that is a cudaMemcpyAsync (no TensorRT)."""
    from monai_trt.backends.trt_runtime import TensorRTEngine
    from tests.trt_double.cuda_copy import make_module

    trt = make_module()
    if trt is None:
        pytest.skip("libcudart not found")
    device = torch.device("cuda")
    plain = TensorRTEngine(trt, b"", ["x"], device)
    x = torch.randn(8, 4, device=device)
    first, second = plain([x])[0], plain([x])[0]
    torch.cuda.synchronize()
    assert torch.equal(first, x) and first.data_ptr() != second.data_ptr()
    assert trt.STREAMS[-1] == torch.cuda.current_stream().cuda_stream
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        third = plain([x])[0]
    side.synchronize()
    assert trt.STREAMS[-1] == side.cuda_stream and torch.equal(third, x)

    graphed = TensorRTEngine(trt, b"", ["x"], device, use_cuda_graph=True)
    with torch.cuda.stream(side):
        static = torch.randn(8, 4, device=device)
        captured = graphed([static])[0]  # launch + capture
        launches = len(trt.STREAMS)
        static.mul_(3)
        replayed = graphed([static])[0]  # replay reads the live buffer; no Python-side launch
        assert len(trt.STREAMS) == launches
        kept = replayed.clone()
        moved = torch.randn(8, 4, device=device)
        recaptured = [graphed([moved])[0], graphed([moved])[0]]
    side.synchronize()
    assert torch.allclose(captured * 3, static) and torch.equal(replayed, static)
    assert len(trt.STREAMS) == launches + 2  # the re-capture: one launch and one captured call, then a replay
    assert torch.equal(replayed, kept) and all(torch.equal(r, moved) for r in recaptured)
    assert recaptured[0].data_ptr() != recaptured[1].data_ptr()
    for _ in range(MAX_GRAPH_RECAPTURES + 1):
        z = torch.randn(8, 4, device=device)
        out = graphed([z])[0]
    torch.cuda.synchronize()
    assert torch.equal(out, z) and "CUDA graph disabled" in trt_logs.text(logging.WARNING)
