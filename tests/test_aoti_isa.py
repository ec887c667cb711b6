"""The AOTInductor load shortcut: it takes effect on the installed torch, per thread, and says when it cannot."""

from __future__ import annotations

import logging
import threading

import pytest
import torch
from torch._inductor import codecache, cpu_vec_isa

from monai_trt.backends import aoti_isa
from monai_trt.backends.aoti import load_package


class _ProbeCalled(Exception):
    pass


@pytest.fixture
def probe_raises(monkeypatch):
    """Inductor's ISA probe raises: any code path that still runs it is caught."""

    def probe():
        raise _ProbeCalled()

    monkeypatch.setattr(cpu_vec_isa, "pick_vec_isa", probe)


def test_bypass_installs_on_the_installed_torch():
    assert aoti_isa.bypass_status() == "installed"
    assert getattr(codecache.get_device_information, "_monai_trt_isa_bypass", False)


def test_only_the_loading_thread_skips_the_probe(probe_raises):
    with aoti_isa.probe_skipped() as active:
        assert active
        info = codecache.get_device_information("cpu")
        assert "AOTI_CPU_ISA" not in info and info["AOTI_MACHINE"]
        seen: list[BaseException] = []

        def other_thread() -> None:  # e.g. a compile elsewhere while this thread loads
            try:
                codecache.get_device_information("cpu")
            except BaseException as err:  # noqa: B036 - recorded for the assertion below
                seen.append(err)

        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
        assert len(seen) == 1 and isinstance(seen[0], _ProbeCalled), "another thread must run torch's own probe"
    with pytest.raises(_ProbeCalled):
        codecache.get_device_information("cpu")  # outside the block: torch's own behaviour


def test_mismatching_torch_is_left_alone_with_one_warning(monkeypatch, caplog):
    def get_device_information(device_type: str) -> dict[str, str]:
        return {"AOTI_PLATFORM": "x", "AOTI_NEW_FACT": "y"}

    monkeypatch.setattr(codecache, "get_device_information", get_device_information)
    monkeypatch.setattr(aoti_isa, "_status", None)
    with caplog.at_level(logging.WARNING, logger="monai_trt"):
        with aoti_isa.probe_skipped() as active:
            assert not active
        aoti_isa.bypass_status()
    assert codecache.get_device_information is get_device_information
    warnings = [r for r in caplog.records if "CPU ISA probe" in r.getMessage()]
    assert len(warnings) == 1 and "AOTI_NEW_FACT" in warnings[0].getMessage()


@pytest.mark.slow
def test_a_real_load_goes_through_the_bypass(tmp_path, monkeypatch):
    """Compile a tiny .pt2, then load it with Inductor's probe forbidden: the load must not need it."""
    model = torch.nn.Linear(4, 3).eval()
    x = torch.randn(2, 4)
    path = tmp_path / "tiny.pt2"
    torch._inductor.aoti_compile_and_package(torch.export.export(model, (x,)), package_path=str(path))

    def probe():
        raise _ProbeCalled()

    monkeypatch.setattr(cpu_vec_isa, "pick_vec_isa", probe)
    before = getattr(aoti_isa._local, "skipped", 0)
    runner = load_package(path, -1)
    assert getattr(aoti_isa._local, "skipped", 0) > before, "the loader did not ask for device information through us"
    torch.testing.assert_close(runner(x), model(x))
