"""Shared fixtures: an isolated engine cache per test and captured monai_trt logs."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch) -> Iterator[None]:
    """Every test gets its own cache root and no MONAI_TRT override; its wrappers are not reported at exit."""
    from monai_trt.runtime.wrapper import USAGE

    monkeypatch.setenv("MONAI_TRT_CACHE", str(tmp_path / "engine-cache"))
    monkeypatch.delenv("MONAI_TRT", raising=False)
    yield
    USAGE.clear()  # the end-of-process report of never-called wrappers is for real runs (tested in a subprocess)


@pytest.fixture
def cache_dir(tmp_path) -> str:
    return str(tmp_path / "engine-cache")


class LogRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def text(self, level: int = logging.DEBUG) -> str:
        return "\n".join(r.getMessage() for r in self.records if r.levelno >= level)


@pytest.fixture
def trt_logs() -> Iterator[LogRecords]:
    """Records of the `monai_trt` logger (which, as MONAI's loggers do, does not propagate to root)."""
    handler = LogRecords()
    logger = logging.getLogger("monai_trt")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
