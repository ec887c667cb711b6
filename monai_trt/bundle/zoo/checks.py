"""The safety checks on a patch merged over a bundle: every patched network still loads its checkpoint, no zoo engine
is left, and every `trt_patch` section is valid for monai_trt."""

from __future__ import annotations

import ast
import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monai_trt.bundle.zoo.configs import ROOT_IDS, ConversionError, find_bundle_file, load_config, merge_configs
from monai_trt.bundle.zoo.expressions import parse_expr, root_ref
from monai_trt.bundle.zoo.loaders import Loader, find_checkpoint_loaders, zoo_engine_uses
from monai_trt.errors import PatchError
from monai_trt.patch.spec import parse_patch


def accepted_build_args(method: str) -> set[str]:
    """The `build_args` keys `method` takes (for `auto`: those any method takes)."""
    from monai_trt.backends import BACKENDS

    if method == "auto":
        return set().union(*(cls.default_build_args for cls in BACKENDS.values()))
    return set(BACKENDS[method].default_build_args)


def apply_calls(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(network id, patch section id) of each `monai_trt.apply(@a, @b, ...)` the run executes."""
    found = []
    for root in ROOT_IDS:
        items = config.get(root)
        for item in items if isinstance(items, list) else [items]:
            expr = parse_expr(item)
            if expr is None:
                continue
            for node in ast.walk(expr.tree):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "apply"
                        and "monai_trt" in ast.unparse(node.func.value) and len(node.args) >= 2):
                    network, section = root_ref(node.args[0], expr), root_ref(node.args[1], expr)
                    if network and section:
                        found.append((network, section))
    return found


def _static_entries(entries: Any) -> Any:
    """Entries with every `$` expression value removed (they are checked once resolved, or at run time)."""
    if not isinstance(entries, list):
        return entries
    return [{k: v for k, v in e.items() if not (isinstance(v, str) and v.startswith(("$", "@")))}
            if isinstance(e, Mapping) else e for e in entries]


def _validate_section(merged: Mapping[str, Any], section: str, root: Path, notes: list[str]) -> None:
    """Validate one section with monai_trt's spec parser and the backends' build_args rules."""
    from monai.bundle import ConfigParser

    from monai_trt.backends import get_backend, merge_build_args

    try:
        parse_patch(_static_entries(merged.get(section)))
    except PatchError as err:
        raise ConversionError(f"'{section}' is not a valid trt_patch: {err}") from err
    try:
        parser = ConfigParser(copy.deepcopy(dict(merged)))
        parser["bundle_root"] = str(root)
        resolved = parser.get_parsed_content(section)
    except Exception as err:  # any config error: report it, the run will check again
        notes.append(f"'{section}': expressions not resolvable without running the bundle ({type(err).__name__}: "
                     f"{err}); monai_trt.apply checks them at run time")
        return
    try:
        for entry in parse_patch(resolved):
            if entry.method == "auto":
                unknown = sorted(set(entry.build_args) - accepted_build_args("auto"))
                if unknown:
                    raise PatchError(f"build_args {unknown} are not accepted by any method")
                continue
            backend = get_backend(entry.method)
            merge_build_args(backend, entry.build_args, strict=True)
            if entry.precision not in backend.precisions:
                raise PatchError(f"method '{entry.method}' does not support precision '{entry.precision}'")
    except PatchError as err:
        raise ConversionError(f"'{section}' is not a valid trt_patch: {err}") from err


def check_merge(inference: Mapping[str, Any], patch: Mapping[str, Any], what: str, root: Path,
                notes: list[str]) -> dict[str, list[Loader]]:
    """Refuse a patch that, merged over the bundle's inference config, patches a network without loading its
    checkpoint, keeps a zoo engine or holds an invalid `trt_patch` section.

    Args:
        inference: the bundle's raw inference config.
        patch: the raw patch.
        what: how messages name the patch.
        root: the bundle directory (to resolve the sections' expressions).
        notes: where to add a note for a section that cannot be resolved without running the bundle.

    Returns:
        network id -> the loaders that load it in the merged config.

    Raises:
        ConversionError: with what is wrong.
    """
    plain, merged = merge_configs(inference), merge_configs(inference, patch)
    calls = apply_calls(merged)
    if not calls:
        raise ConversionError(f"{what}: no monai_trt.apply(@network, @trt_patch, ...) in initialize/run")
    leftovers = zoo_engine_uses(merged)
    if leftovers:
        raise ConversionError(f"{what}: the merged config still uses the zoo's engine: {leftovers}; the network "
                              "must be the bundle's own (drop the network_def/network override)")
    loaders: dict[str, list[Loader]] = {}
    for network, section in calls:
        if section not in merged:
            raise ConversionError(f"{what}: monai_trt.apply names @{section}, which the config does not define")
        kept = find_checkpoint_loaders(merged, network)
        lost = [b for b in find_checkpoint_loaders(plain, network) if b not in kept]
        if lost:
            raise ConversionError(
                f"{what} drops checkpoint loading of @{network} that the plain run has: "
                + "; ".join(b.describe() for b in lost)
                + ". The network would run on random weights (e.g. a zoo 'initialize' or 'handlers#0#_disabled_' "
                "override was carried over); remove those overrides"
            )
        if not kept:
            raise ConversionError(
                f"{what}: nothing loads a checkpoint into @{network}: no CheckpointLoader (handler or called from "
                "initialize) and no load_state_dict reached from initialize/run loads it or a .to(...) alias of it. "
                "The zoo's TensorRT engine carried its own weights; this patch would run the network on random "
                "weights. Add the bundle's checkpoint loading to its inference config, then convert again"
            )
        loaders[network] = kept
    for _, section in calls:
        _validate_section(merged, section, root, notes)
    return loaders


def check_patch(bundle_root: str | Path, patch: str | Path | Mapping[str, Any],
                inference_file: str | Path | None = None) -> dict[str, list[Loader]]:
    """Check a monai_trt patch file against a bundle: the weights it patches are still loaded from the checkpoint.

    Merges the bundle's inference config with `patch` as `monai.bundle run` does and raises when a network given to
    `monai_trt.apply` is not loaded from a checkpoint, loses a loader the plain run has, or is still the zoo's
    pre-exported engine (`torch.jit.load`, `trt_compile`).

    Args:
        bundle_root: the bundle directory.
        patch: the patch file (path, relative to the bundle root or absolute) or its dict.
        inference_file: the inference config (default `configs/inference.json|yaml`).

    Returns:
        network id -> the checkpoint loaders that load it.

    Raises:
        ConversionError: with what is missing.
    """
    root = Path(bundle_root)
    inference = load_config(find_bundle_file(root, "inference", inference_file))
    if isinstance(patch, Mapping):
        content, what = dict(patch), "the patch"
    else:
        path = find_bundle_file(root, Path(patch).stem, patch)
        content, what = load_config(path), str(path)
    return check_merge(inference, content, what, root, [])
