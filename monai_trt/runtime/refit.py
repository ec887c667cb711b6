"""Weights for engines built without them (`refit: identical | refit`).

An engine built with refit other than none holds no weights in its artifacts: after loading, and whenever the
module's weights change, the wrapper hands it the module's current weights, named and cast exactly as in the
exported graph. The wrapper runs an engine only while the weights fingerprint it was last refitted with equals
the module's current one (see :class:`monai_trt.runtime.wrapper.LoadedEngine`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from monai_trt.export.graph import FlatForward, precision_module

__all__ = ["REFIT_EXPORT_ARGS", "engine_weights", "graph_weights", "is_refittable"]

# The ONNX exporter's optimizer folds weights into new, unnamed constants (e.g. batch norm into "view"); a graph
# whose weights are to be swapped must keep every weight as its own named initializer.
REFIT_EXPORT_ARGS: dict[str, Any] = {"optimize": False}


def is_refittable(engine: Any) -> bool:
    return callable(getattr(engine, "refit", None))


def graph_weights(graph: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the graph adapter (tied and non-persistent ones too), by exported name."""
    named = dict(graph.named_parameters(remove_duplicate=False))
    named.update(graph.named_buffers(remove_duplicate=False))
    return {name: tensor.detach() for name, tensor in named.items()}


def engine_weights(
    module: nn.Module, forward: Callable[..., Any], graph_precision: str
) -> dict[str, torch.Tensor]:
    """The module's parameters and buffers as the exported graph names them, in the graph's precision.

    Args:
        module: the wrapped module (its current weights).
        forward: its original forward.
        graph_precision: the precision the backend's graph carries (fp16/bf16 graphs hold cast weights).
    """
    clone, clone_forward = precision_module(module, forward, graph_precision)
    return graph_weights(FlatForward(clone, clone_forward))
