"""Small bundles with the layout of real model-zoo bundles, written at test time for the converter tests.

Each family mirrors the structure (not the content) of a group of zoo bundles and ships a zoo-style TensorRT config
in one of the two zoo styles:

- `segresnet_sw`: 3D SegResNet, sliding window; `trt_compile` overriding `network`; weights from a
  `CheckpointLoader` id called in `initialize` (gated by `load_pretrain`).
- `unet_ts`: 3D UNet, sliding window; `torch.jit.load` of `models/model_trt.ts` with `initialize` replaced (which
  drops that call); `trt_export` flags in `docs/README.md`.
- `simple2d`: 2D UNet, `SimpleInferer`, PNG in and out, `Invertd`; `torch.jit.load` plus `handlers#0#_disabled_`
  (which disables the `CheckpointLoader` handler).
- `dints`: DiNTS (data-dependent control flow on a buffer), YAML configs; `torch.jit.load`, `initialize` replaced.
- `diffusion`: latent diffusion UNet + autoencoder that are never put in eval mode; `trt_compile` on two ids;
  weights from `load_state_dict` expressions pulled in by `_requires_`.

Not in FAMILIES (not a zoo style, used by the `submodule: auto` bundle test): `dints_gated`, the `dints` bundle
whose network (:class:`InputGatedDiNTS`) also decides on the input's values at the top, so neither torch.export nor
the traced route can take the whole network, while its children export.

Weights are random with a fixed seed, saved as `models/*.pt`. For the segmentation families the last layer's bias
is shifted so that the saved weights segment about half of the test image: masks of other weights then disagree
with it on many voxels, which is what lets a test tell "the checkpoint was loaded" from "random weights".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import yaml
from monai.networks.nets import DiNTS
from torch import nn

ROOT = Path(__file__).parents[1]
FAMILIES = ("segresnet_sw", "unet_ts", "simple2d", "dints", "diffusion")

_DEVICE = "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')"
_TRT_IMPORTS = ["$import glob", "$import os", "$import torch_tensorrt"]


@dataclass
class ZooLike:
    """A written zoo-like bundle.

    Attributes:
        root: bundle directory.
        family: one of FAMILIES.
        inference: its inference config.
        trt: its zoo-style TensorRT config.
        outputs: glob of the files one run writes under its output_dir.
    """

    root: Path
    family: str
    inference: Path
    trt: Path
    outputs: str


# ----------------------------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------------------------


def _seg3d(network_def: dict[str, Any], loader_in_handlers: bool = False) -> dict[str, Any]:
    """A 3D sliding-window segmentation inference config (spleen/swin-like structure, 32³ inputs)."""
    config: dict[str, Any] = {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "image_key": "image",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "$@bundle_root + '/data'",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.nii.gz')))",
        "device": _DEVICE,
        "load_pretrain": True,
        "checkpoint": "$@bundle_root + '/models/model.pt'",
        "network_def": network_def,
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "@image_key"},
            {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
            {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
            {"_target_": "ScaleIntensityd", "keys": "@image_key"},
            {"_target_": "EnsureTyped", "keys": "@image_key"},
        ]},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [16, 16, 16], "sw_batch_size": 4,
                    "overlap": 0.25},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "@image_key",
             "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
             "output_dtype": "$numpy.uint8", "separate_folder": False, "print_log": False},
        ]},
        "handlers": [{"_target_": "StatsHandler", "iteration_log": False}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": True},
        "checkpointloader": {"_target_": "CheckpointLoader", "load_path": "@checkpoint",
                             "load_dict": {"model": "@network"}, "map_location": "cpu"},
        "initialize": ["$monai.utils.set_determinism(seed=123)",
                       "$@checkpointloader(@evaluator) if @load_pretrain else None"],
        "run": ["$@evaluator.run()"],
    }
    if loader_in_handlers:
        config["handlers"].insert(0, config.pop("checkpointloader"))
        config["initialize"] = ["$monai.utils.set_determinism(seed=123)"]
    return config


def _segresnet_sw() -> tuple[dict, dict, str]:
    inference = _seg3d({"_target_": "SegResNet", "spatial_dims": 3, "init_filters": 8, "in_channels": 1,
                        "out_channels": 2, "blocks_down": [1, 1], "blocks_up": [1]})
    trt = {
        "+imports": ["$from monai.networks import trt_compile"],
        "trt_args": {"precision": "fp16", "dynamic_batchsize": "$[1, @inferer#sw_batch_size, @inferer#sw_batch_size]"},
        "network": "$trt_compile(@network_def.to(@device), @checkpoint, args=@trt_args)",
    }
    return inference, trt, ""


def _unet_ts() -> tuple[dict, dict, str]:
    inference = _seg3d({"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                        "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1, "norm": "batch"})
    trt = {
        "imports": _TRT_IMPORTS,
        "network_def": "$torch.jit.load(@bundle_root + '/models/model_trt.ts')",
        "evaluator#amp": False,
        "initialize": ["$monai.utils.set_determinism(seed=123)"],
    }
    readme = (
        "# unet_ts (test bundle)\n\nA pre-built TorchScript engine for this tiny UNet is made with:\n\n```\n"
        "python -m monai.bundle trt_export --net_id network_def --filepath models/model_trt.ts \\\n"
        "  --ckpt_file models/model.pt --meta_file configs/metadata.json --config_file configs/inference.json \\\n"
        "  --precision <fp32/fp16> --dynamic_batchsize \"[1, 4, 8]\" --use_onnx \"True\" --use_trace \"True\"\n```\n"
    )
    return inference, trt, readme


def _simple2d() -> tuple[dict, dict, str]:
    inference: dict[str, Any] = {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "image_key": "image",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "$@bundle_root + '/data'",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.png')))",
        "device": _DEVICE,
        "network_def": {"_target_": "UNet", "spatial_dims": 2, "in_channels": 3, "out_channels": 2,
                        "channels": [4, 8], "strides": [2], "num_res_units": 1},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "@image_key", "image_only": False},
            {"_target_": "EnsureChannelFirstd", "keys": "@image_key", "channel_dim": -1},
            {"_target_": "Resized", "keys": "@image_key", "spatial_size": [32, 48], "mode": "bilinear"},
            {"_target_": "ScaleIntensityd", "keys": "@image_key"},
        ]},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "@image_key",
             "meta_key_postfix": "meta_dict", "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "meta_keys": "pred_meta_dict", "output_dir": "@output_dir",
             "output_ext": ".png", "output_postfix": "seg", "output_dtype": "$numpy.uint8", "scale": 255,
             "separate_folder": False, "squeeze_end_dims": True, "print_log": False},
        ]},
        "handlers": [
            {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
             "load_dict": {"model": "@network"}, "map_location": "cpu"},
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": True},
        "initialize": ["$monai.utils.set_determinism(seed=123)"],
        "run": ["$@evaluator.run()"],
    }
    trt = {
        "imports": _TRT_IMPORTS,
        "handlers#0#_disabled_": True,
        "network_def": "$torch.jit.load(@bundle_root + '/models/model_trt.ts')",
        "evaluator#amp": False,
    }
    readme = (
        "# simple2d (test bundle)\n\n```\npython -m monai.bundle trt_export --net_id network_def "
        "--filepath models/model_trt.ts --ckpt_file models/model.pt --meta_file configs/metadata.json "
        "--config_file configs/inference.json --precision fp16\n```\n"
    )
    return inference, trt, readme


def _dints() -> tuple[dict, dict, str]:
    inference = _seg3d({
        "_target_": "monai.networks.nets.DiNTS", "dints_space": "@dints_space", "in_channels": 1, "num_classes": 2,
        "use_downsample": True, "node_a": "$torch.from_numpy(@arch_ckpt['node_a'])",
    })
    inference.update({
        "arch_ckpt_path": "$@bundle_root + '/models/search_code.pt'",
        "arch_ckpt": "$torch.load(@arch_ckpt_path, map_location='cpu', weights_only=False)",
        "dints_space": {
            "_target_": "monai.networks.nets.TopologyInstance", "channel_mul": 0.0625, "num_blocks": 2,
            "num_depths": 3, "use_downsample": True, "device": "cpu",
            "arch_code": ["$@arch_ckpt['arch_code_a']", "$@arch_ckpt['arch_code_c']"],
        },
    })
    trt = {
        "imports": _TRT_IMPORTS,
        "network_def": "$torch.jit.load(@bundle_root + '/models/model_trt.ts')",
        "evaluator#amp": False,
        "initialize": ["$setattr(torch.backends.cudnn, 'benchmark', True)"],
    }
    readme = (
        "# dints (test bundle)\n\n```\npython -m monai.bundle trt_export --net_id network_def "
        "--filepath models/model_trt.ts --ckpt_file models/model.pt --meta_file configs/metadata.json "
        "--config_file configs/inference.yaml --precision <fp32/fp16> --use_trace \"True\" "
        "--dynamic_batchsize \"[1, 4, 8]\" --converter_kwargs \"{'truncate_long_and_double': True, "
        "'torch_executed_ops': ['aten::upsample_trilinear3d']}\"\n```\n"
    )
    return inference, trt, readme


class InputGatedDiNTS(DiNTS):
    """DiNTS whose top-level forward also decides on the input's values: a constant (empty) window is answered with
    background everywhere without running the cells. That decision makes the whole network unexportable (torch.export
    refuses it, tracing would bake one path in); every child still exports."""

    def __init__(self, *args: Any, num_classes: int, **kwargs: Any) -> None:
        super().__init__(*args, num_classes=num_classes, **kwargs)
        self.classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.amax() == x.amin()):  # a decision on the input's values
            background = torch.zeros((x.shape[0], self.classes, *x.shape[2:]), dtype=x.dtype, device=x.device)
            background[:, 0] = 1.0
            return background
        return super().forward(x)


def _dints_gated() -> tuple[dict, dict, str]:
    inference, trt, readme = _dints()
    inference["network_def"]["_target_"] = "tests.zoo_like.InputGatedDiNTS"
    return inference, trt, readme


def _diffusion() -> tuple[dict, dict, str]:
    inference = {
        "imports": ["$import os"],
        "bundle_root": ".",
        "model_dir": "$@bundle_root + '/models'",
        "output_dir": "$@bundle_root + '/output'",
        "device": _DEVICE,
        "latent_shape": [1, 8, 8],
        "num_inference_steps": 3,
        "autoencoder_def": {
            "_target_": "monai.networks.nets.autoencoderkl.AutoencoderKL", "spatial_dims": 2, "in_channels": 1,
            "out_channels": 1, "latent_channels": 1, "channels": [4, 8], "num_res_blocks": 1, "norm_num_groups": 4,
            "attention_levels": [False, False], "with_encoder_nonlocal_attn": False,
            "with_decoder_nonlocal_attn": False,
        },
        "network_def": {
            "_target_": "monai.networks.nets.diffusion_model_unet.DiffusionModelUNet", "spatial_dims": 2,
            "in_channels": 1, "out_channels": 1, "channels": [8, 8], "attention_levels": [False, True],
            "num_head_channels": [0, 8], "num_res_blocks": 1, "norm_num_groups": 4,
        },
        "load_autoencoder_path": "$@model_dir + '/model_autoencoder.pt'",
        "load_autoencoder": "$@autoencoder_def.load_state_dict(torch.load(@load_autoencoder_path, "
                            "map_location='cpu', weights_only=True))",
        "autoencoder": "$@autoencoder_def.to(@device)",
        "load_diffusion_path": "$@model_dir + '/model.pt'",
        "load_diffusion": "$@network_def.load_state_dict(torch.load(@load_diffusion_path, map_location='cpu', "
                          "weights_only=True))",
        "diffusion": "$@network_def.to(@device)",
        "noise_scheduler": {
            "_target_": "monai.networks.schedulers.DDIMScheduler",
            "_requires_": ["@load_diffusion", "@load_autoencoder"],
            "num_train_timesteps": 1000, "beta_start": 0.0015, "beta_end": 0.0195, "schedule": "scaled_linear_beta",
            "clip_sample": False,
        },
        "set_timesteps": "$@noise_scheduler.set_timesteps(num_inference_steps=@num_inference_steps)",
        "noise": "$torch.randn([1] + @latent_shape, generator=torch.Generator().manual_seed(0)).to(@device)",
        "inferer": {"_target_": "monai.inferers.LatentDiffusionInferer", "scheduler": "@noise_scheduler",
                    "scale_factor": 1.0, "_requires_": "@set_timesteps"},
        "sample": "$@inferer.sample(input_noise=@noise, autoencoder_model=@autoencoder, diffusion_model=@diffusion, "
                  "scheduler=@noise_scheduler, verbose=False)",
        "run": ["$os.makedirs(@output_dir, exist_ok=True)",
                "$torch.save(@sample.cpu(), os.path.join(@output_dir, 'sample.pt'))"],
    }
    trt = {
        "+imports": ["$from monai.networks import trt_compile"],
        "diffusion": "$trt_compile(@network_def.to(@device), @load_diffusion_path)",
        "autoencoder": "$trt_compile(@autoencoder_def.to(@device), @load_autoencoder_path)",
    }
    return inference, trt, ""


_BUILDERS = {"segresnet_sw": _segresnet_sw, "unet_ts": _unet_ts, "simple2d": _simple2d, "dints": _dints,
             "diffusion": _diffusion, "dints_gated": _dints_gated}


# ----------------------------------------------------------------------------------------------------------------
# writing a bundle
# ----------------------------------------------------------------------------------------------------------------


def make_bundle(family: str, root: Path, seed: int = 0) -> ZooLike:
    """Write the zoo-like bundle `family` (FAMILIES or `dints_gated`) under `root` (configs, README, test data,
    fixed-seed weights)."""
    inference, trt, readme = _BUILDERS[family]()
    yaml_style = family.startswith("dints")
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    suffix = ".yaml" if yaml_style else ".json"
    inference_path, trt_path = root / "configs" / f"inference{suffix}", root / "configs" / f"inference_trt{suffix}"
    for path, content in ((inference_path, inference), (trt_path, trt)):
        path.write_text(yaml.safe_dump(content, sort_keys=False) if yaml_style else json.dumps(content, indent=2))
    (root / "configs" / "metadata.json").write_text(json.dumps({"name": f"zoo_like_{family}", "version": "0.1.0"}))
    if readme:
        (root / "docs").mkdir(exist_ok=True)
        (root / "docs" / "README.md").write_text(readme)
    rng = np.random.default_rng(seed)
    if family == "simple2d":
        from PIL import Image  # noqa: PLC0415  (pillow comes with matplotlib, a test dependency)

        small = rng.uniform(0, 255, (5, 7, 3))
        image = np.kron(small, np.ones((8, 8, 1)))[:40, :56] + rng.uniform(0, 30, (40, 56, 3))
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "data" / "img0.png")
        outputs = "*.png"
    elif family != "diffusion":
        small = torch.from_numpy(rng.uniform(0, 1, (1, 1, 6, 6, 6)).astype(np.float32))
        volume = torch.nn.functional.interpolate(small, size=(32, 32, 32), mode="trilinear")[0, 0].numpy()
        volume = volume + rng.normal(0, 0.05, volume.shape).astype(np.float32)
        nib.save(nib.Nifti1Image(volume * 1000 - 200, np.eye(4)), root / "data" / "img0.nii.gz")
        outputs = "*.nii.gz"
    else:
        outputs = "sample.pt"
    if family.startswith("dints"):
        arch = np.random.RandomState(seed)
        torch.save({"node_a": np.ones((3, 3)), "arch_code_a": np.ones((2, 7)),
                    "arch_code_c": arch.randint(0, 4, (2, 7))}, root / "models" / "search_code.pt")
    bundle = ZooLike(root, family, inference_path, trt_path, outputs)
    write_weights(bundle, seed)
    return bundle


def _parser(bundle: ZooLike):
    from monai.bundle import ConfigParser  # noqa: PLC0415

    parser = ConfigParser()
    parser.read_config(str(bundle.inference))
    parser["bundle_root"] = str(bundle.root)
    return parser


def write_weights(bundle: ZooLike, seed: int, calibrate: bool = True) -> None:
    """Random weights with `seed`, saved where the bundle loads them; segmentation nets are balanced (see module doc).

    Args:
        calibrate: shift the last layer's bias so that these weights segment about half of the test image.
    """
    parser = _parser(bundle)
    torch.manual_seed(seed)
    if bundle.family == "diffusion":
        torch.save(parser.get_parsed_content("network_def").state_dict(), bundle.root / "models" / "model.pt")
        torch.save(parser.get_parsed_content("autoencoder_def").state_dict(),
                   bundle.root / "models" / "model_autoencoder.pt")
        return
    net = parser.get_parsed_content("network_def").eval()
    if calibrate:
        image = parser.get_parsed_content("preprocessing")({"image": str(next((bundle.root / "data").iterdir()))})
        with torch.no_grad():
            logits = net(torch.as_tensor(image["image"])[None].float())
            convs = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)
            last = [m for m in net.modules() if isinstance(m, convs) and m.bias is not None and m.out_channels == 2][-1]
            last.bias[1] -= float((logits[:, 1] - logits[:, 0]).median())
    torch.save(net.state_dict(), bundle.root / "models" / "model.pt")


# ----------------------------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------------------------


def config_list(*files: Path | str) -> str:
    """The `--config_file` value for `monai.bundle run`."""
    return "[" + ",".join(f"'{f}'" for f in files) + "]"


def run_cli(bundle: ZooLike, configs: list[Path], output_dir: Path, cache: Path, *args: str,
            timeout: int = 300) -> str:
    """`python -m monai.bundle run` in a subprocess (repository on PYTHONPATH); returns stdout + stderr."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config_list(*configs),
           "--bundle_root", str(bundle.root), "--output_dir", str(output_dir), *args]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {k: v for k, v in os.environ.items() if k != "MONAI_TRT"}
    env.update({"MONAI_TRT_CACHE": str(cache), "PYTHONPATH": path, "OMP_NUM_THREADS": "2"})
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=bundle.root)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done.stdout + done.stderr


def run_in_process(bundle: ZooLike, configs: list[Path], output_dir: Path, **override: Any) -> None:
    """`monai.bundle.run` in this process (no logging.conf is applied), for plain-PyTorch reference runs."""
    from monai.bundle import run  # noqa: PLC0415

    run(config_file=[str(c) for c in configs], bundle_root=str(bundle.root), output_dir=str(output_dir),
        logging_file=False, meta_file=str(bundle.root / "configs" / "metadata.json"), **override)


def read_outputs(bundle: ZooLike, output_dir: Path) -> list[np.ndarray]:
    """The arrays a run wrote, sorted by file name."""
    files = sorted(output_dir.rglob(bundle.outputs))
    assert files, f"no {bundle.outputs} under {output_dir}"
    if bundle.family == "diffusion":
        return [torch.load(f).numpy() for f in files]
    if bundle.family == "simple2d":
        from PIL import Image  # noqa: PLC0415

        return [np.asarray(Image.open(f)) for f in files]
    return [np.asarray(nib.load(f).dataobj) for f in files]


def agreement(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Fraction of equal voxels over all outputs."""
    assert [x.shape for x in a] == [y.shape for y in b]
    return float(np.mean(np.concatenate([(x == y).ravel() for x, y in zip(a, b)])))


def old_doc_patch(trt: dict[str, Any]) -> dict[str, Any]:
    """What the previous docs/zoo_mapping.md steps, applied literally, made of a zoo TensorRT config.

    Step 1 swaps the trt import for `$import monai_trt`; step 2 turns `trt_args` into the entry; step 3 drops the
    network replacement and appends `monai_trt.apply` to the file's `initialize`; step 4 adds the switch. Every
    other key of the zoo file (e.g. a replaced `initialize`, `handlers#0#_disabled_`) stays as it was.
    """
    out = {k: v for k, v in trt.items() if k not in ("network", "network_def", "trt_args")}
    for key in ("imports", "+imports"):
        if key in out:
            out[key] = [i for i in out[key] if "trt" not in i] + ["$import monai_trt"]
    out["trt"] = True
    out["trt_patch"] = [{"submodule": "", **trt.get("trt_args", {})}]
    init_key = "initialize" if "initialize" in out else "+initialize"
    out[init_key] = list(out.get(init_key, [])) + ["$monai_trt.apply(@network, @trt_patch, enabled=@trt)"]
    return out
