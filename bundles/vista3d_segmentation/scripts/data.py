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
"""Synthetic CT-like volumes for the vista3d_segmentation bundle (no data is downloaded).

Volume ``i`` is drawn from ``np.random.RandomState(seed + i)`` with ``monai.data.synthetic.create_test_image_3d``
(bright spheres on noise) and mapped to Hounsfield-like units: background about -1000 HU (air), spheres up to
+400 HU. The voxel size written in the affine is 1.5 mm, VISTA3D's working resolution.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence

import nibabel as nib
import numpy as np
from monai.data.synthetic import create_test_image_3d

__all__ = ["ensure_dataset", "datalist"]

SPACING_MM = 1.5


def ensure_dataset(dataset_dir: str, num: int, seed: int, shape: Sequence[int] = (192, 192, 128)) -> None:
    """Write ``{i:03d}_img.nii.gz`` (float32, HU-like) for ``i < num`` into `dataset_dir`, skipping existing files."""
    os.makedirs(dataset_dir, exist_ok=True)
    affine = np.diag([SPACING_MM, SPACING_MM, SPACING_MM, 1.0])
    height, width, depth = (int(s) for s in shape)
    for i in range(num):
        path = os.path.join(dataset_dir, f"{i:03d}_img.nii.gz")
        if os.path.exists(path):
            continue
        img, _ = create_test_image_3d(
            height, width, depth, num_objs=10, rad_max=max(8, min(height, width, depth) // 6), noise_max=0.2,
            num_seg_classes=1, channel_dim=None, random_state=np.random.RandomState(seed + i),
        )
        hounsfield = -1000.0 + 1400.0 * img
        nib.save(nib.Nifti1Image(hounsfield.astype(np.float32), affine), path)


def datalist(
    dataset_dir: str,
    label_prompt: Sequence[int] | None = None,
    points: Sequence[Sequence[float]] | None = None,
    point_labels: Sequence[int] | None = None,
) -> list[dict]:
    """One item per ``*_img.nii.gz`` in `dataset_dir`, carrying the prompts that are given.

    Args:
        label_prompt: class ids to segment (VISTA3D's global label index), e.g. ``[1, 3, 5]``; None or empty for
            point-only prompts.
        points: click coordinates ``[[x, y, z], ...]`` in voxels of the image, for one object.
        point_labels: one label per point: 1 positive, 0 negative (2/3 for VISTA3D's special classes).
    """
    prompts = {}
    if label_prompt:
        prompts["label_prompt"] = list(label_prompt)
    if points:
        prompts["points"] = [list(map(float, p)) for p in points]
        prompts["point_labels"] = list(point_labels) if point_labels is not None else [1] * len(points)
    return [{"image": f, **prompts} for f in sorted(glob.glob(os.path.join(dataset_dir, "*_img.nii.gz")))]
