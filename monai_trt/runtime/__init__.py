"""In the user's process: find and wrap submodules (hook), serve each call (wrapper), run the engine life cycle."""

from __future__ import annotations

from torch import nn

from monai_trt.runtime.hook import apply, remove, wrappers

__all__ = ["apply", "remove", "wrappers", "refresh"]


def refresh(network: nn.Module) -> nn.Module:
    """Re-fingerprint and re-hash every wrapped submodule of `network` on its next call. Returns `network`.

    The per-call check sees structure, attribute, hook and in-place weight changes and most writes that bypass the
    version counter (README "What is detected"); call this after a change it cannot see — a single weight element
    edited through `.data` or a numpy view, code monkeypatched at run time, an object held in an attribute mutated
    in place. Engines whose key no longer matches are then dropped (or refitted, with `refit: refit`).

    Args:
        network: a network passed to :func:`apply` (or any module containing wrapped submodules).
    """
    for wrapper in wrappers(network).values():
        wrapper.engine_set.refresh()
    return network
