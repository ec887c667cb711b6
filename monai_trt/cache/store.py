"""On-disk engine cache: one directory per key, published atomically, built once under a per-key file lock.

Layout under the cache root::

    entries/<key>/meta.json     written last; artifact sha256s and the key's inputs in readable form
    entries/<key>/<artifacts>   engine files (e.g. engine.pt2, model.onnx + model.onnx.data)
    entries/<key>/usage.json    hits and last use (statistics only; never trusted for loading)
    locks/<key>.lock            per-key lock: concurrent processes build once, the others wait and load
    tmp/<key>.<pid>.<random>/   builds in progress (renamed into entries/ when complete)
    tmp/load.<pid>.<random>/    private verified copies of an entry's artifacts, loaded from and then removed
    quarantine/<key>.<time>/    entries that failed verification, kept for inspection (the newest few only)
    timing/<name>.cache         TensorRT tactic timing caches (per TensorRT version and GPU), shared by builds
    failures/<key>.json         export failures (deterministic for their key): not retried until the key changes
    plans/<key>.json            `submodule: auto`: which parts of a search root became engines (runtime/planner.py)
    verdicts/<key>.json         per machine: the speed gate's measurement, and the weights the engine was validated with
    loads/<key>.json            per call layout and machine: what taking an engine costs and saves (runtime/rent.py)

Artifacts are code (a .pt2 holds a shared library), so nothing is loaded unless the cache root, every directory above
it, `entries/`, the entry and each artifact are safe from other accounts (:mod:`.trust`), meta.json passes its
schema (:mod:`.meta`), and each artifact matches its sha256 — hashed from the descriptor whose owner, mode and link
count were checked, while copying those same bytes into a private directory that the backend then loads.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from monai_trt.cache.housekeeping import prune_oldest, sweep_tmp
from monai_trt.cache.keys import SCHEMA_VERSION, engine_key
from monai_trt.cache.meta import MAX_META_BYTES, META, USAGE, check_meta, parse_meta
from monai_trt.cache.trust import (
    UntrustedCache,
    check_ancestors,
    check_dir,
    copy_verified,
    describe_uid,
    make_private,
    open_verified,
    pid_alive,
    trusted_uids,
)
from monai_trt.errors import CacheError
from monai_trt.files import write_atomic

__all__ = ["CacheEntry", "EngineCache", "BuildTimeout", "pid_alive", "QUARANTINE_KEEP", "QUARANTINE_MAX_BYTES"]

logger = logging.getLogger(__name__)
_LOCK_POLL_SECONDS = 30.0
_SIDE_DIRS = ("entries", "locks", "tmp", "quarantine", "timing", "failures", "verdicts", "plans", "loads")
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
QUARANTINE_KEEP = 3  # quarantined entries kept for inspection (newest first); older ones are deleted
QUARANTINE_MAX_BYTES = 2 << 30  # ... and at most this much besides the newest one


class BuildTimeout(CacheError):
    """Another process held a key's build lock for longer than the caller would wait (`build_timeout`)."""


@dataclass(frozen=True)
class CacheEntry:
    """A verified entry: its directory, its parsed meta.json and, when staged, the private copy to load from.

    Attributes:
        files: a private directory holding the verified bytes of every artifact (None: not staged); a backend loads
            from here, never from `path`, and :meth:`EngineCache.release` removes it after the load.
    """

    key: str
    path: Path
    meta: Mapping[str, Any]
    files: Path | None = None


class EngineCache:
    """Engine cache rooted at a directory. Use :meth:`open`, which checks who may write it and falls back to a
    private temp dir; the constructor trusts `root` as given (tests and the CLI's inspection).

    Args:
        create: make the side directories (False: read-only use of an existing cache).

    Attributes:
        writable: entries can be built, quarantined and counted here; False for a read-only cache (one prepared by a
            trusted owner, or on a read-only file system), whose misses are built in `spill`.
        owners: the uids whose files are trusted (the current user and env MONAI_TRT_TRUSTED_UIDS).
    """

    def __init__(self, root: Path, create: bool = True) -> None:
        self.root = root
        self.writable = create
        self.owners = trusted_uids()
        self.spill: EngineCache | None = None
        self._refused: set[str] = set()
        if create:
            for sub in _SIDE_DIRS:
                make_private(root / sub)

    @classmethod
    def private(cls) -> EngineCache:
        """A fresh cache in a private temp directory, for this process only."""
        return cls(Path(tempfile.mkdtemp(prefix="monai_trt-")))

    @classmethod
    def open(cls, root: str | os.PathLike) -> EngineCache:
        """Open (creating) the cache at `root` after checking who may write it.

        A cache another account could write (the root, a directory above it, or one of its directories is owned by
        an untrusted account or writable by group/others; a symlink to such a place) is refused as a whole with one
        warning naming the path and the fix, and so is an unwritable path: this process then uses a private temp dir.
        A cache owned by a trusted other account (MONAI_TRT_TRUSTED_UIDS), or on a read-only file system, is used
        read-only: its entries load, new engines are built in a private temp dir.
        """
        path = Path(root).expanduser().absolute()
        try:
            return cls._open_checked(path)
        except (UntrustedCache, OSError) as err:
            fallback = cls.private()
            logger.warning("engine cache %s is not usable (%s); this process uses %s instead", path, err, fallback.root)
            return fallback

    @classmethod
    def _open_checked(cls, path: Path) -> EngineCache:
        owners = trusted_uids()
        real = Path(os.path.realpath(path))
        check_ancestors(real, owners)
        make_private(real)
        info = check_dir(real, owners, UntrustedCache)
        if real != path:
            logger.debug("engine cache %s resolves to %s", path, real)
        if info.st_uid == os.getuid():
            try:
                cache = cls(real)
                cache._check_layout()
                probe = real / "tmp" / f".probe.{os.getpid()}"
                probe.write_bytes(b"")
                probe.unlink()
                return cache
            except UntrustedCache:
                raise
            except OSError as err:
                if not (real / "entries").is_dir():
                    raise
                why = f"not writable here ({err.strerror})"
        else:
            why = f"owned by trusted {describe_uid(info.st_uid)}"
        cache = cls(real, create=False)
        check_dir(real / "entries", owners, UntrustedCache)
        cache.spill = cls.private()
        logger.info("engine cache %s is %s: its entries are used read-only; new engines are built in %s",
                    real, why, cache.spill.root)
        return cache

    def _check_layout(self) -> None:
        for sub in _SIDE_DIRS:
            check_dir(self.root / sub, self.owners, UntrustedCache)

    @property
    def timing_dir(self) -> Path:
        """Where backends keep side caches that speed up later builds (TensorRT timing caches)."""
        return self.spill.timing_dir if self.spill is not None else self.root / "timing"

    def entry_dir(self, key: str) -> Path:
        return self.root / "entries" / key

    # ------------------------------------------------------------------ lookup
    def lookup(self, key: str, required: Iterable[str] = ()) -> CacheEntry | None:
        """The verified entry for `key`, staged for loading (see :meth:`release`), or None.

        Args:
            required: meta.json fields the caller will read (besides those every entry has).

        Bad entries are quarantined (in a read-only cache: refused) with a warning.
        """
        path = self.entry_dir(key)
        if os.path.lexists(path):
            try:
                return self.verify(key, path, required, stage=True)
            except CacheError as err:
                self._discard(key, path, str(err))
        return self.spill.lookup(key, required) if self.spill is not None else None

    def verify(self, key: str, path: Path, required: Iterable[str] = (), stage: bool = False) -> CacheEntry:
        """Check the entry directory, meta.json (schema, key) and every artifact (owner, mode, links, sha256).

        Args:
            stage: copy the verified bytes of every artifact into a private directory (`CacheEntry.files`).

        Raises:
            CacheError: with the reason the entry cannot be trusted.
        """
        try:
            dir_fd = os.open(path, _DIR_FLAGS)
        except OSError as err:
            raise CacheError(f"entry directory {path.name} cannot be opened without following links "
                             f"({err.strerror})") from err
        try:
            info = os.fstat(dir_fd)
            if info.st_uid not in self.owners:
                raise CacheError(f"entry is owned by {describe_uid(info.st_uid)}, not the current user or a trusted "
                                 "owner")
            if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                raise CacheError(f"{path} is group- or world-writable")
            meta = check_meta(parse_meta(self._read_meta(dir_fd)), key, required)
            if engine_key(meta["key_inputs"]) != key:
                raise CacheError(f"{META}'s key inputs (weights, versions, device...) do not hash to key {key[:12]}")
            files = self._stage_dir() if stage else None
            try:
                for name, expected in meta["artifacts"].items():
                    try:
                        actual = copy_verified(dir_fd, name, self.owners, files)
                    except CacheError as err:
                        raise CacheError(f"artifact {err}") from err
                    if actual != expected:
                        raise CacheError(f"artifact {name} does not match its sha256 (corrupt or tampered)")
            except BaseException:
                if files is not None:
                    shutil.rmtree(files, ignore_errors=True)
                raise
            return CacheEntry(key, path, meta, files)
        finally:
            os.close(dir_fd)

    def _read_meta(self, dir_fd: int) -> bytes:
        fd = open_verified(dir_fd, META, self.owners, MAX_META_BYTES)
        try:
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            return b"".join(chunks)
        except OSError as err:
            raise CacheError(f"{META} is unreadable: {err}") from err
        finally:
            os.close(fd)

    def _stage_dir(self) -> Path:
        """A new private (0700) directory for verified copies: in tmp/ of a cache we own, else in system temp."""
        if self.writable:
            return Path(tempfile.mkdtemp(prefix=f"load.{os.getpid()}.", dir=self.root / "tmp"))
        return Path(tempfile.mkdtemp(prefix="monai_trt-load-"))

    @staticmethod
    def release(entry: CacheEntry) -> None:
        """Remove the entry's private verified copy once the engine is loaded (the engine keeps what it needs)."""
        if entry.files is not None:
            shutil.rmtree(entry.files, ignore_errors=True)

    def _discard(self, key: str, path: Path, reason: str) -> None:
        if self.writable and self.quarantine(key, reason) is not None:
            return
        if key not in self._refused:  # once per key and process: the entry stays, so every lookup would warn
            self._refused.add(key)
            logger.warning("refusing cache entry %s: %s", path, reason)

    def quarantine(self, key: str, reason: str) -> Path | None:
        """Move an entry aside (kept for inspection) so the key can be rebuilt; None if it could not be moved.

        Only the newest :data:`QUARANTINE_KEEP` quarantined entries are kept (and no more than
        :data:`QUARANTINE_MAX_BYTES` besides the newest), so a cache that keeps failing cannot fill the disk.
        """
        if not self.writable:
            return None
        path = self.entry_dir(key)
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}.{os.getpid()}.{time.monotonic_ns() % 10**9:09d}"
        target = self.root / "quarantine" / f"{key}.{stamp}"
        try:
            os.rename(path, target)
        except OSError:
            return None
        try:
            os.utime(target)  # its age in quarantine, for pruning
        except OSError:
            pass
        logger.warning("moved bad cache entry %s aside to %s: %s", path, target, reason)
        prune_oldest(self.root / "quarantine", QUARANTINE_KEEP, QUARANTINE_MAX_BYTES)
        return target

    # ------------------------------------------------------------------ build
    def lock(self, key: str) -> FileLock:
        return FileLock(str(self.root / "locks" / f"{key}.lock"), mode=0o600)

    def acquire(self, lock: FileLock, what: str, timeout: float | None = None) -> None:
        """Wait for `lock` (at most `timeout` seconds; None: no limit), logging every 30 s that another process is
        building `what`.

        Raises:
            BuildTimeout: the lock was still held after `timeout` seconds.
        """
        start = time.monotonic()
        step = 0.5
        while True:
            remaining = None if timeout is None else max(0.0, start + timeout - time.monotonic())
            try:
                lock.acquire(timeout=step if remaining is None else min(step, remaining))
                return
            except Timeout:
                waited = time.monotonic() - start
                if timeout is not None and waited >= timeout:
                    raise BuildTimeout(f"another process has been building {what} for more than {timeout:g} s "
                                       "(build_timeout)") from None
                step = _LOCK_POLL_SECONDS
                logger.info("waiting for another process to finish building %s (%.0f s)", what, waited)

    def build(
        self, key: str, meta: Mapping[str, Any], build: Callable[[Path], Mapping[str, Any]],
        timeout: float | None = None, required: Iterable[str] = (),
    ) -> CacheEntry:
        """Return the entry for `key` (staged), building it with `build(tmp_dir)` unless another process already did.

        `build` writes artifacts into `tmp_dir` and returns extra meta, including `artifacts`: the file names.
        meta.json is written last, then the directory is renamed into place; on any failure nothing is published.
        A read-only cache builds in its `spill` cache.

        Args:
            timeout: longest wait for another process building the same key (None: no limit).
            required: as for :meth:`lookup`.

        Raises:
            BuildTimeout: another process held the key's lock for longer than `timeout`.
        """
        if self.spill is not None:
            return self.spill.build(key, meta, build, timeout, required)
        lock = self.lock(key)
        self.acquire(lock, f"engine {key[:12]}", timeout)
        try:
            entry = self.lookup(key, required)
            if entry is not None:
                return entry
            sweep_tmp(self.root / "tmp", key, self._lock_free)
            tmp = Path(tempfile.mkdtemp(prefix=f"{key}.{os.getpid()}.", dir=self.root / "tmp"))
            try:
                result = dict(build(tmp))
                names = result.pop("artifacts")
                artifacts = {name: self._seal(tmp, name) for name in names}
                full = {**meta, **result, "schema": SCHEMA_VERSION, "key": key, "artifacts": artifacts}
                full.setdefault("created", time.time())
                write_atomic(tmp / META, _dumps(full))
                return self._publish(key, tmp, required)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            lock.release()

    def _seal(self, tmp: Path, name: str) -> str:
        """Make a freshly built artifact private (0600, whatever the umask) and return its sha256."""
        info = os.lstat(tmp / name)
        if not stat.S_ISREG(info.st_mode):
            raise CacheError(f"the build wrote {name} as something other than a regular file")
        os.chmod(tmp / name, 0o600)
        fd = os.open(tmp, _DIR_FLAGS)
        try:
            return copy_verified(fd, name, self.owners, None)
        finally:
            os.close(fd)

    def _publish(self, key: str, tmp: Path, required: Iterable[str]) -> CacheEntry:
        target = self.entry_dir(key)
        try:
            os.rename(tmp, target)
        except OSError as err:
            logger.warning("could not publish engine to %s (%s); using it from %s for this process", target, err, tmp)
            target = tmp
        return self.verify(key, target, required, stage=True)

    def _lock_free(self, key: str) -> bool:
        lock = self.lock(key)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return False
        lock.release()
        return True

    # ------------------------------------------------------------------ bookkeeping
    def record_use(self, entry: CacheEntry) -> None:
        """Count a load in usage.json (best effort: statistics only; not in a read-only cache)."""
        if not self.writable:
            return
        path = entry.path / USAGE
        try:
            usage = parse_meta(path.read_bytes()) if path.exists() else {}
            usage = {"hits": int(usage.get("hits", 0)) + 1, "last_used": time.time()}
            write_atomic(path, _dumps(usage))
        except (OSError, ValueError, TypeError, AttributeError, CacheError):
            pass

    def read_record(self, kind: str, key: str) -> dict[str, Any] | None:
        """The `kind` record (`failures`, `verdicts`) of `key`; None when there is none or it is not trustworthy."""
        path = self.root / kind / f"{key}.json"
        try:
            if path.is_symlink() or path.stat().st_uid not in self.owners:
                return None  # only records of trusted owners can change what a process does
            record = parse_meta(path.read_bytes())
        except (OSError, ValueError, CacheError):
            return None
        return record if isinstance(record, dict) and record.get("key") == key else None

    def write_record(self, kind: str, key: str, record: Mapping[str, Any]) -> None:
        """Write (replace) the `kind` record of `key`, best effort; nothing in a read-only cache."""
        if not self.writable:
            return
        try:
            make_private(self.root / kind)
            write_atomic(self.root / kind / f"{key}.json", _dumps({**record, "key": key}))
        except OSError as err:
            logger.debug("could not write the %s record of %s: %s", kind, key, err)

    def failure(self, key: str) -> str | None:
        """Why exporting for `key` failed in an earlier process (None: no failure remembered, or an unreadable one)."""
        reason = (self.read_record("failures", key) or {}).get("reason")
        return reason if isinstance(reason, str) else None

    def record_failure(self, key: str, key_inputs: Mapping[str, Any], reason: str) -> None:
        """Remember that exporting for `key` failed, so later processes do not try again."""
        self.write_record("failures", key, {"reason": reason, "time": time.time(), "key_inputs": key_inputs})

    def entries(self) -> Iterator[Path]:
        """Directories under entries/ (unverified)."""
        yield from sorted(p for p in (self.root / "entries").iterdir() if p.is_dir())


def _dumps(data: Any) -> bytes:
    return json.dumps(data, indent=1, sort_keys=True, default=str).encode()
