"""`python -m monai_trt`: build (ahead of time, reused by a later bundle run), ls, verify, clean, info, progress.

A tiny model-zoo-style bundle (3D UNet, metadata.json with network_data_format, CheckpointLoader, sliding window) is
generated into tmp dirs; its checkpoint holds weights other than the config's initialisation, so a build that did
not load the run's weights would produce a key the run never looks up.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from monai_trt.backends.onnxruntime import OnnxRuntimeBackend
from monai_trt.bundle.build import plan_calls
from monai_trt.bundle.load import BundleSource, load_bundle
from monai_trt.cache.inventory import parse_size, scan
from monai_trt.cache.keys import engine_key, platform_info
from monai_trt.cache.store import EngineCache
from monai_trt.cli import commands as cli
from monai_trt.console import Progress
from monai_trt.errors import UsageError
from monai_trt.events import Event, emit, report
from monai_trt.runtime.hook import apply

CONFIGS = "['configs/inference.json','configs/inference_trt.json']"
UNET = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2], "num_res_units": 0}
PATCH = [{"submodule": "", "method": "onnxruntime", "precision": "fp32", "dynamic_batchsize": [1, 2, 4]}]
METADATA = {
    "name": "tiny_cli_bundle",
    "version": "0.1.0",
    "network_data_format": {
        "inputs": {"image": {"type": "image", "format": "magnitude", "num_channels": 1, "spatial_shape": [16, 16, 16],
                             "dtype": "float32", "value_range": [0, 1], "is_patch_data": True}},
        "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 2,
                             "spatial_shape": [16, 16, 16], "dtype": "float32", "is_patch_data": True}},
    },
}
INFERENCE = {
    "imports": ["$import os"],
    "bundle_root": ".",
    "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
    "network_def": {"_target_": "UNet", **UNET},
    "network": "$@network_def.to(@device)",
    "datalist": "$[{'image': torch.rand(1, 20, 20, 20, generator=torch.Generator().manual_seed(i))} for i in range(2)]",
    "dataset": {"_target_": "Dataset", "data": "@datalist"},
    "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "num_workers": 0},
    "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [16, 16, 16], "sw_batch_size": 3, "overlap": 0.25},
    "handlers": [{"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
                  "load_dict": {"model": "@network"}, "strict": True}],
    "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                  "network": "@network", "inferer": "@inferer", "val_handlers": "@handlers", "amp": False},
    "initialize": [],
    "run": ["$@evaluator.run()"],
    "finalize": ["$print('prediction shape', tuple(@evaluator.state.output[0]['pred'].shape))"],
}


def make_bundle(root: Path, patch=None, metadata=None, seed: int = 123, checkpoint: bool = True) -> Path:
    """Write the tiny bundle to `root` (configs, metadata, and a checkpoint of seeded random weights)."""
    from monai.networks.nets import UNet

    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "configs" / "inference.json").write_text(json.dumps(INFERENCE, indent=1))
    trt = {"+imports": ["$import monai_trt"], "trt": True, "trt_patch": PATCH if patch is None else patch,
           "+initialize": ["$monai_trt.apply(@network, @trt_patch, enabled=@trt)"]}
    (root / "configs" / "inference_trt.json").write_text(json.dumps(trt, indent=1))
    if metadata is not False:
        (root / "configs" / "metadata.json").write_text(json.dumps(METADATA if metadata is None else metadata))
    if checkpoint:
        (root / "models").mkdir(exist_ok=True)
        torch.manual_seed(seed)
        torch.save(UNet(**UNET).state_dict(), root / "models" / "model.pt")
    return root


def entry_dirs(cache: str | Path) -> list[Path]:
    entries = Path(cache) / "entries"
    return sorted(p for p in entries.iterdir()) if entries.is_dir() else []


def hits(entry: Path) -> int:
    return json.loads((entry / "usage.json").read_text())["hits"]


def run_cli(args: list[str], cache: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MONAI_TRT_CACHE": str(cache)}
    env.pop("MONAI_TRT", None)
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The bundle, built ahead of time by the real `python -m monai_trt build` (not a terminal: no progress)."""
    base = tmp_path_factory.mktemp("built")
    bundle, cache = make_bundle(base / "bundle"), base / "cache"
    args = ["monai_trt", "build", "--bundle_root", str(bundle), "--config_file", CONFIGS, "--json"]
    done = run_cli(args, cache, base)
    assert done.returncode == 0, done.stderr
    return bundle, cache, done


@pytest.fixture
def cache_copy(built, cache_dir):
    """This test's own copy of the built cache, at the isolated MONAI_TRT_CACHE."""
    shutil.copytree(built[1], cache_dir, symlinks=True)
    return Path(cache_dir)


# ------------------------------------------------------------------------------------------------------- build
def test_build_then_bundle_run_reuses_engine(built, cache_copy):
    bundle, _, done = built
    report_ = json.loads(done.stdout)
    assert [e["built"] for e in report_["engines"]] == [True] and report_["failures"] == []
    (entry,) = entry_dirs(cache_copy)
    assert entry.name == report_["engines"][0]["key"] and hits(entry) == 1
    run = run_cli(["monai.bundle", "run", "--config_file", CONFIGS, "--bundle_root", str(bundle)], cache_copy, bundle)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "prediction shape (2, 20, 20, 20)" in run.stdout
    assert entry_dirs(cache_copy) == [entry]  # no new entry
    assert hits(entry) == 2  # the run loaded the entry the build made
    assert "using cached engine" in run.stdout and "building" not in run.stdout


def test_build_is_quiet_and_prints_json_when_not_a_terminal(built):
    _, _, done = built
    assert "export +" not in done.stderr and "\r" not in done.stderr
    assert "INFO" not in done.stderr  # monai_trt INFO logs are off unless --verbose
    assert json.loads(done.stdout)["bundle"] == "tiny_cli_bundle"


def test_build_again_reports_cached_engine(built, cache_copy, capsys):
    bundle = built[0]
    before = entry_dirs(cache_copy)
    cli.build(config_file=CONFIGS, bundle_root=str(bundle), quiet=False)
    out, err = capsys.readouterr()
    assert entry_dirs(cache_copy) == before
    row = f"cached  {before[0].name[:12]}  <network>  onnxruntime  fp32  x:[1-4,1,16,16,16]"
    assert out.splitlines()[1].startswith(row)
    assert "already in the cache" in err and "calling network(image:[2, 1, 16, 16, 16]:float32)" in err


def test_build_input_profiles_builds_one_engine_per_profile(tmp_path, cache_dir, capsys):
    profiles = [{"x": [[1, 1, 16, 16, 16], [1, 1, 16, 16, 16], [2, 1, 16, 16, 16]]},
                {"x": [[1, 1, 8, 8, 8], [1, 1, 8, 8, 8], [1, 1, 8, 8, 8]]}]
    patch = [{"submodule": "", "method": "onnxruntime", "precision": "fp32", "input_profiles": profiles}]
    bundle = make_bundle(tmp_path / "b", patch=patch, metadata=False)  # input_profiles need no metadata
    cli.build(bundle_root=str(bundle), json=True)
    result = json.loads(capsys.readouterr().out)
    assert [e["built"] for e in result["engines"]] == [True, True]
    first = {json.loads((e / "meta.json").read_text())["io"]["profiles"][0][0][1][2] for e in entry_dirs(cache_dir)}
    assert first == {16, 8}  # each engine leads with the profile it was called at


def test_build_reports_an_engine_that_disagrees_with_pytorch(tmp_path, trt_logs):
    patch = [{**PATCH[0], "tolerance": 1e-12}]  # no real engine is that exact: validation must reject it
    with pytest.raises(UsageError, match=r"some engines were not built:\n  .*'network'.*disagrees with PyTorch"):
        cli.build(bundle_root=str(make_bundle(tmp_path / "b", patch=patch)))
    assert "engine disabled, falling back to PyTorch" in trt_logs.text(logging.WARNING)


@pytest.mark.parametrize("metadata, message", [
    (False, "has no network_data_format.inputs"),
    ({"network_data_format": {"inputs": {"image": {"num_channels": 1, "spatial_shape": ["16*n", "16*n", "16*n"]}}}},
     "network_data_format.inputs.image.spatial_shape is ['16*n', '16*n', '16*n'], not a list of positive integers"),
    ({"network_data_format": {"inputs": {"image": {"spatial_shape": [16, 16, 16]}}}},
     "network_data_format.inputs.image.num_channels is missing"),
])
def test_build_names_the_metadata_field_to_add(tmp_path, cache_dir, metadata, message):
    bundle = make_bundle(tmp_path / "b", metadata=metadata)
    with pytest.raises(UsageError, match="metadata.json") as err:
        cli.build(bundle_root=str(bundle))
    assert message in str(err.value)
    assert entry_dirs(cache_dir) == []


def test_spatial_shape_flag_overrides_symbolic_metadata(tmp_path):
    meta = {"network_data_format": {"inputs": {"image": {"num_channels": 1, "spatial_shape": ["16*n"] * 3}}}}
    bundle = load_bundle(BundleSource(bundle_root=str(make_bundle(tmp_path / "b", metadata=meta))))
    (description, _), = plan_calls(bundle, spatial_shape=[32, 32, 32])
    assert description == "network(image:[2, 1, 32, 32, 32]:float32)"


def test_build_without_checkpoint_says_the_run_weights_are_needed(tmp_path, cache_dir):
    bundle = make_bundle(tmp_path / "b", checkpoint=False)
    with pytest.raises(UsageError, match=r"models/model.pt not found: the cache key includes a hash of the weights"):
        cli.build(bundle_root=str(bundle))


def test_build_loads_the_checkpoint_into_the_network(tmp_path):
    bundle = load_bundle(BundleSource(bundle_root=str(make_bundle(tmp_path / "b", seed=7))))
    expected = torch.load(tmp_path / "b" / "models" / "model.pt", weights_only=True)
    assert bundle.weights == tmp_path / "b" / "models" / "model.pt"
    assert all(torch.equal(bundle.network.state_dict()[k], v) for k, v in expected.items())


def test_static_patch_uses_sw_batch_size_and_warns(tmp_path, trt_logs):
    patch = [{"submodule": "", "method": "onnxruntime", "precision": "fp32"}]
    bundle = load_bundle(BundleSource(bundle_root=str(make_bundle(tmp_path / "b", patch=patch))))
    apply(bundle.network, bundle.raw_patch)
    (description, _), = plan_calls(bundle)
    assert description == "network(image:[3, 1, 16, 16, 16]:float32)"  # the inferer's sw_batch_size
    assert "has no dynamic_batchsize: its engine accepts only batch 3" in trt_logs.text(logging.WARNING)


def test_batch_outside_dynamic_batchsize_is_refused(tmp_path):
    with pytest.raises(UsageError, match=r"--batch 8 is outside .* dynamic_batchsize \[1, 4\]"):
        cli.build(bundle_root=str(make_bundle(tmp_path / "b")), batch=8)


def test_missing_patch_section_says_what_to_add(tmp_path):
    bundle = make_bundle(tmp_path / "b")
    with pytest.raises(UsageError, match="no 'trt_patch'.*add the monai_trt patch"):
        cli.build(bundle_root=str(bundle), config_file="configs/inference.json")


# ------------------------------------------------------------------------------------------------------ verify
def test_verify_passes_for_the_built_engine(built, cache_copy, capsys):
    cli.verify(bundle_root=str(built[0]), json=True)
    (verdict,) = json.loads(capsys.readouterr().out)["entries"]
    assert verdict["outcome"] == "pass"
    assert [e["shapes"][0][0] for e in verdict["errors"]] == [1, 2, 4]  # min, opt, max batch
    assert all(e["rel_l2"] < 1e-4 for e in verdict["errors"])


def _alter_onnx_weights(entry: Path) -> None:
    """Scale the engine's weights and re-seal the entry (valid sha256s): only a numerical check can notice."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(entry / "model.onnx"))
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.dtype == np.float32 and array.size > 1:
            init.CopyFrom(numpy_helper.from_array(array * 1.5 + 0.1, init.name))
    (entry / "model.onnx.data").unlink()
    onnx.save_model(model, str(entry / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    meta = json.loads((entry / "meta.json").read_text())
    meta["artifacts"] = {n: hashlib.sha256((entry / n).read_bytes()).hexdigest() for n in meta["artifacts"]}
    (entry / "meta.json").write_text(json.dumps(meta))


def test_verify_fails_for_an_engine_that_disagrees(built, cache_copy, capsys):
    (entry,) = entry_dirs(cache_copy)
    _alter_onnx_weights(entry)
    with pytest.raises(UsageError, match="1 engine\\(s\\) disagree with PyTorch"):
        cli.verify(bundle_root=str(built[0]))
    out = capsys.readouterr().out
    assert out.startswith("RESULT") and "FAIL    " + entry.name[:12] in out and "relative L2 error" in out


def test_verify_skips_entries_built_from_other_weights(built, cache_copy, tmp_path, capsys):
    from monai.networks.nets import UNet

    other = tmp_path / "other.pt"
    torch.save(UNet(**UNET).state_dict(), other)
    with pytest.raises(UsageError, match="nothing was verified"):
        cli.verify(bundle_root=str(built[0]), ckpt=str(other))
    assert "SKIP" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------- ls / clean
def fake_entry(root: Path, name: str, size: int = 1000, last_used: float | None = None, **changes) -> Path:
    """A real cache entry (published by EngineCache.build) with a dummy artifact: fast, no engine."""
    key_inputs = {"submodule": "", "module_class": "tests.nets.TinySeg", "method": "onnxruntime",
                  "precision": "fp16", "versions": OnnxRuntimeBackend().versions(), "device": {"type": "cpu"},
                  "platform": platform_info(), "name": name, **changes}
    io_ = {"names": ["x"], "dtypes": ["float16"], "profiles": [[[[1, 1, 8, 8, 8], [2, 1, 8, 8, 8], [4, 1, 8, 8, 8]]]]}

    def build(tmp: Path) -> dict:
        (tmp / "model.onnx").write_bytes(b"\0" * size)
        return {"artifacts": ["model.onnx"], "key_inputs": key_inputs, "io": io_, "created": 1000.0}

    entry = EngineCache.open(root).build(engine_key(key_inputs), key_inputs, build)
    if last_used is not None:
        (entry.path / "usage.json").write_text(json.dumps({"hits": 3, "last_used": last_used}))
    return entry.path


def test_ls_json_lists_entries_with_usage_and_loadable(cache_dir, capsys):
    path = fake_entry(Path(cache_dir), "a", last_used=2000.0)
    cli.ls(json=True)
    (row,) = json.loads(capsys.readouterr().out)["entries"]
    assert row["key"] == path.name and row["loadable"] is True and row["status"] == "ok"
    assert (row["method"], row["precision"], row["submodule"], row["hits"]) == ("onnxruntime", "fp16", "", 3)
    assert row["size"] == sum(f.stat().st_size for f in path.iterdir())
    assert (row["created"], row["last_used"]) == (1000.0, 2000.0)


def test_ls_explains_entries_not_loadable_here(cache_dir, capsys):
    root = Path(cache_dir)
    fake_entry(root, "ok")
    old = fake_entry(root, "old", versions={**OnnxRuntimeBackend().versions(), "onnxruntime": "0.0.1"})
    gpu = fake_entry(root, "gpu", device={"type": "cuda", "capability": "0.1"})
    bad = fake_entry(root, "bad")
    (bad / "model.onnx").write_bytes(b"tampered")
    status = {e.path: (e.status, e.reason) for e in scan(root)}
    here = OnnxRuntimeBackend().versions()["onnxruntime"]
    assert status[old] == ("stale", f"onnxruntime 0.0.1 in entry, {here} here")
    assert status[gpu][0] == "stale" and "sm 0.1" in status[gpu][1]
    assert status[bad] == ("refused", "artifact model.onnx does not match its sha256 (corrupt or tampered)")
    cli.ls()
    out = capsys.readouterr().out
    assert out.startswith(f"cache {root}: 4 entries") and out.count(" yes\n") == 1
    assert f"  {old.name[:12]}: stale: onnxruntime 0.0.1 in entry" in out


def test_ls_of_a_missing_cache_creates_nothing(tmp_path, capsys):
    cli.ls(cache_dir=str(tmp_path / "none"))
    assert "0 entries" in capsys.readouterr().out and not (tmp_path / "none").exists()


def test_ls_creates_no_side_directories(tmp_path, capsys):
    root = tmp_path / "copied"
    shutil.copytree(fake_entry(tmp_path / "built", "a").parent, root / "entries")  # entries/ only, as in an image
    cli.ls(cache_dir=str(root))
    assert "1 entry" in capsys.readouterr().out
    assert sorted(p.name for p in root.iterdir()) == ["entries"]


def test_clean_is_a_dry_run_until_yes(cache_dir, capsys):
    root = Path(cache_dir)
    good = fake_entry(root, "good")
    stale = fake_entry(root, "stale", versions={"onnxruntime": "0.0.1"})
    (root / "quarantine" / "x.20260101").mkdir()
    cli.clean()
    assert "would remove  " + stale.name[:12] in capsys.readouterr().out
    assert stale.exists() and (root / "quarantine" / "x.20260101").exists()
    cli.clean(yes=True)
    assert "removed 2 item(s)" in capsys.readouterr().out
    assert entry_dirs(root) == [good] and not any((root / "quarantine").iterdir())


def test_clean_max_size_evicts_least_recently_used(cache_dir, capsys):
    root = Path(cache_dir)
    oldest, middle, newest = (fake_entry(root, n, last_used=t) for n, t in (("a", 100.0), ("b", 200.0), ("c", 300.0)))
    sizes = {e.path: e.size for e in scan(root)}
    cli.clean(max_size=sizes[middle] + sizes[newest], yes=True, json=True)
    result = json.loads(capsys.readouterr().out)
    assert [i["key"] for i in result["items"]] == [oldest.name] and result["kept_entries"] == 2
    assert entry_dirs(root) == sorted([middle, newest])


def test_clean_all_removes_every_entry(cache_dir, capsys):
    root = Path(cache_dir)
    for name in "ab":
        fake_entry(root, name)
    timing = root / "timing" / "trt10.13.0-sm90.cache"
    timing.write_bytes(b"tactics")
    # what only changes speed: the speed gate's measurements, the prices of taking engines (the warning of a slower
    # engine says that `clean --all` forgets its measurement)
    remembered = [root / "verdicts" / f"{'a' * 64}.json", root / "loads" / f"{'b' * 64}.json"]
    for path in remembered:
        path.write_text("{}")
    cli.clean(yes=True)
    assert timing.exists(), "a plain clean keeps the timing cache (it only speeds up builds)"
    assert all(path.exists() for path in remembered), "a plain clean keeps what was measured"
    cli.clean(all=True, yes=True)
    assert entry_dirs(root) == [] and not timing.exists() and "removed 5 item(s)" in capsys.readouterr().out
    assert not any(path.exists() for path in remembered)


@pytest.mark.parametrize("text, size", [("2GB", 2 * 10**9), ("500MiB", 500 * 2**20), ("1.5e3", 1500), (4096, 4096)])
def test_parse_size(text, size):
    assert parse_size(text) == size


def test_parse_size_rejects_nonsense():
    with pytest.raises(Exception, match="--max_size must be a size"):
        parse_size("lots")


# ------------------------------------------------------------------------------------------------- info / main
def test_info_lists_engines_and_why_missing(monkeypatch, capsys):
    import monai_trt.backends.onnxruntime as ort_backend

    cli.info(json=True)
    rows = {(r["method"], r["device"]): r for r in json.loads(capsys.readouterr().out)["engines"]}
    assert rows[("onnxruntime", "cpu")]["available"] and "onnxruntime" in rows[("onnxruntime", "cpu")]["versions"]
    if not torch.cuda.is_available():
        assert not rows[("aoti", "cuda")]["available"] and "CUDA" in rows[("aoti", "cuda")]["reason"]
    monkeypatch.setattr(ort_backend, "_HAS_ORT", False)
    cli.info()
    out = capsys.readouterr().out
    assert "onnxruntime  ONNX Runtime         cpu     no         the onnxruntime package is not installed" in out


def test_main_prints_one_error_line_and_exits_1(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(sys, "argv", ["monai_trt", "build", "--bundle_root", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 1
    assert capsys.readouterr().err.startswith("monai_trt: error: no configs/inference.json under bundle_root")


def test_progress_shows_phases_elapsed_and_a_bar_when_reported():
    stream = io.StringIO()
    with Progress(enabled=True, stream=stream):
        emit(Event("net", "phase", phase="building onnxruntime engine"))
        report("net", "engine build", 3, 10)
        time.sleep(0.6)  # one tick of the elapsed-time refresh
        emit(Event("net", "built", detail={"path": "/c/entries/abc"}))
        emit(Event("other", "cache_hit"))
    text = stream.getvalue()
    assert "net: building onnxruntime engine" in text
    assert "net: engine build" in text and " 30%" in text
    assert "net: engine saved [" in text
    assert "other: already in the cache" in text


def test_progress_disabled_writes_nothing():
    stream = io.StringIO()
    with Progress(enabled=False, stream=stream) as progress:
        report("net", "engine build", 3, 10)
        progress.note("hello")
        progress.finish("net", "done")
    assert stream.getvalue() == ""


def test_help_after_a_command_shows_its_flags(monkeypatch, capfd):
    monkeypatch.setattr(sys, "argv", ["monai_trt", "build", "--help"])
    monkeypatch.setenv("PAGER", "cat")
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 0
    out, err = capfd.readouterr()
    assert "monai_trt build" in out + err and "--spatial_shape" in out + err
