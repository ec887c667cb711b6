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
"""Prompted VISTA3D inference: class prompts through a sliding window, point prompts through point-centred windows.

The prompts come from the data item (``label_prompt``, ``points``, ``point_labels``) via :class:`PromptBatch`, and
are passed to ``VISTA3D.forward`` as ``class_vector`` (int64, ``[K, 1]``), ``point_coords`` (float32,
``[1, N, 3]``, one object) and ``point_labels`` (int64, ``[1, N]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.apps.vista3d.inferer import point_based_window_inferer
from monai.engines.utils import PrepareBatch, default_prepare_batch
from monai.inferers import Inferer, sliding_window_inference

__all__ = ["PromptBatch", "Vista3dInferer"]

PROMPT_KEYS = ("label_prompt", "points", "point_labels")


class PromptBatch(PrepareBatch):
    """Evaluator `prepare_batch`: the image (no label), plus whichever prompts the batch carries as keyword args."""

    def __call__(
        self, batchdata: dict[str, Any], device: str | torch.device | None = None, non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None, tuple, dict[str, torch.Tensor]]:
        image, _ = default_prepare_batch({"image": batchdata["image"]}, device, non_blocking, **kwargs)
        prompts = {k: batchdata[k].to(device) for k in PROMPT_KEYS if batchdata.get(k) is not None}
        return image, None, (), prompts


class Vista3dInferer(Inferer):
    """VISTA3D inference for one image (batch of 1) with class and/or point prompts.

    Args:
        roi_size: window size (each dim divisible by 16 for VISTA3D's encoder).
        overlap: sliding-window overlap (class prompts).
        sw_batch_size: windows per network call; must be 1 when points are given.
        mode: sliding-window blending, ``gaussian`` or ``constant``.
        use_point_window: with points, run only windows centred on the points (VISTA3D's point inferer) instead of
            the whole-image sliding window.
    """

    def __init__(
        self, roi_size: Sequence[int], overlap: float = 0.25, sw_batch_size: int = 1, mode: str = "gaussian",
        use_point_window: bool = True,
    ) -> None:
        super().__init__()
        self.roi_size = list(roi_size)
        self.overlap = overlap
        self.sw_batch_size = sw_batch_size
        self.mode = mode
        self.use_point_window = use_point_window

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: torch.nn.Module,
        label_prompt: torch.Tensor | None = None,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[1, K, H, W, D]`` (one channel per class prompt, or one for the clicked object)."""
        if inputs.shape[0] != 1:
            raise ValueError(f"Vista3dInferer takes one image at a time, got a batch of {inputs.shape[0]}")
        class_vector = label_prompt.reshape(-1, 1).long() if label_prompt is not None else None
        point_coords = points.reshape(1, -1, 3).float() if points is not None else None
        labels = point_labels.reshape(1, -1).long() if point_labels is not None else None
        if point_coords is not None and labels is None:
            labels = torch.ones(point_coords.shape[:2], dtype=torch.long, device=point_coords.device)
        prompt_class = class_vector if point_coords is not None else None
        if point_coords is not None and self.use_point_window:
            return point_based_window_inferer(
                inputs, self.roi_size, network, point_coords, labels, class_vector=class_vector,
                prompt_class=prompt_class, transpose=True,
            )
        return sliding_window_inference(
            inputs, self.roi_size, 1 if point_coords is not None else self.sw_batch_size, network, self.overlap,
            mode=self.mode, with_coord=True, transpose=True, class_vector=class_vector, point_coords=point_coords,
            point_labels=labels, prompt_class=prompt_class,
        )
