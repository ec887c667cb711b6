"""What the CLI knows about a cache and this machine: entry listing, "loadable here", clean selection, engine info.

Read-only except :func:`delete`; nothing here builds or loads an engine, and listing never creates a cache.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from filelock import Timeout

from monai_trt.backends import BACKENDS, resolve_method
from monai_trt.cache.housekeeping import tree_size
from monai_trt.cache.keys import device_info, platform_info
from monai_trt.cache.store import USAGE, EngineCache, pid_alive
from monai_trt.cache.trust import UntrustedCache, check_ancestors, check_dir
from monai_trt.errors import CacheError, MonaiTrtError

__all__ = [
    "EntryInfo", "scan", "here_status", "ask_backend", "entry_device", "select_for_clean", "delete", "leftovers",
    "clean_cache", "engine_table", "parse_size", "format_size", "METHOD_TITLES", "staged_files",
]

logger = logging.getLogger(__name__)

METHOD_TITLES = {
    "onnx": "TensorRT (via ONNX)",
    "torch_trt": "Torch-TensorRT",
    "aoti": "AOTInductor (.pt2)",
    "onnxruntime": "ONNX Runtime",
}
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass
class EntryInfo:
    """One directory under `entries/`, with what `ls`, `verify` and `clean` need to know about it.

    Attributes:
        status: "ok" (loadable on this machine), "stale" (other versions / GPU / platform), "unavailable"
            (its method cannot run here) or "refused" (fails the cache's integrity, ownership or permission check,
            so the runtime would not load it either).
        reason: why the status is not "ok" ("" when it is).
    """

    key: str
    path: Path
    size: int
    status: str
    reason: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)
    hits: int = 0
    last_used: float | None = None

    @property
    def loadable(self) -> bool:
        return self.status == "ok"

    @property
    def created(self) -> float | None:
        value = self.meta.get("created")
        return float(value) if isinstance(value, (int, float)) else None

    @property
    def recency(self) -> float:
        """Last use, else creation, else directory mtime: what least-recently-used eviction orders by."""
        for value in (self.last_used, self.created):
            if value is not None:
                return value
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0

    @property
    def network(self) -> str:
        """Network class (short name) and submodule, e.g. `UNet/<network>` or `VISTA3D/image_encoder.encoder`."""
        cls = str(self.meta.get("module_class") or "?").rsplit(".", 1)[-1]
        return f"{cls}/{self.meta.get('submodule') or '<network>'}" if self.meta else "?"

    def to_json(self) -> dict[str, Any]:
        io = self.meta.get("io") if isinstance(self.meta.get("io"), dict) else {}
        return {
            "key": self.key, "path": str(self.path), "module_class": self.meta.get("module_class"),
            "submodule": self.meta.get("submodule"), "method": self.meta.get("method"),
            "precision": self.meta.get("precision"), "size": self.size, "created": self.created,
            "last_used": self.last_used, "hits": self.hits, "loadable": self.loadable, "status": self.status,
            "reason": self.reason, "inputs": io.get("names"), "dtypes": io.get("dtypes"),
            "profiles": io.get("profiles"), "build_seconds": self.meta.get("build_seconds"),
        }


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None


def scan(root: str | os.PathLike) -> list[EntryInfo]:
    """Every entry under `root`, integrity-checked (sha256 of each artifact) and rated for this machine.

    Unlike a lookup at run time, nothing is quarantined or created: a missing cache gives an empty list.
    """
    entries_dir = Path(root).expanduser() / "entries"
    if not entries_dir.is_dir():
        return []
    cache = EngineCache(Path(root).expanduser().absolute(), create=False)  # reading creates no side directories
    untrusted = _untrusted(cache)
    infos = []
    for path in cache.entries():
        usage = _read_json(path / USAGE)
        usage = usage if isinstance(usage, dict) else {}
        info = EntryInfo(key=path.name, path=path, size=tree_size(path), status="ok")
        info.hits = int(usage.get("hits", 0)) if isinstance(usage.get("hits", 0), int) else 0
        info.last_used = usage.get("last_used") if isinstance(usage.get("last_used"), (int, float)) else None
        try:
            if untrusted:
                raise CacheError(untrusted)
            info.meta = cache.verify(path.name, path).meta
            info.status, info.reason = here_status(info.meta)
        except CacheError as err:  # what the runtime would refuse to load: tampered, incomplete, not ours
            meta = _read_json(path / "meta.json")
            info.meta = meta if isinstance(meta, dict) else {}
            info.status, info.reason = "refused", str(err)
        infos.append(info)
    return infos


def _untrusted(cache: EngineCache) -> str:
    """Why the runtime would refuse the whole cache (another account could write it), or ""."""
    real = Path(os.path.realpath(cache.root))
    try:
        check_ancestors(real, cache.owners)
        for path in (real, real / "entries"):
            check_dir(path, cache.owners, UntrustedCache)
    except UntrustedCache as err:
        return f"the cache is not used: {err}"
    return ""


@contextlib.contextmanager
def staged_files(info: EntryInfo) -> Iterator[Path]:
    """The entry's artifacts, verified again and copied into a private directory (removed on exit): what to load.

    Raises:
        CacheError: the entry no longer passes verification.
    """
    cache = EngineCache(info.path.parent.parent, create=False)
    entry = cache.verify(info.key, info.path, stage=True)
    try:
        yield entry.files
    finally:
        cache.release(entry)


def _cuda_capabilities() -> dict[str, int]:
    """Compute capability ("8.0") → first device index with it, for the GPUs visible here."""
    found: dict[str, int] = {}
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            found.setdefault(device_info(torch.device("cuda", index))["capability"], index)
    return found


def entry_device(meta: Mapping[str, Any]) -> tuple[torch.device | None, str]:
    """The device here that matches the entry's recorded device, or (None, why there is none)."""
    device = (meta.get("key_inputs") or {}).get("device") or meta.get("device") or {}
    kind = device.get("type", "?")
    if kind == "cpu":
        return torch.device("cpu"), ""
    if kind == "cuda":
        capability = device.get("capability")
        here = _cuda_capabilities()
        if not here:
            return None, f"built for CUDA (sm {capability}); no CUDA device here"
        if capability not in here:
            return None, f"built for sm {capability}; GPUs here are sm {', '.join(sorted(here))}"
        return torch.device("cuda", here[capability]), ""
    return None, f"built for device type {kind!r}, which is not supported here"


def ask_backend(backend_cls: type, device: torch.device) -> tuple[str | None, dict[str, str]]:
    """(why the backend cannot run on `device` or None, its versions here): a half-installed package is a reason."""
    try:
        backend = backend_cls()
        reason = backend.unavailable_reason(device)
        return (reason, {}) if reason else (None, dict(backend.versions()))
    except Exception as err:  # a broken optional package must not break listing
        return f"cannot query {getattr(backend_cls, 'name', backend_cls.__name__)}: {type(err).__name__}: {err}", {}


def here_status(meta: Mapping[str, Any]) -> tuple[str, str]:
    """("ok", "") when an entry can be loaded on this machine, else (status, reason).

    Compares what the entry's key recorded (backend library versions, device type and compute capability, OS and
    CPU architecture) with what the backend reports here, and asks the backend whether it can run at all.
    """
    inputs = meta.get("key_inputs") or {}
    method = meta.get("method") or inputs.get("method")
    backend_cls = BACKENDS.get(method)
    if backend_cls is None:
        return "unavailable", f"unknown method {method!r}"
    device, why = entry_device(meta)
    if device is None:
        return "stale", why
    reason, current = ask_backend(backend_cls, device)
    if reason:
        return "unavailable", reason
    recorded = inputs.get("versions") or {}
    diffs = [f"{name} {recorded.get(name, 'none')} in entry, {current.get(name, 'none')} here"
             for name in sorted(set(recorded) | set(current)) if recorded.get(name) != current.get(name)]
    recorded_platform = inputs.get("platform") or {}
    if recorded_platform and recorded_platform != platform_info():
        here = platform_info()
        diffs.append(f"built on {recorded_platform.get('system')} {recorded_platform.get('machine')}, "
                     f"this is {here['system']} {here['machine']}")
    return ("stale", "; ".join(diffs)) if diffs else ("ok", "")


def leftovers(root: str | os.PathLike, speed_records: bool = False) -> list[tuple[Path, str]]:
    """Quarantined entries, remembered export failures and `submodule: auto` plans, and builds left behind by
    processes that are gone (and with `speed_records`, what only changes speed: the TensorRT timing caches, the speed
    gate's measurements and validations, and the prices of taking engines): (path, why)."""
    base = Path(root).expanduser()
    found = [(p, "quarantined entry") for p in sorted((base / "quarantine").glob("*")) if p.is_dir()]
    files = [("failures", "*.json", "remembered export failure"),
             ("plans", "*.json", "remembered `submodule: auto` plan")]
    if speed_records:
        files += [("timing", "*", "TensorRT timing cache"), ("verdicts", "*.json", "remembered speed measurement"),
                  ("loads", "*.json", "remembered price of taking an engine")]
    found += [(p, why) for folder, pattern, why in files for p in sorted((base / folder).glob(pattern)) if p.is_file()]
    for path in sorted((base / "tmp").glob("*")):
        parts = path.name.split(".")
        if path.is_dir() and len(parts) >= 2 and parts[1].isdigit() and not pid_alive(int(parts[1])):
            found.append((path, "unfinished build of a process that is gone"))
    return found


def clean_cache(
    root: str | os.PathLike, everything: bool = False, max_size: int | None = None, yes: bool = False
) -> tuple[list[dict[str, Any]], int]:
    """Select (and with `yes` delete) what `clean` removes: see :func:`select_for_clean` and :func:`leftovers`.

    Returns:
        (one dict per item: key, path, size, why, kind ("entry" or "leftover"), deleted (False in a dry run),
        skipped (why it could not be deleted, else "")), number of entries that stay (would stay in a dry run)).
    """
    entries = scan(root)
    items: list[dict[str, Any]] = []
    for entry, why in select_for_clean(entries, everything=everything, max_size=max_size):
        problem = delete(root, entry) if yes else ""
        items.append({"key": entry.key, "path": str(entry.path), "size": entry.size, "why": why, "kind": "entry",
                      "deleted": yes and not problem, "skipped": problem})
    for path, why in leftovers(root, speed_records=everything) if Path(root).expanduser().is_dir() else []:
        size = tree_size(path) if path.is_dir() else path.stat().st_size
        if yes and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif yes:
            path.unlink(missing_ok=True)
        items.append({"key": path.name, "path": str(path), "size": size, "why": why, "kind": "leftover",
                      "deleted": yes, "skipped": ""})
    kept = len(entries) - sum(1 for item in items if item["kind"] == "entry" and not item["skipped"])
    return items, kept


def select_for_clean(
    entries: Iterable[EntryInfo], everything: bool = False, max_size: int | None = None
) -> list[tuple[EntryInfo, str]]:
    """Entries to delete, with why: all of them; else the invalid ones, then least-recently-used over `max_size`."""
    entries = list(entries)
    if everything:
        return [(e, "--all") for e in entries]
    chosen = [(e, f"{e.status}: {e.reason}") for e in entries if not e.loadable]
    if max_size is not None:
        kept = sorted((e for e in entries if e.loadable), key=lambda e: e.recency)
        total = sum(e.size for e in kept)
        for entry in kept:
            if total <= max_size:
                break
            chosen.append((entry, f"least recently used; cache over {format_size(max_size)}"))
            total -= entry.size
    return chosen


def delete(root: str | os.PathLike, entry: EntryInfo) -> str:
    """Delete one entry under its build lock (skipped while a build of that key runs). Returns "" or why not."""
    cache = EngineCache(Path(root).expanduser().absolute())
    lock = cache.lock(entry.key)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return "another process is building it"
    try:
        # Rename first (atomic), so a concurrent lookup sees either the whole entry or none.
        doomed = cache.root / "tmp" / f"{entry.key}.{os.getpid()}.clean{time.monotonic_ns()}"
        try:
            os.rename(entry.path, doomed)
        except OSError as err:
            return f"could not move it aside: {err}"
        shutil.rmtree(doomed, ignore_errors=True)
        return ""
    finally:
        lock.release()


def parse_size(value: Any) -> int:
    """Bytes from `2GB`, `500MiB`, `1.5e9` or an int (KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024).

    Raises:
        MonaiTrtError: the value is not a size.
    """
    if isinstance(value, bool):
        raise MonaiTrtError(f"--max_size must be a size such as 2GB or 500MiB, got {value!r}")
    if isinstance(value, (int, float)) and value >= 0:
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise MonaiTrtError(f"--max_size must be a size such as 2GB or 500MiB, got {value!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def engine_table() -> dict[str, Any]:
    """Which engine methods work on this machine, per device type, and why the others do not."""
    cuda = _cuda_capabilities()
    devices = [torch.device("cpu")] + [torch.device("cuda", i) for i in sorted(set(cuda.values()))]
    if not cuda:
        devices.append(torch.device("cuda"))
    rows = []
    for device in devices:
        for name, cls in BACKENDS.items():
            reason, versions = ask_backend(cls, device)
            if reason is None and device.type == "cuda" and not cuda:
                reason, versions = "no CUDA device here", {}
            rows.append({"method": name, "engine": METHOD_TITLES.get(name, name), "device": str(device),
                         "available": reason is None, "reason": reason or "", "versions": versions,
                         "precisions": list(cls.precisions)})
    auto: dict[str, str | None] = {}
    for device in devices:
        try:
            backend, _ = resolve_method("auto", device, "fp32")
            auto[str(device)] = backend.name
        except MonaiTrtError:
            auto[str(device)] = None
    gpus = [f"cuda:{i} {torch.cuda.get_device_name(i)} (sm {cap})" for cap, i in sorted(cuda.items())]
    return {
        "torch": torch.__version__, "cuda": torch.version.cuda, "gpus": gpus, "platform": platform_info(),
        "engines": rows, "auto": auto,
    }
