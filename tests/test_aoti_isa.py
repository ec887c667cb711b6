"""The AOTInductor load shortcut: it takes effect on the installed torch, per thread, and says when it cannot."""

from __future__ import annotations

import functools
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
    monkeypatch.setattr(aoti_isa, "_statuses", {})
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


@pytest.fixture
def unprobed_isa(monkeypatch):
    """Inductor's own ISA list, never computed in this process and raising if it is: any probe is caught."""
    assert aoti_isa.build_bypass_status() == "installed"
    calls = []

    @functools.cache
    def valid_vec_isa_list():
        calls.append(threading.current_thread().name)
        raise _ProbeCalled()

    monkeypatch.setattr(aoti_isa, "_real_isa_list", valid_vec_isa_list)
    return calls


def test_a_gpu_build_answers_without_the_probe_on_its_own_thread_only(unprobed_isa):
    assert getattr(cpu_vec_isa.valid_vec_isa_list, "_monai_trt_isa_bypass", False)
    with aoti_isa.gpu_build_probe_skipped() as active:
        assert active
        assert not cpu_vec_isa.pick_vec_isa(), "no ISA known in this process: the build gets none"
        assert "AOTI_CPU_ISA" not in codecache.get_device_information("cpu"), "the package records no CPU ISA"
        worker = threading.Thread(target=lambda: pytest.raises(_ProbeCalled, cpu_vec_isa.valid_vec_isa_list),
                                  name="compile-elsewhere")
        worker.start()
        worker.join()
    assert unprobed_isa == ["compile-elsewhere"], "only the other thread may run the probe"
    with pytest.raises(_ProbeCalled):
        cpu_vec_isa.pick_vec_isa()  # after the block: torch's own behaviour


def test_a_gpu_build_uses_the_isa_this_process_already_knows(monkeypatch):
    known = cpu_vec_isa.VecAVX2()

    @functools.cache
    def valid_vec_isa_list():
        return [known]

    valid_vec_isa_list()  # probed before: asking again is free
    monkeypatch.setattr(aoti_isa, "_real_isa_list", valid_vec_isa_list)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    with aoti_isa.gpu_build_probe_skipped():
        assert cpu_vec_isa.pick_vec_isa() is known


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_aoti_builds_skip_the_probe_and_autotune_in_one_pass_on_cuda_only(device, monkeypatch, tmp_path):
    """The backend's build, with export and Inductor replaced: what it asks Inductor for, per device."""
    from types import SimpleNamespace

    from monai_trt.backends import aoti

    seen = {}

    def compile_and_package(program, package_path, inductor_configs):
        seen["configs"] = inductor_configs
        seen["answer"] = getattr(aoti_isa._local, "isa_list", None)

    monkeypatch.setattr(aoti, "export_program", lambda job: "program")
    monkeypatch.setattr(aoti, "_inductor", lambda: SimpleNamespace(aoti_compile_and_package=compile_and_package))
    backend = aoti.AotiBackend()
    job = SimpleNamespace(device=torch.device(device), label="net", refit="none",
                          build_args={**backend.default_build_args, "inductor_configs": {"max_autotune": True}})
    assert backend.build(job, tmp_path) == [aoti.ARTIFACT]
    configs = seen["configs"]
    assert configs["max_autotune"] is True and configs["triton.autotune_pointwise"] is False
    if device == "cuda":
        assert configs["triton.autotune_at_compile_time"] is True
        assert seen["answer"] is not None, "a CUDA build must not run the probe"
    else:
        assert "triton.autotune_at_compile_time" not in configs
        assert seen["answer"] is None, "a CPU build keeps the probe: its kernels are vectorised"


@pytest.mark.slow
def test_cpu_kernels_compiled_without_the_isa_answer_right(unprobed_isa, tmp_path):
    """A graph's CPU kernels built inside the block: code generation and compile flags agree on 'no ISA'."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv1d(3, 8, 3), torch.nn.GELU(), torch.nn.Softmax(-1)).eval()
    x = torch.randn(2, 3, 37)
    path = tmp_path / "scalar.pt2"
    with aoti_isa.gpu_build_probe_skipped():
        torch._inductor.aoti_compile_and_package(torch.export.export(model, (x,)), package_path=str(path))
    assert not unprobed_isa
    runner = load_package(path, -1)
    torch.testing.assert_close(runner(x), model(x))


def test_packages_load_after_onnxruntime_is_imported(monkeypatch):
    """On the lent H200 every aoti load died with SIGSEGV in a process that had not imported onnxruntime
    (`benchmarks/session8_diag2.sh`): loads import it first when it is installed, whoever imported monai_trt."""
    import importlib
    import types

    import monai_trt.backends.aoti as aoti

    order: list[str] = []
    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: order.append(name) or real(name, *a))
    monkeypatch.setattr(aoti, "_inductor", lambda: types.SimpleNamespace(
        aoti_load_package=lambda *a, **k: order.append("load")))
    monkeypatch.setattr(aoti.importlib.util, "find_spec", lambda name: object() if name == "onnxruntime" else None)
    load_package("unread.pt2", -1)  # the fake loader reads nothing
    assert order == ["onnxruntime", "load"]
