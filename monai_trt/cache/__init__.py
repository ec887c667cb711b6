"""The on-disk engine cache: keys, the store (verified loads, atomic publish, locks, quarantine), inventory (CLI)."""

from monai_trt.cache.keys import device_info, engine_key, platform_info
from monai_trt.cache.store import BuildTimeout, CacheEntry, EngineCache

__all__ = ["BuildTimeout", "CacheEntry", "EngineCache", "engine_key", "device_info", "platform_info"]
