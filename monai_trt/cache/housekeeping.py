"""Bounds on what a cache keeps besides its entries: quarantined entries and what dead processes left in tmp/."""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from monai_trt.cache.trust import pid_alive

__all__ = ["tree_size", "prune_oldest", "sweep_tmp"]

logger = logging.getLogger(__name__)
_KEY = re.compile(r"[0-9a-f]{64}")


def tree_size(path: Path) -> int:
    """Bytes of the files under `path` (links not followed)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def prune_oldest(directory: Path, keep: int, max_bytes: int) -> None:
    """Keep the newest item of `directory` always, then newer ones while at most `keep` items and `max_bytes` bytes
    besides the newest; delete the rest (oldest first by modification time)."""

    def mtime(path: Path) -> int:
        try:
            return path.lstat().st_mtime_ns
        except OSError:
            return 0

    kept, total, full = 0, 0, False
    for path in sorted(directory.iterdir(), key=mtime, reverse=True):
        size = tree_size(path)
        full = full or (kept > 0 and (kept >= keep or total + size > max_bytes))
        if not full:
            total += size if kept else 0
            kept += 1
            continue
        logger.info("removing old quarantined entry %s", path)
        _remove(path)


def sweep_tmp(tmp_dir: Path, key: str, lock_free: Callable[[str], bool]) -> None:
    """Remove what dead processes left in `tmp_dir`, called by a builder that holds `key`'s lock.

    A build directory `<key>.<pid>.<random>` is left over when its key's lock is free: a builder holds the lock until
    it publishes or fails, and a dead one (zombie or not) holds nothing — unlike a pid, this is not fooled by zombies,
    reused pids or other pid namespaces. A private copy `load.<pid>.<random>` is left over when its process is gone.
    """
    for stale in tmp_dir.iterdir():
        parts = stale.name.split(".")
        if len(parts) < 3 or not parts[1].isdigit():
            continue
        owner, pid = parts[0], int(parts[1])
        if owner == "load":
            gone = pid != os.getpid() and not pid_alive(pid)
        else:
            gone = owner == key or (_KEY.fullmatch(owner) is not None and lock_free(owner))
        if gone and stale.is_dir() and not stale.is_symlink():
            logger.info("removing leftover %s of a process that is gone", stale)
            shutil.rmtree(stale, ignore_errors=True)
