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
"""Synthetic data for the spheres_segmentation bundle.

Every volume is generated with ``monai.data.synthetic.create_test_image_3d``: bright spheres
(intensity 0.5..1) on uniform background noise, with a binary sphere/background label.
Volume ``i`` of a set is drawn from ``np.random.RandomState(seed + i)``, so a set is fully
determined by ``(num, seed, size)``; the bundle uses seed 0 for training, 500 for validation
and 1000 for the inference test set.
"""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
from monai.data.synthetic import create_test_image_3d

__all__ = ["NUM_OBJS", "RAD_MAX", "NOISE_MAX", "ensure_dataset"]

NUM_OBJS = 8
RAD_MAX = 16
NOISE_MAX = 0.5


def ensure_dataset(dataset_dir: str, num: int, seed: int, size: int = 96) -> None:
    """Write ``num`` image/label NIfTI pairs into ``dataset_dir`` unless they already exist.

    Files are named ``{i:03d}_img.nii.gz`` (float32 image in [0, 1], shape ``(size, size, size)``)
    and ``{i:03d}_seg.nii.gz`` (uint8 label, 0 = background, 1 = sphere), both with an identity affine. Files are
    written atomically, so concurrent processes (one per rank) may call this on the same directory.
    """
    os.makedirs(dataset_dir, exist_ok=True)
    affine = np.eye(4)
    for i in range(num):
        img_path = os.path.join(dataset_dir, f"{i:03d}_img.nii.gz")
        seg_path = os.path.join(dataset_dir, f"{i:03d}_seg.nii.gz")
        if os.path.exists(img_path) and os.path.exists(seg_path):
            continue
        img, seg = create_test_image_3d(
            size,
            size,
            size,
            num_objs=NUM_OBJS,
            rad_max=RAD_MAX,
            noise_max=NOISE_MAX,
            num_seg_classes=1,
            channel_dim=None,
            random_state=np.random.RandomState(seed + i),
        )
        if not os.path.exists(img_path):
            _save_atomic(nib.Nifti1Image(img.astype(np.float32), affine), img_path)
        if not os.path.exists(seg_path):
            _save_atomic(nib.Nifti1Image(seg.astype(np.uint8), affine), seg_path)


def _save_atomic(image: nib.Nifti1Image, path: str) -> None:
    """Write beside `path` under a hidden per-process name, then rename: processes of a multi-GPU run that generate
    the same volume at once never read a half-written file."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{os.getpid()}.{name}")
    nib.save(image, tmp)
    os.replace(tmp, path)
