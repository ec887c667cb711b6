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
"""Synthetic abdomen-like CT volumes with BTCV-style organ labels, for the swin_unetr_btcv_segmentation bundle.

Each volume is an elliptic body (fat rim, soft tissue) in air with a spine and a few organ-shaped ellipsoids,
in Hounsfield units plus Gaussian noise, stored as int16 NIfTI with an LPS affine (as DICOM converters write it),
so that ``Orientationd(axcodes="RAS")`` and ``Spacingd`` in the bundle have real work to do. Labels use the BTCV
class numbers (1 spleen, 2 right kidney, 3 left kidney, 4 gallbladder, 6 liver, 7 stomach, 8 aorta,
9 inferior vena cava, 11 pancreas); classes 5, 10, 12 and 13 do not occur. Volume ``i`` is drawn from
``np.random.RandomState(seed + i)``, so a set is fully determined by ``(num, seed, size, spacing)``.

These are not CT images of anyone and the shapes are only roughly anatomical: they give the network inputs with
CT-like intensity statistics and a label map to compute a Dice score against.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import nibabel as nib
import numpy as np

__all__ = ["ORGANS", "ensure_dataset", "make_volume"]

# (label, name, HU, centre, radii): centre and radii are fractions of the body's semi-axes (lateral, AP) and of
# half the field of view in z; +x is the patient's right, +y anterior, +z superior. Later organs overwrite earlier.
ORGANS = (
    (6, "liver", 60, (0.45, 0.10, 0.30), (0.45, 0.55, 0.45)),
    (7, "stomach", 25, (-0.30, 0.30, 0.35), (0.25, 0.20, 0.25)),
    (1, "spleen", 50, (-0.60, -0.20, 0.35), (0.18, 0.25, 0.25)),
    (2, "right kidney", 35, (0.40, -0.45, -0.10), (0.14, 0.18, 0.30)),
    (3, "left kidney", 35, (-0.40, -0.45, -0.10), (0.14, 0.18, 0.30)),
    (4, "gallbladder", 10, (0.35, 0.35, 0.00), (0.08, 0.10, 0.12)),
    (11, "pancreas", 45, (-0.05, 0.00, -0.05), (0.30, 0.07, 0.10)),
    (8, "aorta", 180, (-0.05, -0.30, 0.00), (0.06, 0.08, 1.50)),
    (9, "inferior vena cava", 140, (0.12, -0.28, 0.00), (0.06, 0.08, 1.50)),
)
AIR, FAT, SOFT_TISSUE, BONE = -1000, -100, 40, 500
NOISE_HU = 12.0


def _ellipsoid(axes: Sequence[np.ndarray], centre: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    """Boolean mask of an axis-aligned ellipsoid on the broadcastable coordinate `axes`."""
    return sum(((a - c) / r) ** 2 for a, c, r in zip(axes, centre, radii)) <= 1.0


def make_volume(
    rng: np.random.RandomState, size: Sequence[int], spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic CT volume.

    Args:
        rng: random source (body size, organ jitter, HU offsets, noise).
        size: voxels along the array axes (i, j, k).
        spacing: voxel size in mm along (i, j, k).

    Returns:
        (image int16 in HU, label uint8, 4x4 LPS affine); array axis i runs right→left, j anterior→posterior,
        k inferior→superior.
    """
    nx, ny, nz = (int(s) for s in size)
    sx, sy, sz = (float(s) for s in spacing)
    # patient (RAS) coordinates in mm of every voxel centre, centred on the volume; broadcastable over (i, j, k)
    x = (-(np.arange(nx) - (nx - 1) / 2) * sx)[:, None, None]
    y = (-(np.arange(ny) - (ny - 1) / 2) * sy)[None, :, None]
    z = ((np.arange(nz) - (nz - 1) / 2) * sz)[None, None, :]
    half_z = max(nz * sz / 2, sz)
    body_a = 0.42 * nx * sx * rng.uniform(0.9, 1.0)  # lateral semi-axis (mm)
    body_b = 0.30 * ny * sy * rng.uniform(0.9, 1.0)  # antero-posterior semi-axis (mm)

    image = np.full((nx, ny, nz), AIR, dtype=np.float32)
    label = np.zeros((nx, ny, nz), dtype=np.uint8)
    body = np.broadcast_to(_ellipsoid((x, y), (0.0, 0.0), (body_a, body_b)), image.shape)
    inner = np.broadcast_to(_ellipsoid((x, y), (0.0, 0.0), (body_a * 0.92, body_b * 0.9)), image.shape)
    image[body] = FAT
    image[inner] = SOFT_TISSUE

    def place(centre, radii):
        c = (centre[0] * body_a, centre[1] * body_b, centre[2] * half_z)
        r = (radii[0] * body_a, radii[1] * body_b, radii[2] * half_z)
        return _ellipsoid((x, y, z), c, r) & inner

    image[place((0.0, -0.75, 0.0), (0.12, 0.14, 1.5))] = BONE  # spine: bright, but background in the labels
    for value, _name, hu, centre, radii in ORGANS:
        centre = tuple(c + rng.uniform(-0.05, 0.05) for c in centre)
        radii = tuple(r * rng.uniform(0.85, 1.15) for r in radii)
        mask = place(centre, radii)
        image[mask] = hu + rng.uniform(-10, 10)
        label[mask] = value
    image += rng.normal(0.0, NOISE_HU, size=image.shape).astype(np.float32)
    affine = np.diag([-sx, -sy, sz, 1.0])
    affine[:3, 3] = [(nx - 1) / 2 * sx, (ny - 1) / 2 * sy, -(nz - 1) / 2 * sz]
    return np.clip(np.rint(image), -1024, 3071).astype(np.int16), label, affine


def ensure_dataset(
    dataset_dir: str, num: int, seed: int = 0, size: Sequence[int] = (256, 256, 96),
    spacing: Sequence[float] = (1.2, 1.2, 2.5),
) -> None:
    """Write ``num`` volumes into ``dataset_dir`` in BTCV layout unless they already exist.

    Files: ``imagesTs/img{i:04d}.nii.gz`` (int16 HU) and ``labelsTs/label{i:04d}.nii.gz`` (uint8 BTCV labels),
    for ``i`` in ``1..num``. Existing files are kept, so delete the directory after changing `size` or `spacing`.
    """
    images, labels = os.path.join(dataset_dir, "imagesTs"), os.path.join(dataset_dir, "labelsTs")
    os.makedirs(images, exist_ok=True)
    os.makedirs(labels, exist_ok=True)
    for i in range(1, num + 1):
        img_path, seg_path = os.path.join(images, f"img{i:04d}.nii.gz"), os.path.join(labels, f"label{i:04d}.nii.gz")
        if os.path.exists(img_path) and os.path.exists(seg_path):
            continue
        image, label, affine = make_volume(np.random.RandomState(seed + i), size, spacing)
        for array, path in ((image, img_path), (label, seg_path)):
            tmp = path + f".{os.getpid()}.tmp.nii.gz"
            nib.save(nib.Nifti1Image(array, affine), tmp)
            os.replace(tmp, path)
