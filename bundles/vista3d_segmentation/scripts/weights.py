# Copyright (c) MONAI Consortium
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Random, reproducible stand-in weights (this bundle ships no trained checkpoint).

Every floating-point tensor of the network's state_dict is drawn from one generator seeded with `seed`, in sorted
name order, so the file depends only on (architecture, seed) — not on how or when the network object was built:
weights of rank >= 2 ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)); normalisation scales ~ 1 + U(-0.1, 0.1); other rank-1
tensors (biases) ~ U(-0.1, 0.1); running means 0 and running variances 1. No tensor is left at zero, so layers that
the architecture zero-initialises still contribute.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import torch
from torch import nn

__all__ = ["random_state_dict", "ensure_random_weights"]

logger = logging.getLogger(__name__)
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def random_state_dict(network: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A state_dict for `network` filled as described in the module docstring."""
    owners = {name: module for name, module in network.named_modules()}
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in sorted(network.state_dict().items()):
        tensor = tensor.detach().to("cpu", copy=True)
        if tensor.is_floating_point():
            owner = owners.get(name.rpartition(".")[0])
            leaf = name.rpartition(".")[2]
            if leaf == "running_mean":
                tensor.zero_()
            elif leaf == "running_var":
                tensor.fill_(1.0)
            elif tensor.dim() >= 2:
                bound = (tensor[0].numel()) ** -0.5
                tensor.copy_((torch.rand(tensor.shape, generator=generator) * 2 - 1) * bound)
            elif tensor.dim() == 1:
                noise = (torch.rand(tensor.shape, generator=generator) * 2 - 1) * 0.1
                scale = leaf == "weight" and isinstance(owner, _NORMS)
                tensor.copy_(noise + 1.0 if scale else noise)
        state[name] = tensor
    return state


def _layout_digest(network: nn.Module) -> str:
    layout = [(n, list(t.shape), str(t.dtype)) for n, t in sorted(network.state_dict().items())]
    return hashlib.sha256(json.dumps(layout).encode()).hexdigest()


def ensure_random_weights(path: str, network: nn.Module, seed: int = 0) -> str:
    """Write random weights for `network` to `path` unless a file made for the same architecture and seed is there.

    `path + '.json'` records that the weights are random (seed, network class, parameter count, state_dict layout);
    a checkpoint whose record does not match is regenerated. Returns `path`.
    """
    record = {
        "weights": "random, not trained",
        "seed": seed,
        "network": f"{type(network).__module__}.{type(network).__qualname__}",
        "num_parameters": sum(p.numel() for p in network.parameters()),
        "layout_sha256": _layout_digest(network),
    }
    sidecar = f"{path}.json"
    if os.path.exists(path) and os.path.exists(sidecar):
        with open(sidecar) as f:
            if json.load(f) == record:
                return path
    logger.info("writing random weights (seed %d, %d parameters) to %s", seed, record["num_parameters"], path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(random_state_dict(network, seed), tmp)
    os.replace(tmp, path)
    with open(f"{sidecar}.tmp{os.getpid()}", "w") as f:
        json.dump(record, f, indent=2)
    os.replace(f"{sidecar}.tmp{os.getpid()}", sidecar)
    return path
