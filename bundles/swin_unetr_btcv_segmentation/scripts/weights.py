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
"""Random but reproducible weights for the swin_unetr_btcv_segmentation bundle.

The bundle ships no checkpoint. On first use ``ensure_random_checkpoint`` writes ``models/model.pt`` (a plain
``state_dict``) whose every value follows from the network's state_dict layout and a seed, not from the order in
which the process happened to draw random numbers; the bundle's ``CheckpointLoader`` then loads it as it would load
trained weights. **The weights are not trained: the segmentations are meaningless** — they only exercise the
pipeline and compare engines with PyTorch.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

__all__ = ["ensure_random_checkpoint", "random_state_dict"]


def random_state_dict(network: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state_dict for `network` drawn from `seed`.

    Weight matrices/kernels are uniform in ±1/sqrt(fan_in) (PyTorch's default bound for Linear/Conv), 1-D weights
    (norm scales) are 1, biases 0, other floating parameters (e.g. relative position bias tables) N(0, 0.02²);
    integer buffers (e.g. relative position indices) are kept.
    """
    generator = torch.Generator().manual_seed(int(seed))
    params = {name for name, _ in network.named_parameters()}
    state = {}
    for name, tensor in network.state_dict().items():
        value = tensor.detach().to("cpu").clone()
        leaf = name.rsplit(".", 1)[-1]
        if not value.is_floating_point() or name not in params:
            state[name] = value
        elif leaf == "weight" and value.dim() > 1:
            bound = 1.0 / math.sqrt(value[0].numel())
            state[name] = (torch.rand(value.shape, generator=generator) * 2 - 1).mul_(bound).to(value.dtype)
        elif leaf == "weight":
            state[name] = torch.ones_like(value)
        elif leaf == "bias":
            state[name] = torch.zeros_like(value)
        else:
            state[name] = (torch.randn(value.shape, generator=generator) * 0.02).to(value.dtype)
    return state


def ensure_random_checkpoint(network: nn.Module, path: str, seed: int = 0) -> str:
    """Write ``random_state_dict(network, seed)`` to `path` unless a file is already there. Returns `path`.

    The network itself is not modified. An existing file is never overwritten (delete it to regenerate, e.g. after
    changing ``feature_size``).
    """
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        torch.save(random_state_dict(network, seed), tmp)
        os.replace(tmp, path)
    return path
