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
"""Latent diffusion sampling for the diffusion_generation bundle: a scheduler loop in latent space, then decoding.

The diffusion UNet is called as ``network(x=latents, timesteps=t, context=context)`` with float latents
``[N, C, *latent_size]``, int64 timesteps ``[N]`` and a float cross-attention context ``[N, 1, context_dim]``;
the autoencoder decodes ``latents / scale_factor`` back to images. All noise comes from generators seeded with
`seed`, so a run is reproducible.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import nibabel as nib
import numpy as np
import torch
from monai.networks.schedulers import Scheduler

__all__ = ["LatentDiffusionSampler", "save_images"]


class LatentDiffusionSampler:
    """Draws `num_samples` images from a latent diffusion model.

    Args:
        scheduler: a MONAI scheduler (DDPM, DDIM, ...); `set_timesteps(num_inference_steps)` is called per run.
        num_inference_steps: denoising steps.
        latent_shape: ``[C, *spatial]`` of one latent.
        context_dim: size of the conditioning vector (the UNet's ``cross_attention_dim``).
        scale_factor: the latent scaling used in training (latents are divided by it before decoding).
        seed: seeds the initial noise, the conditioning vectors and any scheduler noise.
    """

    def __init__(
        self, scheduler: Scheduler, num_inference_steps: int, latent_shape: Sequence[int], context_dim: int,
        scale_factor: float = 1.0, seed: int = 0,
    ) -> None:
        self.scheduler = scheduler
        self.num_inference_steps = int(num_inference_steps)
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.context_dim = int(context_dim)
        self.scale_factor = float(scale_factor)
        self.seed = int(seed)

    @torch.no_grad()
    def __call__(
        self, network: torch.nn.Module, autoencoder: torch.nn.Module, num_samples: int,
        device: str | torch.device = "cpu",
    ) -> torch.Tensor:
        """Images ``[num_samples, channels, *image_size]``."""
        generator = torch.Generator().manual_seed(self.seed)
        latents = torch.randn((num_samples, *self.latent_shape), generator=generator).to(device)
        context = torch.randn((num_samples, 1, self.context_dim), generator=generator).to(device)
        self.scheduler.set_timesteps(self.num_inference_steps, device=device)
        for t in self.scheduler.timesteps:
            timesteps = torch.full((num_samples,), int(t), dtype=torch.long, device=device)
            noise_pred = network(x=latents, timesteps=timesteps, context=context)
            latents, _ = self.scheduler.step(noise_pred, int(t), latents, generator=generator)
        return autoencoder.decode_stage_2_outputs(latents / self.scale_factor)


def save_images(images: torch.Tensor, output_dir: str, postfix: str = "sample") -> list[str]:
    """Write each image ``[C, *spatial]`` of the batch as ``{i:03d}_{postfix}.nii.gz`` (float32, channels last,
    identity affine). Returns the paths."""
    os.makedirs(output_dir, exist_ok=True)
    paths = []
    for i, image in enumerate(images.detach().float().cpu().numpy()):
        array = np.moveaxis(image, 0, -1)
        if array.shape[-1] == 1:
            array = array[..., 0]
        path = os.path.join(output_dir, f"{i:03d}_{postfix}.nii.gz")
        nib.save(nib.Nifti1Image(array.astype(np.float32), np.eye(4)), path)
        paths.append(path)
    return paths
