"""Raw bundle configs as `python -m monai.bundle run` sees them: find, load and merge the files, look up an id.

Also defines :class:`ConversionError`, which every step of the conversion raises.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monai_trt.errors import PatchError

ROOT_IDS = ("initialize", "run", "finalize")  # what `python -m monai.bundle run` executes
CONFIG_SUFFIXES = (".json", ".yaml", ".yml")
MISSING = object()  # what :func:`lookup` returns for an id the config does not define


class ConversionError(PatchError):
    """The zoo file cannot be converted into a patch that runs on the bundle's trained weights; says why."""


def norm(config_id: str) -> str:
    """`a#b` -> `a::b` (both separators are valid in MONAI config ids)."""
    return config_id.replace("#", "::")


def lookup(config: Any, config_id: str) -> Any:
    """The raw value at a `::`/`#`-separated id, or :data:`MISSING`."""
    node = config
    for part in norm(config_id).split("::") if config_id else []:
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return MISSING
    return node


def find_bundle_file(bundle_root: str | Path, stem: str, given: str | Path | None = None) -> Path:
    """`configs/<stem>.json|yaml|yml` of a bundle, or `given` (a relative path is looked up under the bundle root first,
    then under the current directory).

    Raises:
        ConversionError: the file does not exist.
    """
    root = Path(bundle_root)
    if given is not None:
        path = Path(given)
        if not path.is_absolute() and (root / path).is_file():
            path = root / path
        if not path.is_file():
            raise ConversionError(f"{path} does not exist")
        return path
    for suffix in CONFIG_SUFFIXES:
        path = root / "configs" / f"{stem}{suffix}"
        if path.is_file():
            return path
    raise ConversionError(f"no configs/{stem}.json or .yaml in bundle {root}")


def load_config(path: Path) -> dict[str, Any]:
    """The raw content of a JSON or YAML config file.

    Raises:
        ConversionError: the file does not hold a dict.
    """
    from monai.bundle import ConfigParser  # monai is heavy; only when converting

    content = ConfigParser.load_config_file(str(path))
    if not isinstance(content, dict):
        raise ConversionError(f"{path} must hold a dict of config ids, got {type(content).__name__}")
    return content


def merge_configs(*configs: Mapping[str, Any]) -> dict[str, Any]:
    """Merge raw configs key by key exactly as `python -m monai.bundle run --config_file "[a, b]"` does.

    Raises:
        ConversionError: a key (such as `+x` or `a#b`) that cannot be merged onto the configs before it.
    """
    from monai.bundle import ConfigParser
    from monai.bundle.utils import merge_kv

    parser = ConfigParser(config={})
    for config in configs:
        for key, value in copy.deepcopy(dict(config)).items():
            try:
                merge_kv(parser, key, value)
            except (KeyError, IndexError, ValueError, TypeError) as err:
                raise ConversionError(f"cannot merge key '{key}' onto the bundle config: {err}") from err
    return parser.get()


def relative(path: Path | None, root: Path) -> str:
    """`path` relative to `root` where it lies below it, else as given; `""` for None."""
    if path is None:
        return ""
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)
