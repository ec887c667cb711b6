"""Structured progress and outcome events: long work emits them; a display (the CLI's) or a file listens.

Events are data, never log text to be parsed: `phase` (a build step, optionally `done` of `total`), `built` (an
engine was built and saved), `cache_hit` (an engine came from the cache), `fallback` (a wrapper runs PyTorch from now
on). A sink is active for a block (:func:`reporting_to`, a context variable); with env `MONAI_TRT_EVENTS=<file>`
every event is also appended to that file as one JSON line (how `bench` learns what a bundle subprocess did).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

__all__ = ["Event", "EventSink", "emit", "report", "reporting_to", "read_events", "EVENTS_ENV"]

EVENTS_ENV = "MONAI_TRT_EVENTS"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    """One thing that happened to the engine(s) of `label` (a wrapped submodule)."""

    label: str
    kind: str
    phase: str | None = None
    done: float | None = None
    total: float | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)


class EventSink(Protocol):
    def event(self, event: Event) -> None: ...


_ACTIVE: contextvars.ContextVar[EventSink | None] = contextvars.ContextVar("monai_trt_events", default=None)


def emit(event: Event) -> None:
    """Hand `event` to the active sink (if any) and to the `MONAI_TRT_EVENTS` file (if set)."""
    sink = _ACTIVE.get()
    if sink is not None:
        try:
            sink.event(event)
        except Exception as err:  # a display must never fail the work it shows
            logger.debug("event sink %r failed on %s: %s", sink, event, err)
    path = os.environ.get(EVENTS_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(asdict(event), default=str) + "\n")


def report(label: str, phase: str, done: float | None = None, total: float | None = None) -> None:
    """Shorthand for a `phase` event: `label` entered `phase`, optionally `done` of `total` units."""
    emit(Event(label, "phase", phase=phase, done=done, total=total))


def read_events(path: str | os.PathLike) -> list[Event]:
    """The events a process wrote to a `MONAI_TRT_EVENTS` file (none when it does not exist)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return [Event(**json.loads(line)) for line in handle if line.strip()]
    except FileNotFoundError:
        return []


@contextlib.contextmanager
def reporting_to(sink: EventSink | None) -> Iterator[None]:
    """Route events to `sink` inside the block."""
    token = _ACTIVE.set(sink)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
