"""Progress display for long CLI work: phase, elapsed time, and a bar when the engine reports a fraction.

Build phases and outcomes reach the display as :class:`monai_trt.events.Event` objects (a context variable holds the
active display, so library code emits without knowing whether a CLI is listening: with none, it costs one lookup).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any, TextIO

from monai.utils import optional_import

from monai_trt.events import Event, reporting_to

tqdm, _HAS_TQDM = optional_import("tqdm", name="tqdm")

__all__ = ["Progress", "cli_logging", "is_interactive"]

_TICK_SECONDS = 0.5


def is_interactive(stream: TextIO) -> bool:
    """True when `stream` is a terminal (scripts and CI get no progress display by default)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """One line per task (an engine being built): `label: phase [elapsed]`, or a tqdm bar once a fraction is known.

    Args:
        enabled: draw anything at all (False: every method is a no-op).
        stream: where to draw (stderr, so stdout keeps only the command's results).
    """

    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self._bars: dict[str, Any] = {}
        self._started: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def __enter__(self) -> Progress:
        self._route = reporting_to(self)
        self._route.__enter__()
        if self.enabled:
            self._ticker = threading.Thread(target=self._tick, name="monai_trt-progress", daemon=True)
            self._ticker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._route.__exit__(None, None, None)
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        with self._lock:
            for bar in self._bars.values():
                bar.close()
            self._bars.clear()

    def _tick(self) -> None:
        while not self._stop.wait(_TICK_SECONDS):
            with self._lock:
                for bar in self._bars.values():
                    bar.refresh()

    def note(self, message: str) -> None:
        """A line that stays (printed above any live bars)."""
        if not self.enabled:
            return
        if _HAS_TQDM:
            tqdm.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def event(self, event: Event) -> None:
        """Show one event: a phase (with a bar once a fraction is known), an engine saved, a cache hit."""
        if event.kind == "phase" and event.phase:
            self.phase(event.label, event.phase, event.done, event.total)
        elif event.kind == "built":
            self.finish(event.label, "engine saved")
        elif event.kind == "cache_hit":
            self.note(f"{event.label}: already in the cache")

    def phase(self, label: str, phase: str, done: float | None = None, total: float | None = None) -> None:
        """Show `label` in `phase` with the time since its task began; with `total`, as a bar at `done`/`total`."""
        if not self.enabled:
            return
        desc = f"{label}: {phase}"
        with self._lock:
            start = self._started.setdefault(label, time.time())
            if not _HAS_TQDM:
                print(f"{desc}...", file=self.stream, flush=True)
                return
            bar = self._bars.get(label)
            if bar is not None and (bar.total is None) != (total is None):
                bar.close()
                bar = None
            if bar is None:
                bar = self._bars[label] = self._new_bar(desc, start, total)
            bar.set_description_str(desc, refresh=False)
            if total is not None and done is not None:
                bar.n = done
            bar.refresh()

    def _new_bar(self, desc: str, start: float, total: float | None) -> Any:
        bar_format = "{desc} {elapsed}" if total is None else "{desc} {bar} {percentage:3.0f}% {elapsed}<{remaining}"
        size = shutil.get_terminal_size(fallback=(100, 24))  # a pseudo-terminal may report 0 x 0: tqdm draws nothing
        bar = tqdm(desc=desc, total=total, file=self.stream, leave=False, bar_format=bar_format,
                   ncols=size.columns or 100, nrows=max(size.lines, 24))
        bar.start_t = start  # tqdm's clock is time.time: elapsed counts from the start of the task
        return bar

    def finish(self, label: str, message: str) -> None:
        """Close `label`'s line and print `label: message (elapsed)`."""
        if not self.enabled:
            return
        with self._lock:
            bar = self._bars.pop(label, None)
            if bar is not None:
                bar.close()
            start = self._started.pop(label, None)
        elapsed = f" [{time.time() - start:.1f} s]" if start is not None else ""
        self.note(f"{label}: {message}{elapsed}")


@contextlib.contextmanager
def cli_logging(verbose: bool) -> Iterator[None]:
    """Logging for one CLI command; restores everything on exit.

    monai_trt's log handlers (MONAI-style, on stdout) move to stderr so that stdout holds only results; the level is
    WARNING (INFO with `verbose`), and exporter chatter (torch.onnx registration notes, deprecation warnings) is
    hidden unless `verbose`.
    """
    package = logging.getLogger("monai_trt")
    noisy = [logging.getLogger(name) for name in ("torch.onnx", "torch._dynamo", "torch.export")]
    saved = [(h, h.stream, h.level) for h in package.handlers
             if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    saved_levels = [(lg, lg.level) for lg in noisy]
    for handler, stream, _ in saved:
        if stream is not sys.stderr:
            handler.setStream(sys.stderr)
        handler.setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        for lg in noisy:
            lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            if not verbose:
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for handler, stream, level in saved:
            handler.setStream(stream)
            handler.setLevel(level)
        for lg, level in saved_levels:
            lg.setLevel(level)
