"""A bundle as `build` and `verify` see it: configs, metadata, the network with the run's weights, and its patch.

Config conventions are those of `python -m monai.bundle run` (a list of config files merged in order, metadata.json
beside the first one, `bundle_root` and any other id overridable), so the network built here is the one a run builds.
"""

from __future__ import annotations

import ast
import functools
import inspect
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monai_trt.errors import UsageError
from monai_trt.patch.spec import PatchEntry, parse_patch

__all__ = [
    "Bundle", "BundleSource", "bundle_command", "load_bundle", "network_input", "sw_batch_size", "random_tensor",
    "dtype_of", "DEFAULT_CONFIGS",
]

logger = logging.getLogger(__name__)

DEFAULT_CONFIGS = ("configs/inference.json", "configs/inference_trt.json")


@dataclass(frozen=True)
class BundleSource:
    """Where a bundle comes from, as `python -m monai.bundle run` takes it: the options every bundle command shares.

    Attributes:
        config_file: config file(s), merged in order (default configs/inference.json + configs/inference_trt.json).
        bundle_root: the bundle directory (also overrides the config's `bundle_root`).
        meta_file: metadata.json (default: beside the first config file).
        net_id: config id of the network the evaluator runs.
        patch_id: config id of the monai_trt patch.
        ckpt: checkpoint to load (default: the CheckpointLoader's load_path, else models/model.pt).
    """

    config_file: Any = None
    bundle_root: str | None = None
    meta_file: str | None = None
    net_id: str = "network"
    patch_id: str = "trt_patch"
    ckpt: str | None = None


def _source_docs() -> str:
    doc = BundleSource.__doc__ or ""
    return doc[doc.index("Attributes:") + len("Attributes:\n"):].rstrip()


def bundle_command(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give a CLI command `command(source: BundleSource, <own flags>, **override)` the :class:`BundleSource` flags.

    The returned function's signature (what fire shows and parses) is the command's own flags followed by
    `--config_file --bundle_root --meta_file --net_id --patch_id --ckpt`, documented once, here.
    """
    own = list(inspect.signature(command).parameters.values())[1:]
    names = [f.name for f in fields(BundleSource)]
    shared = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
              for f in fields(BundleSource)]
    plain = [p for p in own if p.kind is not inspect.Parameter.VAR_KEYWORD]
    rest = [p for p in own if p.kind is inspect.Parameter.VAR_KEYWORD]

    @functools.wraps(command)
    def run(**kwargs: Any) -> Any:
        source = BundleSource(**{name: kwargs.pop(name) for name in names if name in kwargs})
        return command(source, **kwargs)

    run.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in plain] + shared + rest
    )
    doc = command.__doc__ or ""
    marker = "    Args:\n"
    if marker in doc:
        extra = "\n".join("    " + line for line in _source_docs().splitlines())
        run.__doc__ = doc.replace(marker, marker + extra + "\n", 1)
    return run


@dataclass
class Bundle:
    """A parsed bundle.

    Attributes:
        root: the bundle directory.
        name: metadata `name` (or the directory name).
        metadata: the parsed metadata.json ({} when there is none).
        meta_file: where metadata was read from (None: not found).
        network: the network, on the run's device, in eval mode, with the run's weights.
        weights: the checkpoint loaded into it (None: the config's own weights).
        patch: the validated `trt_patch` entries.
        raw_patch: the parsed `trt_patch` section, as `monai_trt.apply` takes it.
        config: the merged raw config (for reading e.g. the inferer's sw_batch_size).
        net_id: the network's config id (named in every monai_trt message about it).
    """

    root: Path
    name: str
    metadata: Mapping[str, Any]
    meta_file: Path | None
    network: nn.Module
    weights: Path | None
    patch: tuple[PatchEntry, ...]
    raw_patch: Any
    config: Mapping[str, Any]
    net_id: str = "network"


def _config_files(config_file: Any, root: Path) -> list[Path]:
    if config_file is None:
        files = [root / f for f in DEFAULT_CONFIGS if (root / f).is_file()]
        if not (root / DEFAULT_CONFIGS[0]).is_file():
            raise UsageError(f"no {DEFAULT_CONFIGS[0]} under bundle_root {root}; pass --bundle_root <dir> or "
                           "--config_file \"['configs/inference.json','configs/inference_trt.json']\"")
        return files
    if isinstance(config_file, str) and config_file.strip().startswith("["):
        try:
            config_file = ast.literal_eval(config_file.strip())  # "['a.json','b.json']" as fire would parse it
        except (ValueError, SyntaxError) as err:
            raise UsageError(f"--config_file {config_file!r} is not a list of file names: {err}") from err
    names = [config_file] if isinstance(config_file, (str, os.PathLike)) else list(config_file)
    if len(names) == 1 and isinstance(names[0], str) and "," in names[0] and not Path(names[0]).is_file():
        names = names[0].split(",")
    files = []
    for name in names:
        path = Path(str(name).strip())
        if not path.is_absolute() and (root / path).is_file():
            path = root / path  # relative to bundle_root first, then (as monai.bundle run) to the working directory
        if not path.is_file():
            raise UsageError(f"config file {name} not found (looked in {Path.cwd()} and {root})")
        files.append(path)
    return files


def _find_checkpoint_loader(config: Any, net_id: str, prefix: str = "") -> tuple[str, str] | None:
    """(config id of a CheckpointLoader whose load_dict holds @net_id, its load_dict key), searched depth-first."""
    if isinstance(config, Mapping):
        target = config.get("_target_")
        if isinstance(target, str) and target.split(".")[-1] == "CheckpointLoader" and not config.get("_disabled_"):
            load_dict = config.get("load_dict")
            if isinstance(load_dict, Mapping):
                for key, value in load_dict.items():
                    if isinstance(value, str) and value.strip() == f"@{net_id}":
                        return prefix, str(key)
        items = config.items()
    elif isinstance(config, list):
        items = ((str(i), v) for i, v in enumerate(config))
    else:
        return None
    for key, value in items:
        found = _find_checkpoint_loader(value, net_id, f"{prefix}#{key}" if prefix else str(key))
        if found is not None:
            return found
    return None


def _load_weights(parser: Any, network: nn.Module, root: Path, net_id: str, ckpt: str | None) -> Path | None:
    """Load the checkpoint the run's evaluator loads (or `ckpt`) into `network`; None when the run loads none."""
    found = _find_checkpoint_loader(parser.get(), net_id)
    key, strict = "model", True
    if found is not None:
        loader_id, key = found
        strict = bool(parser.get_parsed_content(f"{loader_id}#strict")) if f"{loader_id}#strict" in parser else True
    if ckpt is not None:
        path = Path(ckpt)
    elif found is not None:
        path = Path(str(parser.get_parsed_content(f"{found[0]}#load_path")))
        logger.info("weights: %s (the CheckpointLoader at config id '%s')", path, found[0])
    else:
        path = root / "models" / "model.pt"
        if not path.is_file():
            logger.info("no CheckpointLoader for @%s in the configs and no %s: using the config's weights",
                        net_id, path)
            return None
        logger.warning("no CheckpointLoader for @%s in the configs; assuming the run loads %s (--ckpt to choose)",
                       net_id, path)
    if not path.is_file():
        raise UsageError(f"checkpoint {path} not found: the cache key includes a hash of the weights, so engines "
                       "must be built with the weights the run loads (train or download them, or pass --ckpt)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling failure becomes one clear message
        raise UsageError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from err
    if not isinstance(checkpoint, Mapping):
        raise UsageError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a state_dict")
    state = checkpoint.get(key, checkpoint)  # as CheckpointLoader does: {key: state_dict} or a bare state_dict
    try:
        network.load_state_dict(state, strict=strict)
    except (RuntimeError, KeyError, TypeError) as err:
        raise UsageError(f"checkpoint {path} does not fit the network @{net_id}: {err}") from err
    return path.absolute()


def load_bundle(source: BundleSource, override: Mapping[str, Any] | None = None) -> Bundle:
    """Parse a bundle the way `monai.bundle run` does and return its network (with the run's weights) and patch.

    Raises:
        UsageError: a file, id or checkpoint is missing or does not fit, with what to add.
        PatchError: the `trt_patch` section is invalid.
    """
    from monai.bundle import ConfigParser  # heavy; only commands that read a bundle need it

    config_file, bundle_root, meta_file = source.config_file, source.bundle_root, source.meta_file
    net_id, patch_id = source.net_id, source.patch_id
    root = Path(bundle_root if bundle_root is not None else ".").expanduser().absolute()
    files = _config_files(config_file, root)
    parser = ConfigParser()
    parser.read_config(f=[str(f) for f in files])
    meta_path = Path(meta_file) if meta_file is not None else files[0].parent / "metadata.json"
    if meta_file is not None and not meta_path.is_file():
        raise UsageError(f"metadata file {meta_file} not found")
    if meta_path.is_file():
        parser.read_meta(f=str(meta_path))
    updates = dict(override or {})
    if bundle_root is not None:
        updates["bundle_root"] = str(root)
    parser.update(pairs=updates)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))  # bundle `scripts` packages import as in model-zoo runs
    for needed in (net_id, patch_id):
        if needed not in parser:
            hint = ("add the monai_trt patch (e.g. configs/inference_trt.json) to --config_file" if needed == patch_id
                    else "pass --net_id with the id of the network the evaluator runs")
            raise UsageError(f"no '{needed}' in {[str(f) for f in files]}: {hint}")
    network = parser.get_parsed_content(net_id)
    if not isinstance(network, nn.Module):
        raise UsageError(f"config id '{net_id}' is a {type(network).__name__}, not a torch.nn.Module (--net_id)")
    weights = _load_weights(parser, network, root, net_id, source.ckpt)
    raw_patch = parser.get_parsed_content(patch_id)
    metadata = parser.get(parser.meta_key) or {}
    return Bundle(
        root=root, name=str(metadata.get("name") or root.name), metadata=metadata,
        meta_file=meta_path if meta_path.is_file() else None, network=network.eval(), weights=weights,
        patch=parse_patch(raw_patch), raw_patch=raw_patch, config=parser.get(), net_id=net_id,
    )


def _ints(value: Any) -> list[int] | None:
    if isinstance(value, Sequence) and not isinstance(value, str) and value and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value
    ):
        return [int(v) for v in value]
    return None


def network_input(bundle: Bundle, spatial_shape: Any = None) -> tuple[str, list[int], torch.dtype]:
    """(name, [channels, *spatial], dtype) of the network's input per metadata `network_data_format`.

    Raises:
        UsageError: naming the metadata field to add when the shape cannot be known.
    """
    where = str(bundle.meta_file or (bundle.root / "configs" / "metadata.json"))
    fmt = bundle.metadata.get("network_data_format")
    inputs = fmt.get("inputs") if isinstance(fmt, Mapping) else None
    if not isinstance(inputs, Mapping) or not inputs:
        raise UsageError(
            f"{where} has no network_data_format.inputs, so the input shape of the network is unknown: add "
            '"network_data_format": {"inputs": {"image": {"num_channels": 1, "spatial_shape": [96, 96, 96], '
            '"dtype": "float32"}}} (spatial_shape = the sliding-window roi_size), or give every trt_patch entry '
            "input_profiles"
        )
    name, spec = next(iter(inputs.items()))
    if len(inputs) > 1:
        logger.warning("network_data_format lists %d inputs; the network is called with the first, '%s'",
                       len(inputs), name)
    field_path = f"network_data_format.inputs.{name}"
    channels = spec.get("num_channels") if isinstance(spec, Mapping) else None
    if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
        raise UsageError(f"{where}: {field_path}.num_channels is missing or not a positive integer (got {channels!r}); "
                       "add the number of input channels")
    shape = _ints(spatial_shape) if spatial_shape is not None else _ints(spec.get("spatial_shape"))
    if shape is None:
        given = spatial_shape if spatial_shape is not None else spec.get("spatial_shape")
        raise UsageError(
            f"{where}: {field_path}.spatial_shape is {given!r}, not a list of positive integers; set it to the "
            "shape the run feeds the network (the sliding-window roi_size, e.g. [96, 96, 96]) or pass "
            '--spatial_shape "[96,96,96]"'
        )
    dtype = dtype_of(str(spec.get("dtype", "float32")), f"{where}: {field_path}.dtype")
    return str(name), [channels, *shape], dtype


def sw_batch_size(bundle: Bundle) -> int | None:
    """The inferer's `sw_batch_size` when the config has a literal one (the window batch a run uses)."""
    inferer = bundle.config.get("inferer")
    value = inferer.get("sw_batch_size") if isinstance(inferer, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def random_tensor(shape: Sequence[int], dtype: torch.dtype, device: torch.device, generator: torch.Generator
                  ) -> torch.Tensor:
    """A random input: uniform [0, 1) floats (like scaled intensities), 0/1 integers and bools."""
    if dtype.is_floating_point:
        return torch.rand(list(shape), generator=generator).to(device=device, dtype=dtype)
    values = torch.randint(0, 2, list(shape), generator=generator)
    return values.to(device=device, dtype=dtype)


def dtype_of(name: str, what: str = "input dtype") -> torch.dtype:
    """torch dtype for a dtype name as metadata and cache entries write it ("float32", "torch.int64").

    Raises:
        UsageError: `name` is not a torch dtype.
    """
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise UsageError(f"{what} {name!r} is not a torch dtype (e.g. float32, float16, int64)")
    return dtype
