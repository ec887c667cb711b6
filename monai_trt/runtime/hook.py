"""Find the submodules a patch names and wrap them in place (forward redirected, state_dict untouched)."""

from __future__ import annotations

import atexit
import difflib
import logging
from dataclasses import replace
from typing import Any

from torch import nn

from monai_trt.backends import BACKENDS, get_backend, merge_build_args
from monai_trt.errors import BackendUnavailable, PatchError
from monai_trt.patch.spec import PatchEntry, parse_patch, parse_switch
from monai_trt.runtime.devices import module_device, plan_devices
from monai_trt.runtime.planner import PlanningWrapper
from monai_trt.runtime.wrapper import USAGE, EngineWrapper

__all__ = ["apply", "remove", "wrappers", "module_device", "report_unused"]

logger = logging.getLogger(__name__)
_EXIT_REPORT = False


def _installed(network: nn.Module) -> list[tuple[str, nn.Module, EngineWrapper]]:
    """(name, module, wrapper) for each wrapped module, once however many names reach it; the name is the one its
    patch entry used when that reaches it, else the first."""
    found: dict[int, tuple[list[str], nn.Module, EngineWrapper]] = {}
    for name, module in network.named_modules(remove_duplicate=False):
        forward = module.__dict__.get("forward")
        if isinstance(forward, EngineWrapper):
            found.setdefault(id(module), ([], module, forward))[0].append(name)
    return [(w.spec.submodule if w.spec.submodule in names else names[0], m, w) for names, m, w in found.values()]


def wrappers(network: nn.Module) -> dict[str, EngineWrapper]:
    """The monai_trt wrappers installed in `network`, by dotted submodule path ("" = the network itself).

    A module reachable under several names is listed once, under the name its patch entry gave.
    """
    return {name: wrapper for name, _, wrapper in _installed(network)}


def remove(network: nn.Module) -> nn.Module:
    """Undo :func:`apply`: restore the forward of every wrapped module, however many names reach it. Returns
    `network`."""
    for _, module, forward in _installed(network):
        while isinstance(forward, EngineWrapper):  # stacked by an older version: unwind to the user's forward
            forward = forward.unwrap()
        if forward is None:
            del module.__dict__["forward"]
        else:
            module.__dict__["forward"] = forward
    return network


def apply(network: nn.Module, patch: Any, enabled: Any = True, name: str | None = None) -> nn.Module:
    """Wrap the submodules of `network` named by `patch` so they run through engines. Returns `network`.

    Engines are built lazily, on each submodule's first real call, and cached on disk. Applying the same patch
    again does nothing; applying another patch replaces the earlier wrapping; `enabled` false (or env
    MONAI_TRT=0) removes any wrapping and leaves plain PyTorch. Wrappers that never serve a call are reported once
    when the process exits.

    Args:
        network: the bundle's network (usually `@network`).
        patch: the `trt_patch` section: a list of entries, or one entry dict.
        enabled: the `trt` switch: bool or true/false/1/0/on/off; env MONAI_TRT overrides it.
        name: the network's config id (e.g. "network"), named in every message; default: its class name.

    Raises:
        PatchError: invalid patch, switch, name, submodule path (or two paths reaching one module, or one module
            inside another), build_args or precision (before any work).
        BackendUnavailable: an explicitly requested method cannot run here and the entry has `fallback: false`.
    """
    entries = parse_patch(patch)
    on = parse_switch(enabled)
    if not isinstance(network, nn.Module):
        raise PatchError(f"monai_trt.apply needs a torch.nn.Module, got {type(network).__name__}")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise PatchError(f"monai_trt.apply: name must be the network's config id (a non-empty string), got {name!r}")
    network_name = name.strip() if name is not None else type(network).__name__
    if not on:
        if wrappers(network):
            logger.info("monai_trt is switched off: removing engine wrappers from '%s'", network_name)
        remove(network)
        logger.info("monai_trt is off (trt=false or MONAI_TRT=0): '%s' runs in PyTorch", network_name)
        return network
    targets = [(_resolve_precision(entry, module), module)
               for entry, module in ((e, _find(network, e.submodule)) for e in entries)]
    _check_distinct(targets)
    current = {id(m): (w.spec, w.label) for _, m, w in _installed(network) if not getattr(w, "plan_child", False)}
    if current and current == {id(m): (e, e.describe(network_name)) for e, m in targets}:
        return network
    unavailable = [_check_entry(entry, module, network_name) for entry, module in targets]
    remove(network)
    for (entry, module), reason in zip(targets, unavailable):
        # `submodule: auto`: the root of a search (runtime/planner.py), which wraps its descendants as it goes
        wrapper = (PlanningWrapper if entry.search_depth else EngineWrapper)(module, entry, network_name)
        module.forward = wrapper
        if reason:
            wrapper.disabled = reason  # warned once, above: PyTorch from the start
        else:
            logger.info("%s will build its engine on first use (cache: %s)", wrapper.label, entry.path)
    _report_at_exit()
    return network


def report_unused() -> list[str]:
    """Log once (WARNING) the wrappers still installed that never served a call in this process. Returns their labels.

    Runs at process exit after any :func:`apply`; a wrapper that serves no call means the caller never calls the
    patched module's `forward` (it calls another method, or the module's layers directly), so the patch does nothing.
    """
    unused = [u for u in USAGE if u.installed > 0 and not u.served and not u.reported]
    for usage in unused:
        usage.reported = True
    if unused:
        logger.warning(
            "%d monai_trt wrapper(s) never served a call in this process, so their patch had no effect: %s. Nothing "
            "called their forward: patch the submodule the caller actually calls (or check that the network ran)",
            len(unused), "; ".join(u.label for u in unused))
    return [u.label for u in unused]


def _report_at_exit() -> None:
    global _EXIT_REPORT
    if not _EXIT_REPORT:
        _EXIT_REPORT = True
        atexit.register(report_unused)


def _check_distinct(targets: list[tuple[PatchEntry, nn.Module]]) -> None:
    """Paths that reach one module, or a module inside another (however they are named), are a PatchError."""
    for i, (a, module_a) in enumerate(targets):
        inside = {id(m) for m in module_a.modules()}
        for j, (b, module_b) in enumerate(targets):
            if i == j or id(module_b) not in inside:
                continue
            if module_a is module_b:
                raise PatchError(f"trt_patch: submodules '{a.submodule}' and '{b.submodule}' are the same module; "
                                 "name it in one entry")
            raise PatchError(
                f"trt_patch: submodule '{b.submodule}' lies inside '{a.submodule or '<network>'}'; an engine cannot "
                "contain another engine. Patch either the outer module or the inner ones.")


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


def _resolve_precision(entry: PatchEntry, module: nn.Module) -> PatchEntry:
    """`precision: auto`: fp16 where the module's weights are on CUDA, fp32 elsewhere (CPUs without fast fp16)."""
    if entry.precision != "auto":
        return entry
    return replace(entry, precision="fp16" if module_device(module).type == "cuda" else "fp32")


def _check_entry(entry: PatchEntry, module: nn.Module, network: str) -> str | None:
    """Validate what depends on the backend: build_args keys/types, precision, availability.

    Returns:
        None, or why an explicitly named method cannot run on the module's device (after warning once).
    """
    plan_devices(entry, entry.describe(network))  # absent GPUs in `devices`: a warning (fallback false: raises)
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
        message = f"{entry.describe(network)}: method '{entry.method}' is not available on {device}: {reason}"
        if not entry.fallback:
            raise BackendUnavailable(message)
        logger.warning("%s; it will run in PyTorch", message)
        return message
    return None
