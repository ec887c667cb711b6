"""Issue 14: a cache no other user can take over, and that survives faults without losing good engines.

Each numbered case of the issue has a test here. A second account is played by `nobody` (via `setpriv`) where a test
needs a real one, and other owners by `chown` (root only); those tests skip cleanly elsewhere.
"""

from __future__ import annotations

import copy
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch

import monai_trt
from monai_trt.cache import store
from monai_trt.cache.inventory import leftovers
from monai_trt.cache.keys import engine_key
from monai_trt.cache.store import BuildTimeout, EngineCache, pid_alive
from monai_trt.errors import EngineBuildError, PatchError
from monai_trt.patch import parse_patch
from tests.nets import TinySeg

ROOT_DIR = Path(__file__).parents[1]
INPUTS = {"key_inputs": {"x": 1}}
KEY = engine_key(INPUTS["key_inputs"])
OTHER_KEY = engine_key({"x": 2})
ORT = {"method": "onnxruntime", "precision": "fp32"}
OTHER_UID = 65534  # nobody


def _can_become_nobody() -> bool:
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("setpriv") is None:
        return False
    try:
        pwd.getpwnam("nobody")
        return subprocess.run(_NOBODY + ["true"], capture_output=True, timeout=30).returncode == 0
    except (KeyError, OSError, subprocess.SubprocessError):
        return False


_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
needs_root = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root (chown)")
needs_nobody = pytest.mark.skipif(not _can_become_nobody(), reason="needs root and `setpriv` to act as `nobody`")


def as_nobody(code: str, env: dict | None = None) -> subprocess.Popen:
    """Start Python `code` as the second account, with this checkout importable (`.communicate()` for its output)."""
    full_env = {"PATH": os.environ.get("PATH", ""), "HOME": "/tmp", "PYTHONPATH": str(ROOT_DIR),
                "MPLCONFIGDIR": "/tmp", **(env or {})}
    return subprocess.Popen(_NOBODY + [sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=full_env, cwd="/tmp")


def build_ok(tmp: Path) -> dict:
    (tmp / "engine.bin").write_bytes(b"engine-bytes")
    return {"artifacts": ["engine.bin"]}


def count(path: Path) -> int:
    return len(list(path.iterdir())) if path.is_dir() else 0


def run(net, x):
    with torch.no_grad():
        return net(x)


def reference(net, x):
    plain = copy.deepcopy(net)
    monai_trt.remove(plain)
    return run(plain, x)


@pytest.fixture
def x():
    return torch.randn(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def shared_tmp():
    """A world-writable sticky directory outside pytest's private tmp (as /tmp is), both accounts can reach."""
    path = Path(tempfile.mkdtemp(prefix="monai_trt-shared-", dir="/tmp"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def processes():
    """Child processes a test starts; killed (and reaped) at the end whatever happens."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def hold_lock(lock_path: Path, processes: list) -> subprocess.Popen:
    """A process holding `lock_path` (as a builder does), then stopped with SIGSTOP (as a hung builder is)."""
    code = ("import sys, time; from filelock import FileLock; l = FileLock(sys.argv[1]); l.acquire(); "
            "print('LOCKED', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(lock_path)], stdout=subprocess.PIPE, text=True)
    processes.append(proc)
    assert proc.stdout.readline().strip() == "LOCKED"
    proc.send_signal(signal.SIGSTOP)
    return proc


def zombie(processes: list) -> int:
    """The pid of a child that has exited but is not reaped yet (a zombie)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    processes.append(proc)
    for _ in range(200):
        with open(f"/proc/{proc.pid}/stat", "rb") as handle:
            if handle.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                return proc.pid
        time.sleep(0.05)
    pytest.fail("the child did not become a zombie")


# ---------------------------------------------------------------- 1. another user's cache layout
@needs_nobody
def test_cache_layout_another_user_created_first_is_refused(shared_tmp, trt_logs):
    root = shared_tmp / "cache"
    made = subprocess.run(_NOBODY + ["mkdir", "-m", "755", "-p", *(str(root / d) for d in
                                                                   ("entries", "locks", "tmp", "quarantine"))])
    assert made.returncode == 0 and root.stat().st_uid == OTHER_UID
    cache = EngineCache.open(root)
    assert cache.root != root
    assert f"{root} is owned by uid {OTHER_UID}" in trt_logs.text()
    cache.build(KEY, INPUTS, build_ok)
    assert count(root / "entries") == 0  # nothing of ours lands where the other account can swap it


def test_cache_root_symlinked_to_a_world_writable_dir_is_refused(tmp_path, trt_logs):
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    (tmp_path / "cache").symlink_to(open_dir)
    cache = EngineCache.open(tmp_path / "cache")
    assert cache.root not in (tmp_path / "cache", open_dir)
    assert f"chmod 700 {open_dir}" in trt_logs.text()


def test_cache_root_symlinked_to_a_private_dir_is_used(tmp_path):
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "cache").symlink_to(tmp_path / "real")
    assert EngineCache.open(tmp_path / "cache").root == tmp_path / "real"


def test_cache_inside_a_directory_others_can_write_is_refused(tmp_path, trt_logs):
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)  # not sticky: anyone may rename the cache away and put their own in its place
    cache = EngineCache.open(open_dir / "cache")
    assert cache.root != open_dir / "cache"
    assert "a directory above the cache, is writable by other users" in trt_logs.text()


@needs_root
def test_entries_dir_owned_by_another_user_is_refused(tmp_path, trt_logs):
    EngineCache.open(tmp_path / "c").build(KEY, INPUTS, build_ok)
    os.chown(tmp_path / "c" / "entries", OTHER_UID, OTHER_UID)
    cache = EngineCache.open(tmp_path / "c")
    assert cache.root != tmp_path / "c" and cache.lookup(KEY) is None
    assert f"entries is owned by uid {OTHER_UID}" in trt_logs.text()


# ---------------------------------------------------------------- 2. artifacts: owner, mode, links, time of use
@pytest.mark.parametrize("unsafe", ["mode 0666", "hard link", pytest.param("other owner", marks=needs_root)])
def test_artifact_not_private_to_its_owner_is_quarantined(tmp_path, unsafe, trt_logs):
    cache = EngineCache.open(tmp_path / "c")
    artifact = cache.build(KEY, INPUTS, build_ok).path / "engine.bin"
    if unsafe == "mode 0666":
        artifact.chmod(0o666)
    elif unsafe == "hard link":
        os.link(artifact, tmp_path / "elsewhere.bin")
    else:
        os.chown(artifact, OTHER_UID, OTHER_UID)
    assert cache.lookup(KEY) is None
    assert count(tmp_path / "c" / "quarantine") == 1
    assert {"mode 0666": "world-writable", "hard link": "2 hard links", "other owner": "owned by uid"}[unsafe] \
        in trt_logs.text()


def test_a_fifo_in_place_of_an_artifact_is_refused_without_blocking(tmp_path):
    cache = EngineCache.open(tmp_path / "c")
    artifact = cache.build(KEY, INPUTS, build_ok).path / "engine.bin"
    artifact.unlink()
    os.mkfifo(artifact, 0o600)
    assert cache.lookup(KEY) is None


def test_the_loader_gets_the_bytes_that_were_verified(tmp_path):
    cache = EngineCache.open(tmp_path / "c")
    cache.build(KEY, INPUTS, build_ok)
    entry = cache.lookup(KEY)
    (entry.path / "engine.bin").write_bytes(b"evil-bytes!!")  # changed after the check, before the load
    assert (entry.files / "engine.bin").read_bytes() == b"engine-bytes"
    assert stat.S_IMODE(entry.files.stat().st_mode) == 0o700 and entry.files.stat().st_uid == os.getuid()
    cache.release(entry)
    assert not entry.files.exists()


def test_engine_is_loaded_from_the_verified_copy(cache_dir, x, monkeypatch):
    from monai_trt.backends.onnxruntime import OnnxRuntimeBackend

    net = TinySeg().eval()
    run(monai_trt.apply(net, [ORT]), x)
    (key,) = os.listdir(Path(cache_dir) / "entries")
    shared = Path(cache_dir) / "entries" / key / "model.onnx"
    real_load, seen = OnnxRuntimeBackend.load, []

    def load_after_a_swap(self, entry_dir, meta, device, **options):
        shared.write_bytes(b"not the verified model")  # the shared file changes between check and use
        seen.append(Path(entry_dir))
        return real_load(self, entry_dir, meta, device, **options)

    monkeypatch.setattr(OnnxRuntimeBackend, "load", load_after_a_swap)
    again = monai_trt.apply(copy.deepcopy(net), [ORT])
    torch.testing.assert_close(run(again, x), reference(net, x), rtol=1e-4, atol=1e-5)
    wrapper = monai_trt.wrappers(again)[""]
    assert wrapper.calls["engine"] == 1 and wrapper.builds == 0
    assert seen and Path(cache_dir) / "entries" not in seen[0].parents and not seen[0].exists()


# ---------------------------------------------------------------- 3. a load failure stays in its process
def test_load_failure_disables_the_engine_in_this_process_only(cache_dir, x, monkeypatch, trt_logs):
    from monai_trt.backends.onnxruntime import OnnxRuntimeBackend

    net = TinySeg().eval()
    run(monai_trt.apply(net, [ORT]), x)

    def out_of_memory(self, entry_dir, meta, device, **options):
        raise RuntimeError("pthread_create failed: Resource temporarily unavailable")  # 8 MB of address space short

    with monkeypatch.context() as patched:
        patched.setattr(OnnxRuntimeBackend, "load", out_of_memory)
        starved = monai_trt.apply(copy.deepcopy(net), [ORT])
        torch.testing.assert_close(run(starved, x), reference(net, x))
        assert monai_trt.wrappers(starved)[""].disabled
    assert "could not be loaded in this process" in trt_logs.text()
    assert count(Path(cache_dir) / "quarantine") == 0 and count(Path(cache_dir) / "entries") == 1
    healthy = monai_trt.apply(copy.deepcopy(net), [ORT])  # the next process loads the shared entry
    run(healthy, x)
    assert monai_trt.wrappers(healthy)[""].builds == 0 and monai_trt.wrappers(healthy)[""].calls["engine"] == 1


STARVED = textwrap.dedent(
    """
    import json, resource, torch, monai_trt
    from tests.nets import TinySeg
    torch.manual_seed(0)
    net, x = TinySeg().eval(), torch.randn(2, 1, 8, 8, 8)
    with torch.no_grad():
        net(x)  # PyTorch's own allocations happen before the limit
    net = monai_trt.apply(net, [{"method": "onnxruntime", "precision": "fp32"}])
    size = int([line for line in open("/proc/self/status") if line.startswith("VmSize")][0].split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (size + 8 * 2**20, resource.RLIM_INFINITY))  # 8 MB of address space left
    with torch.no_grad():
        net(x)
    print(json.dumps(monai_trt.wrappers(net)[""].calls))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmSize from /proc")
def test_process_short_of_address_space_leaves_the_shared_entry_alone(cache_dir, x):
    torch.manual_seed(0)  # the same weights as the child's: the same key
    net = TinySeg().eval()
    run(monai_trt.apply(net, [ORT]), x)
    env = {**os.environ, "MONAI_TRT_CACHE": cache_dir, "PYTHONPATH": str(ROOT_DIR)}
    starved = subprocess.run([sys.executable, "-c", STARVED], env=env, capture_output=True, text=True, timeout=300)
    assert starved.returncode == 0, starved.stderr[-2000:]
    assert json.loads(starved.stdout.splitlines()[-1]) == {"engine": 0, "pytorch": 1}  # its thread pool could not start
    assert count(Path(cache_dir) / "quarantine") == 0 and count(Path(cache_dir) / "entries") == 1
    assert "could not be loaded in this process" in starved.stdout


# ---------------------------------------------------------------- 4. a bad cache directory: refuse once, never grow
def test_group_writable_entries_dir_is_refused_without_growing_the_cache(tmp_path, trt_logs):
    root = tmp_path / "c"
    EngineCache.open(root).build(KEY, INPUTS, build_ok)
    (root / "entries").chmod(0o770)
    for _ in range(3):  # three processes in turn
        cache = EngineCache.open(root)
        assert cache.root != root
        assert cache.lookup(KEY) is None
        cache.build(KEY, INPUTS, build_ok)
    assert count(root / "quarantine") == 0 and os.listdir(root / "entries") == [KEY]
    assert trt_logs.text().count(f"fix: chmod 700 {root / 'entries'}") == 3


def test_bad_cache_dir_warns_once_per_process(tmp_path, x, trt_logs):
    root = tmp_path / "c"
    EngineCache.open(root)
    (root / "entries").chmod(0o770)
    patch = [{**ORT, "path": str(root)}]
    first, second = monai_trt.apply(TinySeg().eval(), patch), monai_trt.apply(TinySeg().eval(), patch)
    run(first, x), run(second, x)
    assert trt_logs.text().count("is not usable") == 1
    assert monai_trt.wrappers(first)[""].calls["engine"] == 1 and count(root / "entries") == 0


# ---------------------------------------------------------------- 5. a hung builder: bounded wait
def test_build_timeout_is_a_patch_field():
    (entry,) = parse_patch([{"build_timeout": 60}])
    assert entry.build_timeout == 60.0 and parse_patch([{}])[0].build_timeout == 1800.0
    for bad in (-1, "soon", True, float("inf")):
        with pytest.raises(PatchError, match="build_timeout"):
            parse_patch([{"build_timeout": bad}])


def test_waiter_gives_up_after_build_timeout(tmp_path, processes):
    cache = EngineCache.open(tmp_path / "c")
    holder = hold_lock(cache.root / "locks" / f"{KEY}.lock", processes)
    start = time.monotonic()
    with pytest.raises(BuildTimeout, match="build_timeout"):
        cache.build(KEY, INPUTS, build_ok, timeout=0.5)
    assert time.monotonic() - start < 10
    holder.kill()
    holder.wait(timeout=30)
    assert cache.build(KEY, INPUTS, build_ok, timeout=0.5).key == KEY  # the dead builder's lock is free


def test_hung_builder_means_pytorch_for_now_then_the_engine(tmp_path, x, processes, trt_logs):
    net = TinySeg().eval()
    run(monai_trt.apply(net, [{**ORT, "path": str(tmp_path / "built")}]), x)
    (key,) = os.listdir(tmp_path / "built" / "entries")
    busy = tmp_path / "busy"
    EngineCache.open(busy)
    hold_lock(busy / "locks" / f"{key}.lock", processes)
    waiter = monai_trt.apply(copy.deepcopy(net), [{**ORT, "path": str(busy), "build_timeout": 1}])
    wrapper = monai_trt.wrappers(waiter)[""]
    torch.testing.assert_close(run(waiter, x), reference(net, x))
    assert "running PyTorch for now" in trt_logs.text() and not wrapper.disabled
    start = time.monotonic()
    run(waiter, x)  # the build is still running: no second wait
    assert time.monotonic() - start < 0.9 and wrapper.calls == {"engine": 0, "pytorch": 2}
    strict = monai_trt.apply(copy.deepcopy(net), [{**ORT, "path": str(busy), "build_timeout": 0, "fallback": False}])
    with pytest.raises(EngineBuildError, match="build_timeout"):
        run(strict, x)
    shutil.copytree(tmp_path / "built" / "entries" / key, busy / "entries" / key)  # the other build is published
    torch.testing.assert_close(run(waiter, x), reference(net, x), rtol=1e-4, atol=1e-5)
    assert wrapper.calls["engine"] == 1 and wrapper.builds == 0
    assert trt_logs.text().count("running PyTorch for now") == 1


# ---------------------------------------------------------------- 6. zombie builders
def test_pid_alive_treats_a_zombie_as_gone(processes):
    assert pid_alive(os.getpid())
    assert not pid_alive(zombie(processes))


def test_leftover_build_of_a_zombie_builder_is_removed(tmp_path, processes):
    cache = EngineCache.open(tmp_path / "c")
    leftover = cache.root / "tmp" / f"{KEY}.{zombie(processes)}.abc"
    leftover.mkdir()
    assert [p for p, _ in leftovers(cache.root)] == [leftover]  # what `clean --yes` would remove
    cache.build(KEY, INPUTS, build_ok)
    assert not leftover.exists()


# ---------------------------------------------------------------- 7. meta.json schema
DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("field,value", [
    ("key_inputs", "[]"), ("key_inputs", "null"), ("key_inputs", DEEP), ("artifacts", '{"engine.bin": 1}'),
    ("io", '{"names": "x", "dtypes": [], "profiles": []}'), ("created", '"yesterday"'),
])
def test_meta_with_wrong_types_is_quarantined(tmp_path, field, value):
    cache = EngineCache.open(tmp_path / "c")
    entry = cache.build(KEY, INPUTS, build_ok)
    meta = json.loads((entry.path / "meta.json").read_text())
    meta[field] = "@@"
    (entry.path / "meta.json").write_text(json.dumps(meta).replace('"@@"', value))
    assert cache.lookup(KEY) is None  # no TypeError / RecursionError past the check
    assert count(tmp_path / "c" / "quarantine") == 1


def test_meta_with_wrong_types_is_rebuilt_not_disabled(cache_dir, x):
    net = TinySeg().eval()
    run(monai_trt.apply(net, [ORT]), x)
    (key,) = os.listdir(Path(cache_dir) / "entries")
    meta_file = Path(cache_dir) / "entries" / key / "meta.json"
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "key_inputs": None}))
    again = monai_trt.apply(copy.deepcopy(net), [ORT])
    torch.testing.assert_close(run(again, x), reference(net, x), rtol=1e-4, atol=1e-5)
    assert monai_trt.wrappers(again)[""].builds == 1 and not monai_trt.wrappers(again)[""].disabled


# ---------------------------------------------------------------- 8. bounded quarantine/ and tmp/
def tamper_and_look_up(cache: EngineCache, n: int) -> None:
    """`n` entries (of different keys, as a failing cache meets them) found tampered with and quarantined."""
    for i in range(n):
        inputs = {"key_inputs": {"x": 100 + i}}
        key = engine_key(inputs["key_inputs"])
        (cache.build(key, inputs, build_ok).path / "engine.bin").write_bytes(b"tampered")
        assert cache.lookup(key) is None


def test_quarantine_keeps_only_the_newest_entries(tmp_path):
    cache = EngineCache.open(tmp_path / "c")
    tamper_and_look_up(cache, store.QUARANTINE_KEEP + 3)
    kept = sorted(p.name.split(".")[0] for p in (tmp_path / "c" / "quarantine").iterdir())
    newest = [engine_key({"x": 100 + i}) for i in range(3, store.QUARANTINE_KEEP + 3)]
    assert kept == sorted(newest)


def test_quarantine_is_bounded_in_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "QUARANTINE_MAX_BYTES", 10)
    cache = EngineCache.open(tmp_path / "c")
    tamper_and_look_up(cache, 3)
    assert count(tmp_path / "c" / "quarantine") == 1  # the newest is always kept for inspection


def test_leftovers_of_other_keys_are_swept_by_the_next_build(tmp_path, processes):
    cache = EngineCache.open(tmp_path / "c")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = gone.stdout.strip()
    dead_build = cache.root / "tmp" / f"{OTHER_KEY}.{os.getpid()}.x"  # even with a live (reused) pid: lock is free
    dead_copy = cache.root / "tmp" / f"load.{pid}.y"
    busy_key = engine_key({"x": 3})
    live_build = cache.root / "tmp" / f"{busy_key}.{pid}.z"  # its builder still holds the lock
    for path in (dead_build, dead_copy, live_build):
        path.mkdir()
    hold_lock(cache.root / "locks" / f"{busy_key}.lock", processes)
    cache.build(KEY, INPUTS, build_ok)
    assert not dead_build.exists() and not dead_copy.exists() and live_build.exists()


# ---------------------------------------------------------------- threat model: a read-only team cache
@needs_root
def test_cache_of_another_owner_is_used_read_only_only_when_trusted(tmp_path, monkeypatch, trt_logs):
    root = tmp_path / "team"
    EngineCache.open(root).build(KEY, INPUTS, build_ok)
    for path in (root, *root.rglob("*")):
        os.chown(path, OTHER_UID, OTHER_UID)
    assert EngineCache.open(root).root != root
    monkeypatch.setenv("MONAI_TRT_TRUSTED_UIDS", "nobody")
    cache = EngineCache.open(root)
    assert cache.root == root and not cache.writable
    assert (cache.lookup(KEY).files / "engine.bin").read_bytes() == b"engine-bytes"
    built = cache.build(OTHER_KEY, {"key_inputs": {"x": 2}}, build_ok)
    assert root not in built.path.parents and sorted(os.listdir(root / "entries")) == [KEY]


@pytest.mark.slow
@needs_nobody
def test_team_cache_prepared_by_another_account(shared_tmp):
    team = shared_tmp / "team"
    EngineCache.open(team).build(KEY, INPUTS, build_ok)
    subprocess.run(["chmod", "-R", "go+rX", str(team)], check=True)  # what its README tells the team to do
    probe = f"""
        import json
        from pathlib import Path
        from monai_trt.cache.store import EngineCache
        cache = EngineCache.open({str(team)!r})
        entry = cache.lookup({KEY!r}) if cache.root == Path({str(team)!r}) else None
        print(json.dumps({{"used": cache.root == Path({str(team)!r}),
                          "bytes": (entry.files / "engine.bin").read_text() if entry else None}}))
        """
    runs = [as_nobody(probe), as_nobody(probe, {"MONAI_TRT_TRUSTED_UIDS": "root"})]  # in parallel: imports are slow
    (untrusted, untrusted_err), (trusted, trusted_err) = (p.communicate(timeout=300) for p in runs)
    errors = untrusted_err + trusted_err
    # a virtual environment, or a checkout (e.g. cloned into a private mktemp dir), that only root can read
    if "ModuleNotFoundError" in errors or f"Permission denied: '{ROOT_DIR}" in errors:
        pytest.skip("the second account cannot import this Python environment or checkout")
    assert all(p.returncode == 0 for p in runs), (untrusted_err, trusted_err)
    assert json.loads(untrusted.splitlines()[-1]) == {"used": False, "bytes": None}
    assert "owned by uid 0 (root)" in untrusted  # the warning, naming the owner
    assert json.loads(trusted.splitlines()[-1]) == {"used": True, "bytes": "engine-bytes"}
