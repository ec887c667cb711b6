"""Cache keys: sha256 over canonical JSON of everything that changes an engine, and nothing that doesn't.

The module fingerprints that go into a key (architecture, weights) are computed by :mod:`monai_trt.runtime.stamps`.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["SCHEMA_VERSION", "canonical_json", "digest", "device_info", "platform_info", "engine_key"]

SCHEMA_VERSION = 1


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, tuples as lists."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def digest(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def device_info(device: torch.device) -> dict[str, Any]:
    """Device facts that change an engine: type; CPU vector capability or CUDA compute capability (never the index)."""
    info: dict[str, Any] = {"type": device.type}
    if device.type == "cpu":  # the vector ISA CPU code was generated for (AVX2, AVX512...)
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        info["capability"] = f"{major}.{minor}"
    return info


def platform_info() -> dict[str, str]:
    return {"system": platform.system(), "machine": platform.machine()}


def engine_key(inputs: Mapping[str, Any]) -> str:
    """The cache key for a mapping of key inputs (see README "How the cache key works")."""
    return digest({"schema": SCHEMA_VERSION, **inputs})
