"""EngineCache: atomic publish, per-key locking across processes, verification, quarantine, permissions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from monai_trt.cache.keys import engine_key
from monai_trt.cache.store import EngineCache

INPUTS = {"key_inputs": {"x": 1}}
KEY = engine_key(INPUTS["key_inputs"])


def build_ok(tmp: Path) -> dict:
    (tmp / "engine.bin").write_bytes(b"engine-bytes")
    return {"artifacts": ["engine.bin"], "note": "built"}


def test_build_publishes_a_verified_entry(tmp_path):
    cache = EngineCache.open(tmp_path / "c")
    entry = cache.build(KEY, INPUTS, build_ok)
    assert entry.path == tmp_path / "c" / "entries" / KEY
    meta = json.loads((entry.path / "meta.json").read_text())
    assert meta["key"] == KEY and meta["note"] == "built" and set(meta["artifacts"]) == {"engine.bin"}
    assert cache.lookup(KEY).meta["artifacts"] == meta["artifacts"]
    assert oct(os.stat(tmp_path / "c" / "entries").st_mode & 0o777) == "0o700"


def test_failed_build_publishes_nothing(tmp_path):
    cache = EngineCache.open(tmp_path / "c")

    def build_fails(tmp: Path) -> dict:
        (tmp / "engine.bin").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        cache.build(KEY, INPUTS, build_fails)
    assert cache.lookup(KEY) is None
    assert list((tmp_path / "c" / "tmp").iterdir()) == []


def test_leftover_build_of_a_dead_process_is_removed(tmp_path):
    cache = EngineCache.open(tmp_path / "c")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / "c" / "tmp" / f"{KEY}.{dead.stdout.strip()}.xyz"
    leftover.mkdir()
    cache.build(KEY, INPUTS, build_ok)
    assert not leftover.exists()


def test_tampered_artifact_is_quarantined(tmp_path):
    cache = EngineCache.open(tmp_path / "c")
    entry = cache.build(KEY, INPUTS, build_ok)
    (entry.path / "engine.bin").write_bytes(b"evil-bytes!!")
    assert cache.lookup(KEY) is None
    assert not entry.path.exists()
    assert len(list((tmp_path / "c" / "quarantine").iterdir())) == 1


@pytest.mark.parametrize("name", ["../escape.bin", "/etc/passwd", "sub/engine.bin", "meta.json"])
def test_artifact_names_cannot_escape_the_entry(tmp_path, name):
    cache = EngineCache.open(tmp_path / "c")
    entry = cache.build(KEY, INPUTS, build_ok)
    meta = json.loads((entry.path / "meta.json").read_text())
    meta["artifacts"] = {name: "0" * 64}
    (entry.path / "meta.json").write_text(json.dumps(meta))
    assert cache.lookup(KEY) is None


def test_symlinked_artifact_is_refused(tmp_path):
    cache = EngineCache.open(tmp_path / "c")
    entry = cache.build(KEY, INPUTS, build_ok)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"engine-bytes")
    (entry.path / "engine.bin").unlink()
    (entry.path / "engine.bin").symlink_to(outside)
    assert cache.lookup(KEY) is None


def test_group_writable_entry_is_refused(tmp_path, trt_logs):
    cache = EngineCache.open(tmp_path / "c")
    entry = cache.build(KEY, INPUTS, build_ok)
    entry.path.chmod(0o777)
    assert cache.lookup(KEY) is None
    assert "group- or world-writable" in trt_logs.text()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_cache_falls_back_to_a_private_temp_dir(tmp_path, trt_logs):
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o500)
    cache = EngineCache.open(root)
    assert cache.root != root
    assert "is not usable" in trt_logs.text()


def test_unwritable_cache_path_falls_back_to_a_private_temp_dir(tmp_path, trt_logs):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cache = EngineCache.open(blocker / "cache")
    assert cache.root != blocker / "cache" and cache.root.is_dir()
    assert "is not usable" in trt_logs.text()


RACER = textwrap.dedent(
    """
    import json, sys, torch, monai_trt
    from tests.nets import TinySeg
    torch.manual_seed(0)
    net = monai_trt.apply(TinySeg().eval(), [{"method": "onnxruntime", "precision": "fp32"}])
    x = torch.randn(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = net(x)
        monai_trt.remove(net)
        ref = net(x)
    w = float((out - ref).abs().max())
    print(json.dumps({"err": w}))
    """
)


@pytest.mark.slow
def test_four_processes_racing_on_one_cold_key_build_once(cache_dir):
    env = {**os.environ, "MONAI_TRT_CACHE": cache_dir, "PYTHONPATH": str(Path(__file__).parents[1])}
    procs = [
        subprocess.Popen([sys.executable, "-c", RACER], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    logs = "".join(o[0] for o in outs)
    assert logs.count("building onnxruntime engine") == 1
    assert logs.count("using cached engine") == 3
    assert all(json.loads(o[0].strip().splitlines()[-1])["err"] < 1e-4 for o in outs)
    assert len(os.listdir(Path(cache_dir) / "entries")) == 1


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to chown")
def test_entry_owned_by_another_user_is_refused(tmp_path, trt_logs):
    cache = EngineCache.open(tmp_path / "c")
    entry = cache.build(KEY, INPUTS, build_ok)
    os.chown(entry.path, 12345, 12345)
    assert cache.lookup(KEY) is None
    assert "owned by uid 12345" in trt_logs.text()


SLOW_BUILDER = textwrap.dedent(
    """
    import time, torch, monai_trt
    from monai_trt.backends.onnxruntime import OnnxRuntimeBackend
    from tests.nets import TinySeg
    real = OnnxRuntimeBackend.build
    def slow(self, job, out_dir):
        files = real(self, job, out_dir)
        print("ARTIFACTS WRITTEN", flush=True)
        time.sleep(120)
        return files
    OnnxRuntimeBackend.build = slow
    torch.manual_seed(0)
    net = monai_trt.apply(TinySeg().eval(), [{"method": "onnxruntime", "precision": "fp32"}])
    with torch.no_grad():
        net(torch.randn(1, 1, 8, 8, 8))
    """
)


@pytest.mark.slow
def test_process_killed_mid_build_leaves_nothing_visible_and_rerun_builds(cache_dir):
    import signal

    import torch

    import monai_trt
    from tests.nets import TinySeg

    env = {**os.environ, "MONAI_TRT_CACHE": cache_dir, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_BUILDER], env=env, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "ARTIFACTS WRITTEN" in line:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    root = Path(cache_dir)
    assert list((root / "entries").iterdir()) == []
    assert len(list((root / "tmp").iterdir())) == 1  # the dead build's leftovers, never published
    torch.manual_seed(0)
    net = monai_trt.apply(TinySeg().eval(), [{"method": "onnxruntime", "precision": "fp32"}])
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        out = net(x)
        ref = monai_trt.remove(net)(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert len(list((root / "entries").iterdir())) == 1
    assert list((root / "tmp").iterdir()) == []


def test_meta_whose_key_inputs_do_not_hash_to_the_key_is_refused(tmp_path):
    """An entry filed under a key its own recorded inputs (weights, versions, device...) do not produce."""
    cache = EngineCache.open(tmp_path / "c")
    entry = cache.build(KEY, INPUTS, build_ok)
    meta = json.loads((entry.path / "meta.json").read_text())
    meta["key_inputs"] = {"x": 2}  # e.g. an engine of other weights copied under this key
    (entry.path / "meta.json").write_text(json.dumps(meta))
    assert cache.lookup(KEY) is None
    assert len(list((tmp_path / "c" / "quarantine").iterdir())) == 1
