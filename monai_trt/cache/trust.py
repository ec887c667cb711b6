"""Who may have written a cache, checked before a byte of it is trusted (see README "Threat model").

A cache directory is usable only when the current user, or an owner the user trusts explicitly (env
`MONAI_TRT_TRUSTED_UIDS`), owns it and no other account can write it or any directory above it. Artifacts are opened
once, without following links; owner, mode and link count are checked on the open descriptor, and the same
descriptor is hashed and copied into a private directory: the bytes that were verified are the bytes that are loaded.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pwd
import stat
from pathlib import Path

from monai_trt.errors import CacheError

__all__ = [
    "ENV_TRUSTED", "UntrustedCache", "trusted_uids", "describe_uid", "check_dir", "check_ancestors", "make_private",
    "open_verified", "copy_verified", "pid_alive",
]

logger = logging.getLogger(__name__)
ENV_TRUSTED = "MONAI_TRT_TRUSTED_UIDS"
_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH
_BLOCK = 1 << 22
_WARNED: set[str] = set()


class UntrustedCache(CacheError):
    """The cache directory itself (not one entry) may be written by another account: it is not used at all."""


def trusted_uids() -> frozenset[int]:
    """The current user plus the owners named in env MONAI_TRT_TRUSTED_UIDS (comma-separated uids or user names)."""
    uids = {os.getuid()}
    for item in os.environ.get(ENV_TRUSTED, "").replace(" ", ",").split(","):
        if not item:
            continue
        try:
            uids.add(int(item) if item.isdigit() else pwd.getpwnam(item).pw_uid)
        except KeyError:
            if item not in _WARNED:
                _WARNED.add(item)
                logger.warning("%s names %r, which is not a user here; ignored", ENV_TRUSTED, item)
    return frozenset(uids)


def describe_uid(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _owner_problem(info: os.stat_result, owners: frozenset[int]) -> str | None:
    if info.st_uid in owners:
        return None
    return (f"is owned by {describe_uid(info.st_uid)}, not by you; trust that owner explicitly with "
            f"{ENV_TRUSTED}={info.st_uid} only for a read-only cache that account prepares")


def check_dir(path: Path, owners: frozenset[int], error: type[CacheError] = CacheError) -> os.stat_result:
    """`path` must be a real directory (not a symlink), owned by one of `owners`, not group/world-writable.

    Raises:
        error: naming the path and the fix.
    """
    try:
        info = os.lstat(path)
    except OSError as err:
        raise error(f"{path} cannot be read: {err}") from err
    if stat.S_ISLNK(info.st_mode):
        raise error(f"{path} is a symlink")
    if not stat.S_ISDIR(info.st_mode):
        raise error(f"{path} is not a directory")
    problem = _owner_problem(info, owners)
    if problem:
        raise error(f"{path} {problem}")
    if info.st_mode & _OTHERS_WRITE:
        raise error(f"{path} is group- or world-writable (mode {stat.S_IMODE(info.st_mode):04o}); "
                    f"fix: chmod 700 {path}")
    return info


def check_ancestors(path: Path, owners: frozenset[int]) -> None:
    """Every existing directory above `path` (already resolved) must be safe from renames by other accounts.

    Each must be owned by root or one of `owners`, and not writable by group/others unless it is sticky (as /tmp is).

    Raises:
        UntrustedCache: naming the directory.
    """
    for parent in reversed(path.parents):
        try:
            info = os.stat(parent)
        except FileNotFoundError:
            continue
        if info.st_uid != 0 and info.st_uid not in owners:
            raise UntrustedCache(f"{parent}, a directory above the cache, is owned by {describe_uid(info.st_uid)}, "
                                 "who could replace the cache; put the cache in a directory of your own")
        if info.st_mode & _OTHERS_WRITE and not info.st_mode & stat.S_ISVTX:
            raise UntrustedCache(f"{parent}, a directory above the cache, is writable by other users "
                                 f"(mode {stat.S_IMODE(info.st_mode):04o}); put the cache in a directory of your own")


def make_private(path: Path) -> None:
    """Create `path` and any missing parents as 0700 directories (parents too, so a umask cannot open them up)."""
    missing = []
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            break
        missing.append(candidate)
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            continue
        os.chmod(directory, 0o700)


def open_verified(dir_fd: int, name: str, owners: frozenset[int], max_size: int | None = None) -> int:
    """Open `name` in the directory `dir_fd` for reading: no symlink, a regular file with one link, owned by one of
    `owners`, not group/world-writable. Returns the descriptor (the caller closes it).

    Raises:
        CacheError: naming the file and the problem.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except FileNotFoundError as err:
        raise CacheError(f"{name} is missing") from err
    except OSError as err:  # ELOOP: a symlink
        raise CacheError(f"{name} cannot be opened without following links ({err.strerror})") from err
    try:
        info = os.fstat(fd)
        problem = None
        if not stat.S_ISREG(info.st_mode):
            problem = "is not a regular file"
        elif info.st_nlink != 1:
            problem = f"has {info.st_nlink} hard links (it may be changed through another path)"
        elif info.st_mode & _OTHERS_WRITE:
            problem = f"is group- or world-writable (mode {stat.S_IMODE(info.st_mode):04o})"
        elif max_size is not None and info.st_size > max_size:
            problem = f"is larger than {max_size} bytes"
        else:
            problem = _owner_problem(info, owners)
        if problem:
            raise CacheError(f"{name} {problem}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def copy_verified(dir_fd: int, name: str, owners: frozenset[int], target_dir: Path | None) -> str:
    """sha256 of artifact `name` (opened with :func:`open_verified`), copying the same bytes to `target_dir/name`.

    The copy is created exclusively (0600) inside a private directory, so nobody can change it before it is loaded.
    """
    fd = open_verified(dir_fd, name, owners)
    out = None
    try:
        if target_dir is not None:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
            out = os.open(target_dir / name, flags, 0o600)
        sha = hashlib.sha256()
        os.set_blocking(fd, True)
        while block := os.read(fd, _BLOCK):
            sha.update(block)
            if out is not None:
                view = memoryview(block)
                while view:
                    view = view[os.write(out, view):]
        return sha.hexdigest()
    finally:
        os.close(fd)
        if out is not None:
            os.close(out)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` still runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            state = handle.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in (b"Z", b"X")
