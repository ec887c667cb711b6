"""What `bench` measures: a bundle (its network with the run's weights, inferer, dataset, configs for end-to-end runs)
or the built-in synthetic workload W1 (SwinUNETR, random seeded weights, random volume).

Both become a :class:`Workload`: the eager fp32 network, how one volume is inferred, the volumes (and labels), the
window batch the network sees, the patch entries engine modes start from, and how a fresh process rebuilds it
(for the start-up measurement, see `bench_startup.py`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monai_trt.bundle.load import DEFAULT_CONFIGS, BundleSource, load_bundle, network_input
from monai_trt.errors import UsageError

__all__ = [
    "Workload", "E2ESpec", "bundle_workload", "w1_settings", "w1_workload", "make_w1_network", "W1_DEFAULTS",
    "DEFAULT_PATCH",
]

logger = logging.getLogger(__name__)

# Workload W1 (shared/FACTS.md): SwinUNETR(feature_size 48, 1 -> 2), 240x240x160 volume, ROI 96^3, sw_batch 8.
W1_DEFAULTS: Mapping[str, Any] = {
    "feature_size": 48, "in_channels": 1, "out_channels": 2, "shape": [240, 240, 160], "roi": [96, 96, 96],
    "sw_batch": 8, "overlap": 0.5, "seed": 0, "window_size": 7, "depths": [2, 2, 2, 2],
}
# The patch engine modes start from when the bundle ships none: the whole network, one engine for every window batch.
DEFAULT_PATCH: list[dict[str, Any]] = [{"submodule": ""}]


@dataclass
class E2ESpec:
    """How to run the bundle end to end with `python -m monai.bundle run`.

    Attributes:
        bundle_root: the bundle directory.
        base_files: config files without the monai_trt patch (the plain PyTorch run).
        patch_files: config files that hold the patch section (may be empty: the bench then writes a full patch file).
        meta_file: metadata.json, when given explicitly.
        net_id: config id of the network.
        patch_id: config id of the patch section.
        amp_id: config id of the bundle's AMP switch (`amp`, else `evaluator#amp`), None when it has none.
        has_output_dir: the config has an `output_dir` id (the bench then points it into its own folder).
        overrides: the user's `--<id> value` overrides, forwarded to every run.
    """

    bundle_root: Path
    base_files: list[Path]
    patch_files: list[Path]
    meta_file: Path | None
    net_id: str
    patch_id: str
    amp_id: str | None
    has_output_dir: bool
    overrides: Mapping[str, Any]


@dataclass
class Workload:
    """One benchmark subject (see the module docstring)."""

    kind: str
    name: str
    network: nn.Module
    device: torch.device
    infer: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    volumes: list[torch.Tensor]
    labels: list[torch.Tensor | None]
    batch_shape: list[int]
    patch: list[dict[str, Any]]
    startup: dict[str, Any]
    e2e: E2ESpec | None = None
    description: dict[str, Any] = field(default_factory=dict)


def _positive_ints(value: Any, what: str, length: int | None = None) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value] * (length or 1)
    if (not isinstance(value, Sequence) or isinstance(value, str) or not value
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
            or (length is not None and len(value) != length)):
        raise UsageError(f"{what} must be {'a list of ' + str(length) if length else 'a list of'} positive integers, "
                       f"got {value!r}")
    return [int(v) for v in value]


def w1_settings(workload_args: Mapping[str, Any] | None) -> dict[str, Any]:
    """W1's parameters with `--workload_args` applied (validated: unknown keys and bad values are errors)."""
    args = dict(workload_args or {})
    unknown = sorted(set(args) - set(W1_DEFAULTS))
    if unknown:
        raise UsageError(f"--workload_args {unknown} are not W1 settings; accepted: {sorted(W1_DEFAULTS)}")
    settings = {**W1_DEFAULTS, **args}
    for key in ("feature_size", "in_channels", "out_channels", "sw_batch", "window_size"):
        settings[key] = _positive_ints(settings[key], f"--workload_args {key}", 1)[0]
    settings["depths"] = _positive_ints(settings["depths"], "--workload_args depths", 4)
    settings["shape"] = _positive_ints(settings["shape"], "--workload_args shape", 3)
    settings["roi"] = _positive_ints(settings["roi"], "--workload_args roi", 3)
    if any(r % 32 for r in settings["roi"]):
        raise UsageError(f"--workload_args roi {settings['roi']} must be multiples of 32 (SwinUNETR's patch merging)")
    if not 0 <= float(settings["overlap"]) < 1:
        raise UsageError(f"--workload_args overlap must be in [0, 1), got {settings['overlap']!r}")
    return settings


def make_w1_network(settings: Mapping[str, Any], device: torch.device) -> nn.Module:
    """W1's SwinUNETR with weights drawn from `settings['seed']` (identical in every process)."""
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(int(settings["seed"]))
    net = SwinUNETR(in_channels=settings["in_channels"], out_channels=settings["out_channels"],
                    feature_size=settings["feature_size"], window_size=settings["window_size"],
                    depths=tuple(settings["depths"]))
    return net.to(device).eval()


def w1_workload(settings: Mapping[str, Any], device: torch.device, num_volumes: int) -> Workload:
    """The synthetic workload W1 (`settings` from :func:`w1_settings`): seeded SwinUNETR, `num_volumes` seeded
    uniform random volumes, sliding window."""
    from monai.inferers import SlidingWindowInferer
    inferer = SlidingWindowInferer(settings["roi"], settings["sw_batch"], overlap=float(settings["overlap"]))
    volumes = [torch.rand(1, settings["in_channels"], *settings["shape"],
                          generator=torch.Generator().manual_seed(1 + i)) for i in range(num_volumes)]
    sw = settings["sw_batch"]
    return Workload(
        kind="w1", name="W1", network=make_w1_network(settings, device), device=device,
        infer=lambda net, vol: inferer(vol, net), volumes=volumes, labels=[None] * num_volumes,
        batch_shape=[sw, settings["in_channels"], *settings["roi"]],
        patch=[{"submodule": "", "dynamic_batchsize": [1, sw, sw]}],
        startup={"kind": "w1", "settings": settings, "device": str(device)},
        description={"kind": "w1", "name": "W1", "network": f"SwinUNETR(feature_size={settings['feature_size']}, "
                     f"{settings['in_channels']}->{settings['out_channels']})", "settings": settings,
                     "inferer": f"SlidingWindowInferer(roi {settings['roi']}, sw_batch {sw}, overlap "
                                f"{settings['overlap']})"},
    )


# ------------------------------------------------------------------------------------------------------- bundles
def _files(config_file: Any, root: Path) -> list[Path]:
    """Config files as `load_bundle` resolves them (default: inference.json + inference_trt.json when present)."""
    import ast

    if config_file is None:
        return [root / f for f in DEFAULT_CONFIGS if (root / f).is_file()]
    if isinstance(config_file, str) and config_file.strip().startswith("["):
        try:
            config_file = ast.literal_eval(config_file.strip())
        except (ValueError, SyntaxError) as err:
            raise UsageError(f"--config_file {config_file!r} is not a list of file names: {err}") from err
    names = [config_file] if isinstance(config_file, str) else list(config_file)
    out = []
    for name in names:
        path = Path(str(name).strip())
        if not path.is_absolute() and (root / path).is_file():
            path = root / path
        if not path.is_file():
            raise UsageError(f"config file {name} not found (looked in {Path.cwd()} and {root})")
        out.append(path.absolute())
    return out


def _holds(path: Path, key: str) -> bool:
    from monai.bundle import ConfigParser

    content = ConfigParser.load_config_file(str(path))
    return isinstance(content, Mapping) and any(k.lstrip("+") == key for k in content)


def _run_initialize(parser: Any, net_id: str) -> None:
    """Run the bundle's `imports` and the `initialize` items that prepare data (not those touching the network)."""
    if "imports" in parser:
        parser.get_parsed_content("imports")
    items = parser.get("initialize") if "initialize" in parser else []
    for index, item in enumerate(items if isinstance(items, list) else []):
        text = str(item)
        if f"@{net_id}" in text or "monai_trt" in text:
            logger.info("bench: not running initialize#%d (it touches the network): %s", index, text[:80])
            continue
        parser.get_parsed_content(f"initialize#{index}")


def _window(inferer: Any, bundle: Any, channels: int) -> list[int] | None:
    roi, sw = getattr(inferer, "roi_size", None), getattr(inferer, "sw_batch_size", None)
    if roi is None:
        return None
    roi = [roi] * 3 if isinstance(roi, int) else list(roi)
    if any(not isinstance(r, int) or r <= 0 for r in roi):
        return None
    return [int(sw or 1), channels, *roi]


def bundle_workload(source: BundleSource, override: Mapping[str, Any], num_volumes: int) -> Workload:
    """A bundle as the bench sees it; its patch section is optional (without one, engines wrap the whole network).

    Raises:
        UsageError: missing files, ids or checkpoint (from `load_bundle`), or a dataset item without an image.
    """
    from monai.bundle import ConfigParser

    root = Path(source.bundle_root or ".").expanduser().absolute()
    files = _files(source.config_file, root)
    meta_file, net_id, patch_id = source.meta_file, source.net_id, source.patch_id
    if not files or not (files[0].is_file()):
        raise UsageError(f"no {DEFAULT_CONFIGS[0]} under bundle_root {root}; pass --bundle_root <dir> or --config_file")
    patch_files = [f for f in files if _holds(f, patch_id)]
    overrides = dict(override)
    load_overrides = dict(overrides)
    if not patch_files:
        load_overrides[patch_id] = DEFAULT_PATCH
        logger.warning("bench: %s hold no '%s'; engine modes wrap the whole network", [f.name for f in files], patch_id)
    source = replace(source, config_file=[str(f) for f in files], bundle_root=str(root))
    bundle = load_bundle(source, load_overrides)
    network, device = bundle.network, next(iter(bundle.network.parameters())).device
    parser = ConfigParser(dict(bundle.config))
    _run_initialize(parser, net_id)
    inferer = parser.get_parsed_content("inferer") if "inferer" in parser else None
    name, shape, _dtype = network_input(bundle)
    batch_shape = _window(inferer, bundle, shape[0]) or [1, *shape]
    volumes, labels = _bundle_volumes(parser, num_volumes, batch_shape)
    infer = (lambda net, vol: inferer(vol, net)) if inferer is not None else (lambda net, vol: net(vol))
    raw = bundle.raw_patch
    patch = [dict(e) for e in (raw if isinstance(raw, list) else [raw])]
    amp_id = next((i for i in ("amp", "evaluator#amp") if i in parser), None)
    e2e = E2ESpec(bundle_root=root, base_files=[f for f in files if f not in patch_files], patch_files=patch_files,
                  meta_file=Path(meta_file).absolute() if meta_file else None, net_id=net_id, patch_id=patch_id,
                  amp_id=amp_id, has_output_dir="output_dir" in parser, overrides=overrides)
    return Workload(
        kind="bundle", name=bundle.name, network=network, device=device, infer=infer, volumes=volumes, labels=labels,
        batch_shape=batch_shape, patch=patch,
        startup={"kind": "bundle", "source": asdict(source), "override": load_overrides},
        e2e=e2e,
        description={"kind": "bundle", "name": bundle.name, "bundle_root": str(root),
                     "config_files": [str(f) for f in files], "network": type(network).__name__, "input": name,
                     "weights": str(bundle.weights) if bundle.weights else None,
                     "inferer": type(inferer).__name__ if inferer is not None else None, "patch": patch,
                     "amp_id": amp_id},
    )


def _bundle_volumes(parser: Any, num_volumes: int, batch_shape: list[int]
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """The first `num_volumes` preprocessed items of the bundle's `dataset` ([1, C, ...] image, label or None)."""
    if "dataset" not in parser:
        logger.warning("bench: the bundle has no 'dataset' id; using random volumes of twice the window size")
        spatial = [2 * s for s in batch_shape[2:]]
        return [torch.rand(1, batch_shape[1], *spatial, generator=torch.Generator().manual_seed(i))
                for i in range(num_volumes)], [None] * num_volumes
    dataset = parser.get_parsed_content("dataset")
    if len(dataset) == 0:
        raise UsageError("the bundle's dataset is empty: check dataset_dir / datalist (override them with "
                       "--dataset_dir ...)")
    volumes, labels = [], []
    for index in range(min(num_volumes, len(dataset))):
        item = dataset[index]
        item = item[0] if isinstance(item, list) else item
        if not isinstance(item, Mapping) or "image" not in item:
            raise UsageError(f"dataset item {index} has no 'image' key (got {type(item).__name__}); the bench feeds "
                           "item['image'] to the inferer as the bundle's evaluator does")
        volumes.append(_plain(item["image"])[None])
        label = item.get("label")
        labels.append(_plain(label)[None] if isinstance(label, torch.Tensor) else None)
    return volumes, labels


def _plain(tensor: Any) -> torch.Tensor:
    """A plain CPU float tensor (MetaTensor metadata dropped)."""
    tensor = torch.as_tensor(tensor)
    tensor = tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor
    return tensor.detach().cpu()
