"""Rent before buy: a warm process loads a cached engine only once PyTorch calls have cost what loading it costs.

Taking an engine from the cache has a price per process: its cache key (the module's fingerprints), the artifact
checks and the load itself (0.1–0.6 s for the example bundles' `aoti` engines on an H200, mostly the load). Each
call it serves then saves `pytorch_s - engine_s`. A process that makes few calls, such as a bundle run on a few
small volumes, is faster without the engine. So, once the speed gate has measured an engine, its price and saving
are remembered (`loads/<key>.json`, keyed by the patch entry, the module's class and parameter shapes, the call
layout, the machine and torch's version, not by the weights). A later process runs the first ceil(price / saving)
calls of that layout in PyTorch and takes the engine on the next one: never slower than PyTorch by more than the
price, and about twice the better choice in hindsight at worst (the ski-rental rule). Only with the speed gate on
(`min_speedup`, on for `method: auto`), for plain patch entries (not `submodule: auto` searches, not `devices`
splits).

PyTorch answers every rented call, so renting can make a process slower, never wrong.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from monai_trt.cache.keys import digest
from monai_trt.patch import PatchEntry
from monai_trt.runtime.calls import CallLayout
from monai_trt.runtime.verdicts import machine_id

__all__ = ["Rent", "RECORD"]

RECORD = "loads"
SCHEMA = 1

logger = logging.getLogger(__name__)


class Rent:
    """Which call layouts of one wrapped submodule still run in PyTorch before their cached engine is taken.

    Args:
        cache: opens the entry's engine cache (an :class:`~monai_trt.cache.EngineCache`) when first needed.
        module: the wrapped module (its class and parameter shapes are part of the record's key).
        spec: the patch entry (all its fields are part of the record's key).
        label: the name used in log lines.
    """

    def __init__(self, cache: Callable[[], Any], module: nn.Module, spec: PatchEntry, label: str) -> None:
        self._cache, self._spec, self._label = cache, spec, label
        self._module = module
        self._left: dict[CallLayout, int] = {}  # calls still rented, per layout (0: taken, or nothing recorded)
        self._rented: dict[CallLayout, int] = {}
        self.renting_allowed = True  # False: engines are taken at once (prices are still remembered)

    def renting(self, layout: CallLayout) -> bool:
        """True when this call of `layout` should run in PyTorch (and counts towards the engine's price)."""
        if not self.renting_allowed:
            return False
        left = self._left.get(layout)
        if left is None:
            left = self._left[layout] = self._calls_to_rent(layout)
        if left <= 0:
            return False
        self._left[layout] = left - 1
        self._rented[layout] = self._rented.get(layout, 0) + 1
        return True

    def rented(self, layout: CallLayout) -> int:
        """Calls of `layout` this process ran in PyTorch while renting."""
        return self._rented.get(layout, 0)

    def bought(self, layout: CallLayout, entry: str, price_s: float, speed: Mapping[str, Any],
               measured_warm: bool) -> None:
        """The engine for `layout` (cache entry `entry`) was taken at `price_s` (key, checks, load); remember what
        it costs and saves.

        `measured_warm`: the price was paid as a later process pays it (a cache hit). A process that built the
        engine loads it with its imports already done, so its price is only written when none is remembered."""
        self._left[layout] = 0
        key = self._key(layout)
        if not measured_warm and self._cache().read_record(RECORD, key) is not None:
            return
        self._cache().write_record(RECORD, key, {
            "price_s": round(price_s, 4), "engine_s": speed["engine_s"], "pytorch_s": speed["pytorch_s"],
            "entry": entry, "time": time.time()})

    def _calls_to_rent(self, layout: CallLayout) -> int:
        cache = self._cache()
        record = cache.read_record(RECORD, self._key(layout)) or {}
        try:
            price, engine_s, pytorch_s = (float(record[k]) for k in ("price_s", "engine_s", "pytorch_s"))
            entry = str(record["entry"])
        except (KeyError, TypeError, ValueError):
            return 0  # nothing remembered (or unreadable): take the engine now, as without renting
        if not entry.isalnum() or not cache.entry_dir(entry).is_dir():
            return 0  # the engine it priced is gone (cleaned): the next call builds, as it would without renting
        saving = pytorch_s - engine_s
        if not all(math.isfinite(v) for v in (price, saving)) or price <= 0 or saving <= 0:
            return 0
        calls = math.ceil(price / saving)
        logger.info("%s: the cached engine for these inputs saves %.2f ms per call and costs %.2f s to take (key, "
                    "checks, load), so it is taken after %d call%s in PyTorch (rent before buy; `min_speedup: 0` "
                    "takes it at once)", self._label, 1e3 * saving, price, calls, "" if calls == 1 else "s")
        return calls

    def _key(self, layout: CallLayout) -> str:
        """What the record is remembered under: the patch entry, the module's class and its parameter and buffer
        shapes (telling apart networks of one class built with other sizes), the call layout, the machine and torch's
        version. Not the weights: fingerprinting them is part of the price."""
        device = torch.device(layout.device)
        module = self._module
        entry = {name: getattr(self._spec, name) for name in self._spec.__dataclass_fields__}
        return digest({
            "schema": SCHEMA, "entry": {k: dict(v) if isinstance(v, Mapping) else v for k, v in entry.items()},
            "module_class": f"{type(module).__module__}.{type(module).__qualname__}",
            "shapes": [(name, list(t.shape)) for name, t in (*module.named_parameters(), *module.named_buffers())],
            "layout": {**layout.to_json(), "device": layout.device},
            "machine": machine_id(device.type, device.index), "torch": torch.__version__,
        })
