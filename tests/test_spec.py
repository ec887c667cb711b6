"""trt_patch / switch validation: every bad input is a PatchError naming the field, raised before any work."""

from __future__ import annotations

import pytest

from monai_trt.errors import PatchError
from monai_trt.patch.spec import PatchEntry, default_cache_dir, parse_patch, parse_switch


def test_minimal_entry_gets_defaults(cache_dir):
    (entry,) = parse_patch([{}])
    assert entry == PatchEntry(submodule="", path=cache_dir, precision="auto", method="auto")


def test_single_dict_and_submodule_list_expand():
    entries = parse_patch({"submodule": ["a", "b.c"], "precision": "fp32"})
    assert [e.submodule for e in entries] == ["a", "b.c"]
    assert all(e.precision == "fp32" for e in entries)


@pytest.mark.parametrize("empty", [None, []])
def test_empty_patch_is_nothing(empty):
    assert parse_patch(empty) == ()


@pytest.mark.parametrize(
    "patch, message",
    [
        ("fp16", "must be a list"),
        (42, "must be a list"),
        ([3], r"trt_patch\[0\] must be a dict"),
        ([{"precision": "fp8"}], r"precision must be one of \['fp32', 'tf32', 'fp16', 'bf16', 'auto'\]"),
        ([{"method": "tensorrt"}], r"method must be one of"),
        ([{"refit": "yes"}], r"refit must be one of"),
        ([{"build_args": ["x"]}], r"build_args must be a dict"),
        ([{"dynamic_batchsize": [4, 2, 8]}], r"min <= opt <= max"),
        ([{"dynamic_batchsize": [1, 2]}], r"\[min, opt, max\]"),
        ([{"dynamic_batchsize": [0, 1, 2]}], r"positive integers"),
        ([{"dynamic_batchsize": [1, 2, 4], "input_profiles": [{"x": [[1], [2], [4]]}]}], "not both"),
        ([{"input_profiles": [{"x": [[1, 2], [2, 2], [4]]}]}], "different ranks"),
        ([{"input_profiles": [{"x": [[4], [2], [8]]}]}], "min <= opt <= max"),
        ([{"input_profiles": [{"x": [[1], [2]]}]}], r"\[min_shape, opt_shape, max_shape\]"),
        ([{"fallback": "maybe"}], r"fallback must be boolean-like"),
        ([{"tolerance": -1}], r"tolerance must be a positive number"),
        ([{"max_engines": 0}], r"max_engines must be a positive integer"),
        ([{"submodule": 5}], r"submodule must be a dotted path"),
        ([{"precison": "fp16"}], r"unknown key\(s\) \['precison'\]; accepted keys are"),
        ([{"submodule": "a"}, {"submodule": "a"}], "more than one entry"),
        ([{"submodule": ""}, {"submodule": "enc"}], "lies inside"),
        ([{"submodule": "enc"}, {"submodule": "enc.0"}], "lies inside"),
    ],
)
def test_bad_patch_raises_clear_error(patch, message):
    with pytest.raises(PatchError, match=message):
        parse_patch(patch)


def test_zoo_only_keys_are_accepted():
    (entry,) = parse_patch([{"timestamp": 123, "output_lists": [[-1]], "use_cuda_graph": True}])
    assert entry.use_cuda_graph is True


@pytest.mark.parametrize(
    "value, expected",
    [(True, True), (False, False), (1, True), (0, False), ("true", True), ("FALSE", False), (" On ", True),
     ("off", False), ("1", True), ("0", False), ("yes", True), ("No", False)],
)
def test_switch_accepts_boolean_like(value, expected):
    assert parse_switch(value) is expected


@pytest.mark.parametrize("value", ["maybe", 2, None, 1.0, [True], ""])
def test_switch_rejects_other_values(value):
    with pytest.raises(PatchError, match="boolean-like"):
        parse_switch(value)


@pytest.mark.parametrize("env, enabled, expected", [("0", True, False), ("1", False, True), ("off", "true", False)])
def test_env_overrides_switch(monkeypatch, env, enabled, expected):
    monkeypatch.setenv("MONAI_TRT", env)
    assert parse_switch(enabled) is expected


def test_bad_env_switch_is_named(monkeypatch):
    monkeypatch.setenv("MONAI_TRT", "sometimes")
    with pytest.raises(PatchError, match="MONAI_TRT"):
        parse_switch(True)


def test_cache_dir_default_order(monkeypatch, tmp_path):
    monkeypatch.setenv("MONAI_TRT_CACHE", str(tmp_path / "a"))
    assert default_cache_dir() == str(tmp_path / "a")
    monkeypatch.delenv("MONAI_TRT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == str(tmp_path / "xdg" / "monai_trt")


# Every argument MONAI's TrtCompiler (monai/networks/trt_compiler.py, monai 1.6.1) accepts, as a model-zoo
# inference_trt.json would spell it after the config parser resolved it.
ZOO_ARGS = {
    "precision": "fp16",
    "method": "onnx",
    "input_names": ["x_in"],
    "output_names": ["pred"],
    "output_lists": [[-1]],
    "export_args": {"dynamo": True, "report": True, "opset_version": 20, "use_trace": False, "verify": True},
    "build_args": {"builder_optimization_level": 5, "precision_constraints": "obey"},
    "dynamic_batchsize": [1, 4, 4],
    "use_cuda_graph": False,
    "timestamp": 1732000000,
    "fallback": True,
    "forward_override": None,
}


def test_every_trt_compile_argument_is_accepted():
    (entry,) = parse_patch({**ZOO_ARGS, "submodule": "image_encoder.encoder"})
    assert entry.submodule == "image_encoder.encoder"
    assert (entry.precision, entry.method, entry.fallback, entry.use_cuda_graph) == ("fp16", "onnx", True, False)
    assert entry.dynamic_batchsize == (1, 4, 4)
    assert dict(entry.build_args) == {"builder_optimization_level": 5, "precision_constraints": "obey"}
    assert entry.output_names == ("pred",)


def test_zoo_export_args_for_convert_to_onnx_are_dropped_from_the_entry():
    # dynamo/use_trace/verify are MONAI convert_to_onnx options; passed on to torch.onnx.export(dynamo=True, ...)
    # they would fail the export ("multiple values for keyword argument 'dynamo'") or change the key for nothing.
    (entry,) = parse_patch(ZOO_ARGS)
    assert dict(entry.export_args) == {"report": True, "opset_version": 20}
    (plain,) = parse_patch({"export_args": {"dynamo": True}})
    assert plain == parse_patch({})[0]


def test_ignored_zoo_keys_are_reported(trt_logs):
    parse_patch([{"timestamp": 1, "input_names": ["x"], "export_args": {"dynamo": False}}])
    text = trt_logs.text()
    assert "['input_names', 'timestamp', 'export_args.dynamo'] accepted for compatibility" in text


@pytest.mark.parametrize("key", ["input_names", "output_names"])
def test_io_names_must_be_lists_of_strings(key):
    with pytest.raises(PatchError, match=rf"{key} must be a list of strings"):
        parse_patch([{key: "x_in"}])
