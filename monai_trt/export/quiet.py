"""Keep exporter and compiler chatter out of the user's log while an engine is built.

torch.export, the ONNX exporter (onnxscript, onnx_ir), Inductor and TorchDynamo log tens to hundreds of lines per
build (pass summaries, graph dumps written straight to stderr on a failed export, deprecation warnings). A bundle's
log should say what monai_trt did, not how the exporters work: during a build their loggers are raised to ERROR,
their warnings are ignored and what they write to `sys.stderr` goes to monai_trt's DEBUG log instead.
`MONAI_TRT_DEBUG=1`, or the `monai_trt` logger at DEBUG, leaves all of it as it is.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import warnings
from collections.abc import Iterator

__all__ = ["quiet_third_party", "debug_enabled", "summarize_error"]

logger = logging.getLogger(__name__)

NOISY_PREFIXES = ("torch", "onnx", "onnx_ir", "onnxscript", "onnxruntime", "triton")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def debug_enabled() -> bool:
    """True when the user asked to see everything (env MONAI_TRT_DEBUG=1 or the monai_trt logger at DEBUG)."""
    return os.environ.get("MONAI_TRT_DEBUG", "").strip().lower() in ("1", "true", "on", "yes") or logging.getLogger(
        "monai_trt").isEnabledFor(logging.DEBUG)


def _noisy_loggers() -> list[logging.Logger]:
    names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] in NOISY_PREFIXES]
    return [logging.getLogger(n) for n in sorted(set(names) | set(NOISY_PREFIXES))]


@contextlib.contextmanager
def quiet_third_party() -> Iterator[None]:
    """Inside the block, exporter/compiler loggers show only errors and their warnings are dropped."""
    if debug_enabled():
        yield
        return
    saved = [(lg, lg.level) for lg in _noisy_loggers()]
    for lg, _ in saved:
        lg.setLevel(logging.ERROR)
    captured = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(captured):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)
        if captured.getvalue().strip():
            logger.debug("exporter output:\n%s", captured.getvalue())


def summarize_error(err: BaseException, limit: int = 600) -> str:
    """A short, colour-free description of an export/build error for a warning (the full text goes to DEBUG).

    Exporter errors carry whole graph dumps and advice; kept are the first line, the exception summary and the
    user code line that raised it, when present.
    """
    text = _ANSI.sub("", str(err))
    lines = [line.rstrip() for line in text.splitlines()]
    kept = [next((line for line in lines if line.strip()), "")]
    for marker, count in (("## Exception summary", 1), ("The following call raised this error:", 2)):
        if marker in lines:
            start = lines.index(marker) + 1
            kept += [line.strip() for line in lines[start:] if line.strip()][:count]
    summary = " | ".join(dict.fromkeys(k for k in kept if k))
    return summary if len(summary) <= limit else summary[: limit - 3] + "..."
