"""Progress reporting seam: long work calls `report`; a display (the CLI's) listens while it is active."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Protocol

__all__ = ["ProgressSink", "report", "reporting_to"]


class ProgressSink(Protocol):
    def phase(self, label: str, phase: str, done: float | None, total: float | None) -> None: ...


_ACTIVE: contextvars.ContextVar[ProgressSink | None] = contextvars.ContextVar("monai_trt_progress", default=None)


def report(label: str, phase: str, done: float | None = None, total: float | None = None) -> None:
    """Tell the active display (if any) that `label` entered `phase`, optionally `done` of `total` units."""
    sink = _ACTIVE.get()
    if sink is not None:
        sink.phase(label, phase, done, total)


@contextlib.contextmanager
def reporting_to(sink: ProgressSink | None) -> Iterator[None]:
    """Route `report` calls to `sink` inside the block."""
    token = _ACTIVE.set(sink)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
