"""The schema of an entry's `meta.json`, checked before any of its fields is used.

A meta.json that parses but has the wrong shape (a list where a dict belongs, a 100 000-deep array) is an integrity
failure like a wrong sha256: the entry is quarantined and rebuilt, never allowed to raise past the check.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from monai_trt.cache.keys import SCHEMA_VERSION
from monai_trt.errors import CacheError

__all__ = ["META", "USAGE", "ENGINE_FIELDS", "MAX_META_BYTES", "MAX_DEPTH", "parse_meta", "check_meta"]

META = "meta.json"
USAGE = "usage.json"
MAX_META_BYTES = 64 << 20
MAX_DEPTH = 32
# The fields a runtime engine load needs (lifecycle passes them as `required`); store tests write minimal metas.
ENGINE_FIELDS = ("io", "outputs", "method", "build_args")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_REFIT = ("none", "identical", "refit")


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _profiles(value: Any) -> bool:
    """[profile][input][min/opt/max][dim] -> int."""
    return isinstance(value, list) and all(
        isinstance(p, list) and all(
            isinstance(i, list) and len(i) == 3 and all(
                isinstance(s, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in s) for s in i)
            for i in p)
        for p in value)


def _io(value: Any) -> bool:
    return (isinstance(value, dict) and _str_list(value.get("names")) and _str_list(value.get("dtypes"))
            and _profiles(value.get("profiles")) and len(value["names"]) == len(value["dtypes"]))


def _outputs(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("spec"), str) and _str_list(value.get("dtypes"))


_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "key_inputs": ("a dict", lambda v: isinstance(v, dict)),
    "created": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    "io": ("{names, dtypes, profiles}", _io),
    "outputs": ("{spec, dtypes}", _outputs),
    "method": ("a string", lambda v: isinstance(v, str)),
    "precision": ("a string", lambda v: isinstance(v, str)),
    "submodule": ("a string", lambda v: isinstance(v, str)),
    "build_args": ("a dict", lambda v: isinstance(v, dict)),
    "refit": (f"one of {list(_REFIT)}", lambda v: v in _REFIT),
}


def _depth(value: Any) -> int:
    """Nesting depth of JSON data, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_DEPTH:
            break
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_meta(raw: bytes) -> Any:
    """JSON from meta.json's bytes; anything that is not JSON (or nests past Python's recursion limit) → CacheError."""
    try:
        return json.loads(raw)
    except RecursionError as err:
        raise CacheError(f"{META} is nested too deeply") from err
    except ValueError as err:
        raise CacheError(f"{META} is unreadable: {err}") from err


def check_meta(meta: Any, key: str, required: Iterable[str] = ()) -> Mapping[str, Any]:
    """Check `meta` against the schema (known fields typed; `key_inputs`, `artifacts` and `required` present).

    Raises:
        CacheError: naming the first field at fault.
    """
    if not isinstance(meta, dict):
        raise CacheError(f"{META} is not a JSON object")
    if meta.get("key") != key or meta.get("schema") != SCHEMA_VERSION:
        raise CacheError(f"{META} does not describe key {key[:12]} (schema {SCHEMA_VERSION})")
    if _depth(meta) > MAX_DEPTH:
        raise CacheError(f"{META} nests deeper than {MAX_DEPTH} levels")
    for name in ("key_inputs", *required):
        if name not in meta:
            raise CacheError(f"{META} has no field {name!r}")
    for name, (expected, valid) in _FIELDS.items():
        if name in meta and not valid(meta[name]):
            raise CacheError(f"{META} field {name!r} must be {expected}")
    artifacts = meta.get("artifacts")
    if not isinstance(artifacts, dict) or not artifacts:
        raise CacheError(f"{META} lists no artifacts")
    for name, expected in artifacts.items():
        if not isinstance(name, str) or Path(name).name != name or name in (".", "..", META, USAGE) or "\0" in name:
            raise CacheError(f"artifact name {name!r} would escape the entry directory")
        if not isinstance(expected, str) or not _SHA256.fullmatch(expected):
            raise CacheError(f"{META} records no valid sha256 for artifact {name}")
    return meta
