"""Find the submodules a patch names and wrap them in place (forward redirected, state_dict untouched)."""

from __future__ import annotations

import difflib
import logging
from typing import Any

import torch
from torch import nn

from monai_trt.backends import BACKENDS, get_backend, merge_build_args
from monai_trt.errors import BackendUnavailable, PatchError
from monai_trt.patch.spec import PatchEntry, parse_patch, parse_switch
from monai_trt.runtime.wrapper import EngineWrapper

__all__ = ["apply", "remove", "wrappers", "module_device"]

logger = logging.getLogger(__name__)


def wrappers(network: nn.Module) -> dict[str, EngineWrapper]:
    """The monai_trt wrappers installed in `network`, by dotted submodule path ("" = the network itself)."""
    found = {}
    for name, module in network.named_modules():
        forward = module.__dict__.get("forward")
        if isinstance(forward, EngineWrapper):
            found[name] = forward
    return found


def remove(network: nn.Module) -> nn.Module:
    """Undo :func:`apply`: restore every wrapped submodule's forward. Returns `network`."""
    for name, wrapper in wrappers(network).items():
        module = network.get_submodule(name)
        if wrapper.previous_forward is None:
            del module.__dict__["forward"]
        else:
            module.__dict__["forward"] = wrapper.previous_forward
    return network


def apply(network: nn.Module, patch: Any, enabled: Any = True) -> nn.Module:
    """Wrap the submodules of `network` named by `patch` so they run through engines. Returns `network`.

    Engines are built lazily, on each submodule's first real call, and cached on disk. Applying the same patch
    again does nothing; applying another patch replaces the earlier wrapping; `enabled` false (or env
    MONAI_TRT=0) removes any wrapping and leaves plain PyTorch.

    Args:
        network: the bundle's network (usually `@network`).
        patch: the `trt_patch` section: a list of entries, or one entry dict.
        enabled: the `trt` switch: bool or true/false/1/0/on/off; env MONAI_TRT overrides it.

    Raises:
        PatchError: invalid patch, switch, submodule path, build_args or precision (before any work).
        BackendUnavailable: an explicitly requested method cannot run here and the entry has `fallback: false`.
    """
    entries = parse_patch(patch)
    on = parse_switch(enabled)
    if not isinstance(network, nn.Module):
        raise PatchError(f"monai_trt.apply needs a torch.nn.Module, got {type(network).__name__}")
    if not on:
        if wrappers(network):
            logger.info("monai_trt is switched off: removing engine wrappers")
        remove(network)
        logger.info("monai_trt is off (trt=false or MONAI_TRT=0): the network runs in PyTorch")
        return network
    current = wrappers(network)
    if current and {name: w.spec for name, w in current.items()} == {e.submodule: e for e in entries}:
        return network
    targets = [(entry, _find(network, entry.submodule)) for entry in entries]
    unavailable = [_check_entry(entry, module) for entry, module in targets]
    remove(network)
    for (entry, module), reason in zip(targets, unavailable):
        wrapper = EngineWrapper(module, entry)
        module.forward = wrapper
        if reason:
            wrapper.disabled = reason  # warned once, above: PyTorch from the start
        else:
            logger.info("%s will build its engine on first use (cache: %s)", entry.describe(), entry.path)
    return network


def _find(network: nn.Module, path: str) -> nn.Module:
    if not path:
        return network
    try:
        return network.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in network.named_modules() if n]
        near = difflib.get_close_matches(path, names, n=5, cutoff=0.5) or names[:5]
        raise PatchError(
            f"submodule '{path}' not found in {type(network).__name__}; nearest valid names: {near}"
        ) from None


def module_device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def _check_entry(entry: PatchEntry, module: nn.Module) -> str | None:
    """Validate what depends on the backend: build_args keys/types, precision, availability.

    Returns:
        None, or why an explicitly named method cannot run on the module's device (after warning once).
    """
    if entry.method == "auto":
        accepted = set().union(*(cls.default_build_args for cls in BACKENDS.values()))
        unknown = sorted(set(entry.build_args) - accepted)
        if unknown:
            raise PatchError(f"build_args {unknown} are not accepted by any method; accepted keys: {sorted(accepted)}")
        return None
    backend = get_backend(entry.method)
    merge_build_args(backend, entry.build_args, strict=True)
    if entry.refit not in backend.refit_modes:
        refittable = sorted(name for name, cls in BACKENDS.items() if entry.refit in cls.refit_modes)
        raise PatchError(
            f"method '{entry.method}' does not support refit '{entry.refit}'; methods that do: {refittable}")
    if entry.precision not in backend.precisions:
        raise PatchError(f"method '{entry.method}' does not support precision '{entry.precision}'; "
                         f"supported: {list(backend.precisions)}")
    device = module_device(module)
    reason = backend.unavailable_reason(device)
    if reason:
        message = f"{entry.describe()}: method '{entry.method}' is not available on {device}: {reason}"
        if not entry.fallback:
            raise BackendUnavailable(message)
        logger.warning("%s; it will run in PyTorch", message)
        return message
    return None
