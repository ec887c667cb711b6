"""`monai_trt.bundle.zoo`: converting model-zoo TensorRT configs (both zoo styles) into patches that keep the weights.

Zoo-like bundles come from `tests/zoo_like.py` (written into tmp dirs). Each family is converted, run once through
the real `python -m monai.bundle run` with the converted patch (onnxruntime fp32 engines on CPU), and compared with
a plain run of the bundle's own inference config and with a run on other (random) weights, both in this process.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from monai_trt.bundle.zoo import (
    ConversionError,
    check_patch,
    convert_bundle,
    find_checkpoint_loaders,
    parse_trt_export_commands,
)
from tests import zoo_like
from tests.zoo_like import agreement, make_bundle, old_doc_patch, read_outputs, run_cli, run_in_process

pytestmark = pytest.mark.filterwarnings("ignore:parsing config_file:UserWarning")
NETWORK_OF = {"segresnet_sw": "network", "unet_ts": "network", "simple2d": "network", "dints": "network",
              "diffusion": "diffusion"}


def _convert_for_cpu(bundle: zoo_like.ZooLike):
    """The conversion the run tests use: onnxruntime fp32 engines, so CPU outputs can be compared voxel by voxel."""
    return convert_bundle(bundle.root, method="onnxruntime", precision="fp32")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, request):
    """Per family: the bundle, its conversion, the converted CLI run's log, and outputs of the trt / plain /
    `--trt False` / random-weights runs."""
    done: dict[str, dict] = {}

    def get(family: str) -> dict:
        if family in done:
            return done[family]
        tmp = tmp_path_factory.mktemp(family)
        bundle = make_bundle(family, tmp / "bundle")
        conversion = _convert_for_cpu(bundle)
        log = run_cli(bundle, [bundle.inference, conversion.out], tmp / "out_trt", tmp / "cache")
        run_in_process(bundle, [bundle.inference], tmp / "out_plain")
        run_in_process(bundle, [bundle.inference, conversion.out], tmp / "out_off", trt=False)
        other = zoo_like.ZooLike(tmp / "random", family, *(tmp / "random" / p.relative_to(bundle.root)
                                                            for p in (bundle.inference, bundle.trt)), bundle.outputs)
        shutil.copytree(bundle.root, other.root)
        zoo_like.write_weights(other, seed=1, calibrate=False)
        run_in_process(other, [other.inference], tmp / "out_random")
        outputs = {name: read_outputs(bundle, tmp / f"out_{name}") for name in ("trt", "plain", "off", "random")}
        done[family] = {"bundle": bundle, "conversion": conversion, "log": log, "out": outputs}
        return done[family]

    return get


def _assert_checkpoint_outputs(family: str, out: dict[str, list[np.ndarray]], run: str) -> None:
    """`run` agrees with the plain run; the plain run differs strongly from one on other weights."""
    plain, random = out["plain"], out["random"]
    if family == "diffusion":
        assert np.abs(plain[0] - random[0]).max() > 0.1
        np.testing.assert_allclose(out[run][0], plain[0], atol=1e-4)
        return
    assert 0.2 < float(np.mean(plain[0] > 0)) < 0.8  # a mask that depends on the weights
    assert agreement(plain, random) < 0.9
    assert agreement(out[run], plain) >= 0.99


# ----------------------------------------------------------------------------------------------------------------
# converted runs, one per family (real CLI)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", ["segresnet_sw", "unet_ts", "dints", "diffusion"])
def test_converted_run_uses_the_checkpoint(runs, family):
    r = runs(family)
    _assert_checkpoint_outputs(family, r["out"], "trt")


@pytest.mark.slow
@pytest.mark.parametrize("family", zoo_like.FAMILIES)
def test_switch_off_is_the_plain_run_and_the_loader_stays(runs, family):
    """`--trt False` over the converted patch equals the plain run; the written file overrides nothing else."""
    r = runs(family)
    _assert_checkpoint_outputs(family, r["out"], "off")
    written = json.loads(r["conversion"].out.read_text())
    network = NETWORK_OF[family]
    assert r["conversion"].loaders[network]
    assert set(written) <= {"+imports", "imports", "trt", "+initialize", "initialize"} | {
        k for k in written if k.startswith("trt_patch")}
    assert "torch.jit.load" not in json.dumps(written) and "trt_compile" not in json.dumps(written)
    if "initialize" in written:  # only when the bundle has no initialize of its own
        assert "initialize" not in zoo_like.yaml.safe_load(r["bundle"].inference.read_text())
    assert check_patch(r["bundle"].root, r["conversion"].out)[network] == r["conversion"].loaders[network]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["segresnet_sw", "unet_ts", "simple2d"])
def test_an_engine_served_the_converted_run(runs, family):
    log = runs(family)["log"]
    assert log.count("engine ready in") == 1
    assert "engine disabled" not in log and "runs in PyTorch" not in log


@pytest.mark.slow
def test_simple_inferer_2d_output_matches_the_plain_run(runs):
    """Engine outputs carry the input MetaTensor's metadata, so Invertd/SaveImaged write the image's size and name."""
    r = runs("simple2d")
    _assert_checkpoint_outputs("simple2d", r["out"], "trt")


@pytest.mark.slow
def test_dints_gets_an_engine(runs):
    """Control flow on a buffer: torch.export fails, the traced export (its decisions read no input) serves."""
    log = runs("dints")["log"]
    assert "engine ready in" in log and "engine disabled" not in log and "exported by tracing" in log


@pytest.mark.slow
def test_diffusion_unet_gets_an_engine(runs):
    """Never put in eval mode, but no layer behaves differently in training and no gradient is needed: served."""
    log = runs("diffusion")["log"]
    assert "engine ready in" in log


# ----------------------------------------------------------------------------------------------------------------
# the old doc steps vs the converter
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_old_doc_steps_drop_the_loader_and_the_converter_keeps_it(tmp_path):
    """A torch_tensorrt-style zoo file converted by the previous doc steps runs on random weights; check_patch
    refuses it, the converter keeps the loader."""
    bundle = make_bundle("unet_ts", tmp_path / "bundle")
    old = old_doc_patch(json.loads(bundle.trt.read_text()))
    old_file = bundle.root / "configs" / "old_doc.json"
    old_file.write_text(json.dumps(old))
    with pytest.raises(ConversionError, match=r"drops checkpoint loading of @network.*checkpointloader"):
        check_patch(bundle.root, old_file)
    run_in_process(bundle, [bundle.inference], tmp_path / "plain")
    run_in_process(bundle, [bundle.inference, old_file], tmp_path / "old", trt=False)  # exits normally...
    plain, old_out = read_outputs(bundle, tmp_path / "plain"), read_outputs(bundle, tmp_path / "old")
    assert agreement(old_out, plain) < 0.9  # ...on random weights
    conversion = convert_bundle(bundle.root, dry_run=True)
    assert [loader.where for loader in conversion.loaders["network"]] == ["checkpointloader"]


def test_old_doc_steps_were_right_for_trt_compile_files(tmp_path):
    bundle = make_bundle("segresnet_sw", tmp_path / "bundle")
    old_file = bundle.root / "configs" / "old_doc.json"
    old_file.write_text(json.dumps(old_doc_patch(json.loads(bundle.trt.read_text()))))
    assert [loader.where for loader in check_patch(bundle.root, old_file)["network"]] == ["checkpointloader"]


# ----------------------------------------------------------------------------------------------------------------
# mapping (no runs)
# ----------------------------------------------------------------------------------------------------------------


def _notes(conversion) -> str:
    return "\n".join(conversion.notes)


def test_torch_tensorrt_style_maps_the_readme_trt_export_flags(tmp_path):
    bundle = make_bundle("unet_ts", tmp_path / "b")
    conversion = convert_bundle(bundle.root)
    written = json.loads((bundle.root / "configs" / "inference_monai_trt.json").read_text())
    assert written == conversion.patch == {
        "+imports": ["$import monai_trt"],
        "trt": True,
        "trt_patch": [{"submodule": "", "precision": "fp16", "method": "onnx", "dynamic_batchsize": [1, 4, 8]}],
        "+initialize": ["$monai_trt.apply(@network, @trt_patch, enabled=@trt)"],
    }
    assert conversion.styles == ("torch_tensorrt",)
    notes = _notes(conversion)
    assert "precision not fixed by the zoo" in notes and "<fp32/fp16>" in notes
    assert "--use_trace" in notes and "models/model_trt.ts" in notes
    assert "'initialize': not carried" in notes and "checkpointloader" in notes
    assert "'evaluator#amp'" in notes


def test_torch_tensorrt_yaml_dints_maps_converter_kwargs(tmp_path):
    bundle = make_bundle("dints", tmp_path / "b")
    conversion = convert_bundle(bundle.root, dry_run=True)
    assert conversion.patch["trt_patch"] == [{"submodule": "", "precision": "fp16", "method": "torch_trt",
                                              "dynamic_batchsize": [1, 4, 8], "build_args": {"truncate_double": True}}]
    assert "torch_executed_ops" in _notes(conversion) and conversion.out is None
    assert not (bundle.root / "configs" / "inference_monai_trt.json").exists()


def test_torch_tensorrt_style_disabled_loader_handler_is_not_carried(tmp_path):
    bundle = make_bundle("simple2d", tmp_path / "b")
    conversion = convert_bundle(bundle.root, method="auto", dry_run=True)
    assert conversion.patch["trt_patch"] == [{"submodule": "", "precision": "fp16", "method": "auto"}]
    assert [loader.where for loader in conversion.loaders["network"]] == ["handlers::0"]
    assert "disables the bundle's CheckpointLoader" in _notes(conversion)
    assert "handlers#0#_disabled_" not in conversion.patch


def test_trt_compile_style_keeps_args_and_trt_compile_defaults(tmp_path):
    bundle = make_bundle("segresnet_sw", tmp_path / "b")
    conversion = convert_bundle(bundle.root, dry_run=True)
    assert conversion.patch["trt_patch"] == [{
        "submodule": "", "dynamic_batchsize": "$[1, @inferer#sw_batch_size, @inferer#sw_batch_size]",
        "precision": "fp16", "method": "onnx", "build_args": {"builder_optimization_level": 5},
    }]
    assert "base_path @checkpoint dropped" in _notes(conversion)


def test_two_network_generative_bundle(tmp_path):
    bundle = make_bundle("diffusion", tmp_path / "b")
    conversion = convert_bundle(bundle.root, method="auto", dry_run=True)
    assert conversion.networks == {"diffusion": "trt_patch_diffusion", "autoencoder": "trt_patch_autoencoder"}
    assert conversion.patch["initialize"] == [  # the bundle has no initialize: a plain key, no merge warning
        "$monai_trt.apply(@diffusion, @trt_patch_diffusion, enabled=@trt)",
        "$monai_trt.apply(@autoencoder, @trt_patch_autoencoder, enabled=@trt)",
    ]
    assert [loader.kind for loader in conversion.loaders["autoencoder"]] == ["load_state_dict"]
    notes = _notes(conversion)
    assert "never put in eval mode" in notes and "submodule 'decoder'" in notes


def test_vista3d_like_conditional_submodule_calls(tmp_path):
    """Several trt_compile calls on one network, one under a literal-false condition (vista3d's structure)."""
    bundle = make_bundle("segresnet_sw", tmp_path / "b")
    bundle.trt.write_text(json.dumps({
        "+imports": ["$from monai.networks import trt_compile"],
        "head_enabled": False,
        "enc_args": {"dynamic_batchsize": [1, 2, 4], "output_lists": [[-1]], "timestamp": 1},
        "net_dev": "$@network_def.to(@device)",
        "encoder": "$trt_compile(@net_dev, @checkpoint, args=@enc_args, submodule=['down_layers.0'])",
        "max_prompt": 3,
        "head": "$trt_compile(@net_dev, @checkpoint, args={'fallback': True, 'dynamic_batchsize': [1, 1, "
                "@max_prompt]}, submodule='conv_final') if @head_enabled else @net_dev",
        "network": "$None if @encoder is None else @head",
    }))
    conversion = convert_bundle(bundle.root, method="onnxruntime", dry_run=True)
    assert conversion.patch["trt_patch"] == [
        {"submodule": "down_layers.0", "dynamic_batchsize": [1, 2, 4], "precision": "fp16", "method": "onnxruntime"}]
    notes = _notes(conversion)
    assert "never taken" in notes and "args.output_lists dropped" in notes and "args.timestamp dropped" in notes
    bundle.trt.write_text(bundle.trt.read_text().replace('"head_enabled": false', '"head_enabled": true'))
    assert "max_prompt" not in conversion.patch and "'max_prompt': 3 not carried" in notes
    patch = convert_bundle(bundle.root, method="onnxruntime", dry_run=True).patch
    entries = patch["trt_patch"]
    assert [e["submodule"] for e in entries] == ["down_layers.0", "conv_final"] and entries[1]["fallback"] is True
    assert entries[1]["dynamic_batchsize"] == "$[1, 1, @max_prompt]" and patch["max_prompt"] == 3


def test_parse_trt_export_commands():
    readme = ("x\n```\npython -m monai.bundle trt_export --net_id network_def \\\n --filepath models/a.ts "
              "--precision <fp32/fp16> \\\n  --dynamic_batchsize \"[1, 4, 8]\" --use_onnx \"True\" "
              "--converter_kwargs \"{'a': 1}\" --network_def#x \"True\" --use_trace\n```\n")
    assert parse_trt_export_commands(readme) == [{
        "net_id": "network_def", "filepath": "models/a.ts", "precision": "<fp32/fp16>", "dynamic_batchsize": [1, 4, 8],
        "use_onnx": True, "converter_kwargs": {"a": 1}, "network_def#x": True, "use_trace": True,
    }]


def test_check_patch_accepts_the_example_bundles():
    root = Path(__file__).parents[1] / "bundles"
    found = {b.name: {net: [loader.where for loader in loaders]
                      for net, loaders in check_patch(b, "configs/inference_trt.json").items()}
             for b in sorted(root.iterdir())}
    assert found == {
        "diffusion_generation": {"network": ["load_diffusion"], "autoencoder": ["load_autoencoder"]},
        "spheres_segmentation": {"network": ["handlers::0"]},
        "swin_unetr_btcv_segmentation": {"network": ["handlers::0"]},
        "vista3d_segmentation": {"network": ["handlers::0"]},
    }


def test_find_checkpoint_loaders_follows_the_run():
    config = {
        "network_def": {"_target_": "UNet"}, "network": "$@network_def.to(@device)", "flag": False,
        "loader": {"_target_": "CheckpointLoader", "load_path": "a.pt", "load_dict": {"model": "@network"}},
        "off": {"_target_": "CheckpointLoader", "_disabled_": True, "load_path": "b.pt",
                "load_dict": {"m": "@network"}},
        "evaluator": {"_target_": "SupervisedEvaluator", "network": "@network", "val_handlers": ["@off"]},
        "initialize": ["$@loader(@evaluator) if @flag else None"],
        "run": ["$@evaluator.run()"],
    }
    assert find_checkpoint_loaders(config, "network") == []  # gated off, and the other one disabled
    config["flag"] = True
    assert [loader.where for loader in find_checkpoint_loaders(config, "network_def")] == ["loader"]


# ----------------------------------------------------------------------------------------------------------------
# refusals: an error, never a patch on random weights
# ----------------------------------------------------------------------------------------------------------------


def _edit(path: Path, **changes) -> None:
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_refuses_when_nothing_loads_the_checkpoint(tmp_path):
    bundle = make_bundle("unet_ts", tmp_path / "b")
    _edit(bundle.inference, load_pretrain=False)
    with pytest.raises(ConversionError, match="nothing loads a checkpoint into @network"):
        convert_bundle(bundle.root)
    assert not (bundle.root / "configs" / "inference_monai_trt.json").exists()


def test_refuses_keeping_an_override_that_drops_the_loader(tmp_path):
    bundle = make_bundle("unet_ts", tmp_path / "b")
    with pytest.raises(ConversionError, match="drops checkpoint loading of @network"):
        convert_bundle(bundle.root, keep=["initialize"])


def test_refuses_when_the_run_uses_another_module(tmp_path):
    bundle = make_bundle("unet_ts", tmp_path / "b")
    _edit(bundle.inference, wrapped="$torch.nn.Sequential(@network)",
          evaluator={**json.loads(bundle.inference.read_text())["evaluator"], "network": "@wrapped"})
    with pytest.raises(ConversionError, match="the run uses @wrapped"):
        convert_bundle(bundle.root)


@pytest.mark.parametrize("trt, match", [
    ({"+imports": ["$import monai_trt"], "trt_patch": [], "+initialize": ["$monai_trt.apply(@network, @trt_patch)"]},
     "already a monai_trt patch"),
    ({"precision": "fp16"}, "not a model-zoo TensorRT config"),
    ({"network": "$trt_compile(@network_def, @checkpoint) if os.environ.get('X') else @network_def"},
     "not a literal"),
    ({"network": "$trt_compile(@network_def.to(@device), @checkpoint, args={'precision': 'int8'})"},
     "precision"),
])
def test_refuses_unconvertible_files(tmp_path, trt, match):
    bundle = make_bundle("segresnet_sw", tmp_path / "b")
    bundle.trt.write_text(json.dumps(trt))
    with pytest.raises(ConversionError, match=match):
        convert_bundle(bundle.root, dry_run=True)


def test_bad_options_and_existing_output(tmp_path):
    bundle = make_bundle("segresnet_sw", tmp_path / "b")
    with pytest.raises(ConversionError, match="method must be"):
        convert_bundle(bundle.root, method="tensorrt")
    with pytest.raises(ConversionError, match="precision must be"):
        convert_bundle(bundle.root, precision="int8")
    bundle.trt.unlink()
    with pytest.raises(ConversionError, match="no configs/inference_trt.json or .yaml"):
        convert_bundle(bundle.root)
    make_bundle("segresnet_sw", bundle.root)
    convert_bundle(bundle.root)
    with pytest.raises(ConversionError, match="exists; pass force=True"):
        convert_bundle(bundle.root)
    assert convert_bundle(bundle.root, force=True).out.is_file()


def test_build_args_the_method_does_not_take_are_dropped_with_a_note(tmp_path):
    bundle = make_bundle("segresnet_sw", tmp_path / "b")
    _edit(bundle.trt, trt_args={"build_args": {"builder_optimization_level": 4, "min_block_size": 3}})
    keep = convert_bundle(bundle.root, dry_run=True)
    assert keep.patch["trt_patch"][0]["build_args"] == {"builder_optimization_level": 4}
    assert "build_args ['min_block_size'] are not options of method onnx" in _notes(keep)
    ort = convert_bundle(bundle.root, method="onnxruntime", dry_run=True)
    assert "build_args" not in ort.patch["trt_patch"][0]


def test_cli_convert_writes_the_patch_and_says_what_it_mapped(tmp_path, monkeypatch, capsys):
    from monai_trt.cli import commands as cli

    bundle = make_bundle("unet_ts", tmp_path / "b")
    monkeypatch.setattr(sys, "argv", ["monai_trt", "convert", str(bundle.root), "--method", "onnxruntime"])
    cli.main()
    out = capsys.readouterr().out
    written = bundle.root / "configs" / "inference_monai_trt.json"
    assert written.is_file() and str(written) in out and "mapped" in out
    patch = json.loads(written.read_text())
    assert patch["trt_patch"][0]["method"] == "onnxruntime"
    monkeypatch.setattr(sys, "argv", ["monai_trt", "convert", str(bundle.root)])
    with pytest.raises(SystemExit) as exit_:  # exists: refused with one error line, nothing overwritten
        cli.main()
    assert exit_.value.code == 1 and "exists" in capsys.readouterr().err
