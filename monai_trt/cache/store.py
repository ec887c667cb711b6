"""On-disk engine cache: one directory per key, published atomically, built once under a per-key file lock.

Layout under the cache root::

    entries/<key>/meta.json     written last; artifact sha256s and the key's inputs in readable form
    entries/<key>/<artifacts>   engine files (e.g. engine.pt2, model.onnx + model.onnx.data)
    entries/<key>/usage.json    hits and last use (statistics only; never trusted for loading)
    locks/<key>.lock            per-key lock: concurrent processes build once, the others wait and load
    tmp/<key>.<pid>.<random>/   builds in progress (renamed into entries/ when complete)
    quarantine/<key>.<time>/    entries that failed verification or loading, kept for inspection
    timing/<name>.cache         TensorRT tactic timing caches (per TensorRT version and GPU), shared by builds
    failures/<key>.json         export failures (deterministic for their key): not retried until the key changes

Artifacts are code (a .pt2 holds a shared library), so an entry is only loaded when it is owned by the current
user, not group/world-writable, and every artifact matches the sha256 recorded in its meta.json.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from monai_trt.cache.keys import SCHEMA_VERSION, engine_key
from monai_trt.errors import CacheError
from monai_trt.files import write_atomic

__all__ = ["CacheEntry", "EngineCache", "pid_alive"]

logger = logging.getLogger(__name__)
META = "meta.json"
USAGE = "usage.json"
_LOCK_POLL_SECONDS = 30.0


@dataclass(frozen=True)
class CacheEntry:
    """A verified entry: its directory and its parsed meta.json."""

    key: str
    path: Path
    meta: Mapping[str, Any]


def _sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            sha.update(block)
    return sha.hexdigest()


def _private_dir(path: Path) -> Path:
    """Create `path` (and parents) if missing; directories this call creates are 0700."""
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.chmod(0o700)
    return path


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class EngineCache:
    """Engine cache rooted at a directory. Use :meth:`open`, which falls back to a private temp dir."""

    def __init__(self, root: Path, create: bool = True) -> None:
        """Args: create: make the side directories (False: read-only inspection of an existing cache)."""
        self.root = root
        if create:
            for sub in ("entries", "locks", "tmp", "quarantine", "timing", "failures"):
                _private_dir(root / sub)

    @classmethod
    def open(cls, root: str | os.PathLike) -> EngineCache:
        """Open (creating) the cache at `root`; when it is not writable, warn and use a private temp dir."""
        path = Path(root).expanduser().absolute()
        try:
            cache = cls(path)
            probe = path / "tmp" / f".probe.{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
            return cache
        except OSError as err:
            fallback = Path(tempfile.mkdtemp(prefix="monai_trt-"))
            logger.warning("engine cache %s is not usable (%s); using %s for this process", path, err, fallback)
            return cls(fallback)

    @property
    def timing_dir(self) -> Path:
        """Where backends keep side caches that speed up later builds (TensorRT timing caches)."""
        return self.root / "timing"

    def entry_dir(self, key: str) -> Path:
        return self.root / "entries" / key

    # ------------------------------------------------------------------ lookup
    def lookup(self, key: str) -> CacheEntry | None:
        """The verified entry for `key`, or None. Bad entries are quarantined (or refused) with a warning."""
        path = self.entry_dir(key)
        if not path.exists():
            return None
        try:
            return self.verify(key, path)
        except CacheError as err:
            self._discard(key, path, str(err))
            return None

    def verify(self, key: str, path: Path) -> CacheEntry:
        """Check ownership, permissions, meta.json and every artifact's sha256.

        Raises:
            CacheError: with the reason the entry cannot be trusted.
        """
        self._check_private(path)
        try:
            meta = json.loads((path / META).read_text())
        except FileNotFoundError as err:
            raise CacheError(f"{META} is missing") from err
        except (OSError, ValueError) as err:
            raise CacheError(f"{META} is unreadable: {err}") from err
        if not isinstance(meta, dict) or meta.get("key") != key or meta.get("schema") != SCHEMA_VERSION:
            raise CacheError(f"{META} does not describe key {key[:12]} (schema {SCHEMA_VERSION})")
        if engine_key(meta.get("key_inputs", {})) != key:
            raise CacheError(f"{META}'s key inputs (weights, versions, device...) do not hash to key {key[:12]}")
        artifacts = meta.get("artifacts")
        if not isinstance(artifacts, dict) or not artifacts:
            raise CacheError(f"{META} lists no artifacts")
        for name, expected in artifacts.items():
            if not isinstance(name, str) or Path(name).name != name or name in (".", "..", META):
                raise CacheError(f"artifact name {name!r} would escape the entry directory")
            file = path / name
            if file.is_symlink() or not file.is_file():
                raise CacheError(f"artifact {name} is missing or not a regular file")
            if _sha256_file(file) != expected:
                raise CacheError(f"artifact {name} does not match its sha256 (corrupt or tampered)")
        return CacheEntry(key, path, meta)

    @staticmethod
    def _check_private(path: Path) -> None:
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            raise CacheError("entry directory is a symlink")
        if hasattr(os, "getuid") and info.st_uid != os.getuid():
            raise CacheError(f"entry is owned by uid {info.st_uid}, not the current user")
        for checked in (path, path.parent):
            if checked.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                raise CacheError(f"{checked} is group- or world-writable")

    def _discard(self, key: str, path: Path, reason: str) -> None:
        moved = self.quarantine(key, reason)
        if moved is None:
            logger.warning("refusing cache entry %s: %s", path, reason)

    def quarantine(self, key: str, reason: str) -> Path | None:
        """Move an entry aside (kept for inspection) so the key can be rebuilt; None if it could not be moved."""
        path = self.entry_dir(key)
        target = self.root / "quarantine" / f"{key}.{time.strftime('%Y%m%d-%H%M%S')}.{os.getpid()}"
        try:
            os.rename(path, target)
        except OSError:
            return None
        logger.warning("moved bad cache entry %s aside to %s: %s", path, target, reason)
        return target

    # ------------------------------------------------------------------ build
    def lock(self, key: str) -> FileLock:
        return FileLock(str(self.root / "locks" / f"{key}.lock"), mode=0o600)

    def acquire(self, lock: FileLock, what: str) -> None:
        """Wait for `lock`, logging every 30 s that another process is building `what`."""
        waited = 0.0
        while True:
            try:
                lock.acquire(timeout=_LOCK_POLL_SECONDS if waited else 0.5)
                return
            except Timeout:
                waited += _LOCK_POLL_SECONDS if waited else 0.5
                logger.info("waiting for another process to finish building %s (%.0f s)", what, waited)

    def build(self, key: str, meta: Mapping[str, Any], build: Callable[[Path], Mapping[str, Any]]) -> CacheEntry:
        """Return the entry for `key`, building it with `build(tmp_dir)` unless another process already did.

        `build` writes artifacts into `tmp_dir` and returns extra meta, including `artifacts`: the file names.
        meta.json is written last, then the directory is renamed into place; on any failure nothing is published.
        """
        lock = self.lock(key)
        self.acquire(lock, f"engine {key[:12]}")
        try:
            entry = self.lookup(key)
            if entry is not None:
                return entry
            self._clean_dead_builds(key)
            tmp = Path(tempfile.mkdtemp(prefix=f"{key}.{os.getpid()}.", dir=self.root / "tmp"))
            try:
                result = dict(build(tmp))
                names = result.pop("artifacts")
                artifacts = {name: _sha256_file(tmp / name) for name in names}
                full = {**meta, **result, "schema": SCHEMA_VERSION, "key": key, "artifacts": artifacts}
                full.setdefault("created", time.time())
                write_atomic(tmp / META, json.dumps(full, indent=1, sort_keys=True, default=str).encode())
                return self._publish(key, tmp, full)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            lock.release()

    def _publish(self, key: str, tmp: Path, meta: Mapping[str, Any]) -> CacheEntry:
        target = self.entry_dir(key)
        try:
            os.rename(tmp, target)
        except OSError as err:
            logger.warning("could not publish engine to %s (%s); using it from %s for this process", target, err, tmp)
            return CacheEntry(key, tmp, meta)
        return CacheEntry(key, target, meta)

    def _clean_dead_builds(self, key: str) -> None:
        for stale in (self.root / "tmp").glob(f"{key}.*"):
            try:
                pid = int(stale.name.split(".")[1])
            except (IndexError, ValueError):
                continue
            if not pid_alive(pid) or pid == os.getpid():
                logger.info("removing leftover build %s of a process that is gone", stale)
                shutil.rmtree(stale, ignore_errors=True)

    # ------------------------------------------------------------------ bookkeeping
    def record_use(self, entry: CacheEntry) -> None:
        """Count a load in usage.json (best effort: statistics only)."""
        path = entry.path / USAGE
        try:
            usage = json.loads(path.read_text()) if path.exists() else {}
            usage = {"hits": int(usage.get("hits", 0)) + 1, "last_used": time.time()}
            write_atomic(path, json.dumps(usage).encode())
        except (OSError, ValueError, TypeError):
            pass

    def failure(self, key: str) -> str | None:
        """Why exporting for `key` failed in an earlier process (None: no failure remembered, or an unreadable one)."""
        path = self.root / "failures" / f"{key}.json"
        try:
            if path.is_symlink() or path.stat().st_uid != os.getuid():
                return None  # only our own records can stop a build
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        reason = record.get("reason") if isinstance(record, dict) and record.get("key") == key else None
        return reason if isinstance(reason, str) else None

    def record_failure(self, key: str, key_inputs: Mapping[str, Any], reason: str) -> None:
        """Remember that exporting for `key` failed (best effort), so later processes do not try again."""
        record = {"key": key, "reason": reason, "time": time.time(), "key_inputs": key_inputs}
        try:
            _private_dir(self.root / "failures")
            write_atomic(self.root / "failures" / f"{key}.json", json.dumps(record, default=str).encode())
        except OSError as err:
            logger.debug("could not record the export failure of %s: %s", key, err)

    def entries(self) -> Iterator[Path]:
        """Directories under entries/ (unverified)."""
        yield from sorted(p for p in (self.root / "entries").iterdir() if p.is_dir())
