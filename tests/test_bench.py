"""`python -m monai_trt bench`: a well-formed report (results.json, results.md, chart.png) on CPU, on the example
bundle and on a reduced W1; failing modes are recorded and the bench goes on; bad options are clear errors.

Speed is never asserted here (the benchmark itself measures it); these tests check the report's shape, that an
fp32 engine agrees with eager fp32, and the torch.compile modes: planned on CUDA (never max-autotune), on CPU only on
request, their compile time and the speed-ups against the best eager mode and torch.compile.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from monai_trt.backends.aoti import AotiBackend
from monai_trt.backends.onnxruntime import OnnxRuntimeBackend
from monai_trt.bench import compiled
from monai_trt.bench.command import bench, plan_modes
from monai_trt.bench.report import markdown_table, speedups
from monai_trt.cli import commands as cli
from monai_trt.errors import UsageError

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "spheres_segmentation"
# W1 at a size a 2-core CPU runs in a few seconds per volume (one window; the ROI must stay a multiple of 32, and
# >= 64 for SwinUNETR's instance norms).
TINY_W1 = {"feature_size": 12, "shape": [64, 64, 64], "roi": [64, 64, 64], "sw_batch": 1, "window_size": 4,
           "depths": [1, 1, 1, 1]}
HAS_MPL = importlib.util.find_spec("matplotlib") is not None


def _table_rows(markdown: str) -> list[str]:
    rows = [line for line in markdown.splitlines() if line.startswith("| `")]
    return [row.split("|")[1].strip().strip("`") for row in rows]


def _check_png(path: Path) -> None:
    if HAS_MPL:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not path.exists()


@pytest.mark.slow
def test_bench_bundle_writes_json_markdown_and_chart(tmp_path, capsys):
    out = tmp_path / "bench"
    bench(bundle_root=str(BUNDLE), out=str(out), modes="onnxruntime_fp32", methods="onnxruntime", precisions="fp32",
          repeats=2, warmup=1, quiet=True,
          **{"dataset_dir": str(tmp_path / "data"), "num_test": 1, "inferer#roi_size": [96, 96, 96],
             "inferer#sw_batch_size": 1})
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["schema"] == "monai_trt.bench.command/1"
    assert {"device", "gpu", "versions"} <= set(results["machine"])
    assert {"torch", "monai", "onnxruntime"} <= set(results["machine"]["versions"])
    assert results["workload"]["name"] == "Spheres segmentation"
    assert list(results["modes"]) == ["onnxruntime_fp32"]
    row = results["modes"]["onnxruntime_fp32"]
    assert row["status"] == "ok", row.get("error")
    assert row["network"]["batch_shape"] == [1, 1, 96, 96, 96]
    assert len(row["network"]["samples_s"]) == 2 and row["network"]["median_s"] > 0
    assert len(row["sliding_window"]["samples_s"]) == 2 and row["sliding_window"]["median_s"] > 0
    assert row["build"]["engine_build_s"] > 0 and row["build"]["engines"][0]["method"] == "onnxruntime"
    assert row["peak_mem_bytes"] is None  # CPU
    assert row["calls"]["engine"] > 0 and row["calls"]["pytorch"] == 0  # every timed call was served by the engine
    # fp32 engine against eager fp32 (computed untimed because fp32 is not among the modes): near perfect
    vs_fp32 = row["accuracy"]["vs_fp32"]
    assert vs_fp32["dice"] >= 0.99 and vs_fp32["rel_l2"] < 1e-3 and vs_fp32["hd95"] is not None
    assert row["accuracy"]["vs_labels"]["dice"] > 0.9  # the bundle's dataset has labels
    assert results["startup_eager"]["status"] == "ok"
    startup = row["startup"]
    assert startup["status"] == "ok" and startup["cache_hit"] and startup["engines"] == 1
    assert startup["overhead_vs_eager_s"] == pytest.approx(
        startup["first_output_s"] - results["startup_eager"]["first_output_s"])
    e2e = row["e2e"]
    assert e2e["status"] == "ok", e2e.get("error")
    assert e2e["engine_cache_hit"] and e2e["key_metric"]["name"] == "val_mean_dice"
    assert list((out / "e2e" / "onnxruntime_fp32" / "output").glob("*_seg.nii.gz"))  # NIfTI in -> mask out
    markdown = (out / "results.md").read_text()
    assert _table_rows(markdown) == ["onnxruntime_fp32"] and markdown in printed + "\n"
    _check_png(out / "chart.png")


def test_bench_w1_reduced_eager_modes(tmp_path, capsys):
    out = tmp_path / "w1"
    bench(workload="w1", workload_args=TINY_W1, out=str(out), modes="fp32,amp", repeats=1, warmup=0,
          num_volumes=1, skip_startup=True, quiet=True, json=True)
    results = json.loads(capsys.readouterr().out)
    assert results == json.loads((out / "results.json").read_text())
    assert results["workload"]["kind"] == "w1" and results["workload"]["settings"]["feature_size"] == 12
    assert list(results["modes"]) == ["fp32", "amp"]
    fp32, amp = results["modes"]["fp32"], results["modes"]["amp"]
    assert fp32["status"] == amp["status"] == "ok"
    assert fp32["network"]["batch_shape"] == [1, 1, 64, 64, 64]
    assert fp32["accuracy"]["vs_fp32"] is None  # fp32 is the reference
    assert fp32["accuracy"]["vs_labels"] is None and fp32["e2e"]["status"] == "n/a"  # no bundle: n/a
    assert 0.5 < amp["accuracy"]["vs_fp32"]["argmax_agreement"] <= 1.0
    assert amp["accuracy"]["vs_fp32"]["max_abs"] > 0  # bf16 autocast on CPU differs from fp32
    assert _table_rows((out / "results.md").read_text()) == ["fp32", "amp"]
    _check_png(out / "chart.png")


def test_failing_engine_modes_are_recorded_and_the_bench_goes_on(tmp_path, monkeypatch):
    def broken(self, job, tmp):
        raise RuntimeError("simulated build failure")

    monkeypatch.setattr(OnnxRuntimeBackend, "build", broken)
    monkeypatch.setattr(AotiBackend, "build", broken)
    out = tmp_path / "fail"
    with pytest.raises(UsageError, match="2 mode\\(s\\) failed: onnxruntime_fp32, aoti_fp32"):
        bench(workload="w1", workload_args=TINY_W1, out=str(out), modes="engines",
              methods="onnxruntime,aoti", precisions="fp32", repeats=1, warmup=0, skip_startup=True, quiet=True)
    results = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in results["modes"].values()] == ["error", "error"]  # the second ran after the first
    assert "simulated build failure" in results["modes"]["onnxruntime_fp32"]["error"]
    markdown = (out / "results.md").read_text()
    assert _table_rows(markdown) == ["onnxruntime_fp32", "aoti_fp32"]
    assert "`aoti_fp32` error" in markdown


def test_budget_skips_what_does_not_fit(tmp_path):
    out = tmp_path / "budget"
    bench(workload="w1", workload_args=TINY_W1, out=str(out), modes="fp32", budget=1e-6, quiet=True)
    row = json.loads((out / "results.json").read_text())["modes"]["fp32"]
    assert row["status"] == "skipped" and "budget" in row["reason"]


def test_unavailable_combinations_are_skipped_with_a_reason():
    import torch

    modes = {m.name: m for m in plan_modes(torch.device("cpu"), methods="onnxruntime,onnx", precisions="fp32,bf16")}
    assert "tf32" not in modes  # a CUDA setting: not a default mode on CPU
    assert modes["onnxruntime_fp32"].skip is None
    assert "does not support bf16" in modes["onnxruntime_bf16"].skip
    assert "not available on cpu" in modes["onnx_fp32"].skip
    assert plan_modes(torch.device("cpu"), modes="tf32")[0].skip.startswith("TF32 is a CUDA setting")


def test_compile_modes_are_planned_on_cuda_and_only_on_request_on_cpu():
    import torch

    cpu = [m.name for m in plan_modes(torch.device("cpu"), methods="onnxruntime")]
    assert cpu == ["fp32", "amp", "onnxruntime_fp32"]  # Inductor's CPU compile takes minutes: not a CPU default
    group = {m.name: m for m in plan_modes(torch.device("cpu"), modes="compile", methods="onnxruntime")}
    assert list(group) == ["compile_fp32", "compile_fp32_ro"] and group["compile_fp32"].compile_mode == "default"
    assert group["compile_fp32_ro"].skip == "reduce-overhead is CUDA graphs: CUDA only"
    cuda = plan_modes(torch.device("cuda"), methods="onnxruntime")  # planning only: no GPU needed
    assert [m.name for m in cuda] == ["fp32", "tf32", "amp", "eager_fp16", "onnxruntime_fp32", "onnxruntime_fp16",
                                      "compile_fp16", "compile_fp16_ro"]  # engines before compile: budget order
    assert {m.compile_mode for m in cuda if m.kind == "compile"} == {"default", "reduce-overhead"}  # no max-autotune
    named = plan_modes(torch.device("cuda"), modes="compile_fp16_ma,compile_fp32", precisions="fp32,fp16")
    assert [(m.name, m.compile_mode) for m in named] == [("compile_fp32", "default"),
                                                          ("compile_fp16_ma", "max-autotune")]
    assert [m.name for m in plan_modes(torch.device("cpu"), modes="eager")] == ["fp32", "tf32", "amp", "eager_fp16"]


def test_warm_up_calls_until_two_calls_agree_and_stops_at_the_budget(monkeypatch):
    now = [0.0]
    durations = iter([30.0, 2.0, 0.5, 0.25, 0.25, 0.25])  # exact in binary: no rounding in the sums

    def call():
        now[0] += next(durations)

    monkeypatch.setattr(compiled.time, "perf_counter", lambda: now[0])
    build = compiled.warm_up(call, lambda: None, lambda: None)
    assert build["calls_s"] == [30.0, 2.0, 0.5, 0.25, 0.25] and build["stable"]
    assert build["first_call_s"] == 30.0 and build["window_compile_s"] == pytest.approx(31.75)
    durations = iter([30.0, 2.0, 0.5])
    build = compiled.warm_up(call, lambda: None, lambda: "budget of 1 s used up")
    assert build["calls_s"] == [30.0] and not build["stable"]  # the budget ends the warm-up after the first call


def test_cast_network_takes_and_returns_the_callers_dtype():
    import torch

    net = torch.nn.Conv3d(1, 2, 3, padding=1)
    cast = compiled.precision_network(net, "bf16")
    x = torch.rand(1, 1, 4, 4, 4)
    out = cast(x)
    assert out.dtype == torch.float32 and next(net.parameters()).dtype == torch.float32  # the original stays fp32
    assert next(cast.parameters()).dtype == torch.bfloat16
    assert torch.allclose(out, net(x), atol=0.05)
    assert compiled.precision_network(net, "fp32") is net


def _row(kind, seconds, **extra):
    return {"mode": extra.pop("mode", None), "kind": kind, "status": "ok", "sliding_window": {"median_s": seconds},
            **extra}


def test_speedups_against_fp32_best_eager_and_torch_compile():
    modes = {"fp32": _row("eager", 0.9), "amp": _row("eager", 0.72), "eager_fp16": _row("eager", 0.66),
             "compile_fp16": _row("compile", 0.5, compile_mode="default", build={"compile_s": 34.0}),
             "compile_fp16_ro": _row("compile", 0.48, compile_mode="reduce-overhead"),
             "aoti_fp16": _row("engine", 0.4, build={"engine_build_s": 168.0}),
             "onnx_fp16": {"kind": "engine", "status": "error", "error": "boom"}}
    refs, ups = speedups({"modes": modes})
    assert refs == {"fp32": "fp32", "amp": "amp", "best_eager": "eager_fp16", "compile": "compile_fp16"}
    assert ups["aoti_fp16"] == pytest.approx({"vs_fp32": 2.25, "vs_amp": 1.8, "vs_best_eager": 1.65,
                                              "vs_compile": 1.25})
    assert "onnx_fp16" not in ups
    table = markdown_table({"modes": modes}).splitlines()
    assert table[0].startswith("| mode | status | network ms | s / volume | vs fp32 | vs best eager | vs compile |")
    aoti = [c.strip() for c in table[2 + list(modes).index("aoti_fp16")].split("|")]
    assert aoti[5:8] == ["2.25×", "1.65×", "1.25×"] and aoti[10] == "168.0"  # build / compile s
    compile_row = [c.strip() for c in table[2 + list(modes).index("compile_fp16")].split("|")]
    assert compile_row[7] == "1.00×" and compile_row[10] == "34.0"  # its compile time in the build column
    # without compile_fp16: the fastest default-mode compile row is the reference
    del modes["compile_fp16"]
    modes["compile_bf16"] = _row("compile", 0.6, compile_mode="default")
    assert speedups({"modes": modes})[0]["compile"] == "compile_bf16"


def test_bench_w1_compile_mode_row_with_compile_time_and_speedups(tmp_path, monkeypatch, capsys):
    """fp32 against a compile mode on the tiny W1. torch.compile itself is stubbed out (Inductor compiles this
    network in minutes on a loaded 2-core CPU); the planning, the warm-up, the fresh Inductor cache, the report and
    the JSON are real."""
    import torch

    modes = []

    def fake_compile(network, mode=None):
        modes.append(mode)
        return network

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(compiled, "MIN_CALLS", 2)  # two window-batch calls are enough for the report's shape
    monkeypatch.setattr(compiled, "MAX_CALLS", 2)
    out = tmp_path / "w1c"
    bench(workload="w1", workload_args=TINY_W1, out=str(out), modes="fp32,compile_fp32", repeats=1, warmup=0,
          skip_startup=True, quiet=True, json=True)
    results = json.loads(capsys.readouterr().out)
    assert modes == ["default"]
    assert list(results["modes"]) == ["fp32", "compile_fp32"]
    row = results["modes"]["compile_fp32"]
    assert row["status"] == "ok" and row["kind"] == "compile" and row["compile_mode"] == "default"
    build = row["build"]
    assert len(build["calls_s"]) == 2 and build["first_call_s"] == build["calls_s"][0]
    assert build["compile_s"] >= 0 and build["first_volume_s"] > 0 and build["graphs"] == 0  # nothing compiled
    assert row["accuracy"]["vs_fp32"]["rel_l2"] < 1e-5  # the same fp32 network
    assert row["e2e"] == {"status": "n/a", "reason": "the workload has no bundle"}
    assert results["speedup_references"] == {"fp32": "fp32", "amp": None, "best_eager": "fp32",
                                             "compile": "compile_fp32"}
    assert row["speedup"]["vs_compile"] == 1.0 and row["speedup"]["vs_amp"] is None
    fp32 = results["modes"]["fp32"]
    assert fp32["speedup"]["vs_compile"] == pytest.approx(
        row["sliding_window"]["median_s"] / fp32["sliding_window"]["median_s"])
    markdown = (out / "results.md").read_text()
    assert _table_rows(markdown) == ["fp32", "compile_fp32"]
    assert "| vs fp32 | vs best eager | vs compile |" in markdown and "build / compile s" in markdown
    compile_line = next(line for line in markdown.splitlines() if line.startswith("| `compile_fp32`"))
    assert f"| {build['compile_s']:.1f} |" in compile_line
    assert "*vs compile* (torch.compile: `compile_fp32`," in markdown
    assert "`compile_fp32`: torch.compile mode default" in markdown


@pytest.mark.parametrize("args, message", [
    (["--workload", "w1", "--modes", "fp33"], "--modes ['fp33'] unknown; valid:"),
    (["--workload", "w1", "--precisions", "fp8"], "--precisions ['fp8'] unknown"),
    (["--workload", "w1", "--methods", "tensorrt"], "--methods ['tensorrt'] unknown; valid methods:"),
    (["--workload", "w1", "--repeats", "0"], "--repeats must be an integer >= 1"),
    (["--workload", "w1", "--workload_args", "{'bogus': 1}"], "['bogus'] are not W1 settings"),
    (["--workload", "w1", "--workload_args", "{'roi': [40, 40, 40]}"], "multiples of 32"),
    (["--workload", "w2"], "--workload 'w2' unknown; built-in workloads: w1"),
    (["--workload", "w1", "--bundle_root", str(BUNDLE)], "give either --bundle_root <bundle> or --workload w1"),
    ([], "give either --bundle_root <bundle> or --workload w1"),
    (["--bundle_root", "/nonexistent/bundle"], "no configs/inference.json under bundle_root"),
])
def test_bad_options_give_one_clear_error(args, message, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["monai_trt", "bench", "--out", str(tmp_path / "o"), *args])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("monai_trt: error: ") and message in err and "Traceback" not in err


def test_multi_device_modes_sit_beside_their_engine_mode_and_skip_without_gpus():
    import torch

    modes = plan_modes(torch.device("cpu"), modes="onnxruntime_fp32_x2,onnxruntime_fp32,fp32", methods="onnxruntime",
                       precisions="fp32")
    assert [m.name for m in modes] == ["fp32", "onnxruntime_fp32", "onnxruntime_fp32_x2"]
    assert modes[2].devices == 2 and "needs 2 CUDA device(s), 0 visible" in modes[2].skip
    assert all(m.devices is None for m in plan_modes(torch.device("cpu"), modes="engines", methods="onnxruntime"))
    with pytest.raises(UsageError, match="_x<N>"):
        plan_modes(torch.device("cpu"), modes="onnxruntime_fp32_xx", methods="onnxruntime", precisions="fp32")
