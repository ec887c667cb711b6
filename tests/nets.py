"""Small networks for tests: fast to export, covering the I/O shapes real bundles have."""

from __future__ import annotations

import torch
from torch import nn


class TinySeg(nn.Module):
    """3D conv + instance norm segmentation head (like the first block of a MONAI UNet)."""

    def __init__(self, in_ch: int = 1, out_ch: int = 2) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(in_ch, 4, 3, padding=1), nn.InstanceNorm3d(4, affine=True), nn.ReLU())
        self.head = nn.Conv3d(4, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class MultiIO(nn.Module):
    """Float image + int64 labels + an optional keyword tensor; returns a tuple and a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.embed = nn.Embedding(10, 3)

    def forward(self, image: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor | None = None, mode: str = "sum"):
        feat = self.conv(image)
        emb = self.embed(labels)[:, :, None, None]
        if scale is not None:
            feat = feat * scale
        combined = feat + emb if mode == "sum" else feat - emb
        return combined, {"pooled": combined.mean(dim=(2, 3)), "argmax": combined.argmax(dim=1)}


class DataDependent(nn.Module):
    """Python control flow on tensor values: not exportable, so the engine must fall back to PyTorch."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.sum()) > 0:
            return self.lin(x)
        return self.lin(-x)


class Composite(nn.Module):
    """A network with named children, for submodule paths."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU())
        self.decoder = nn.ModuleDict({"head": nn.Conv3d(4, 2, 1)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder["head"](self.encoder(x))


class Seg2D(nn.Module):
    """A 2D segmentation head (as 2D model-zoo bundles run with SimpleInferer)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Dropped(nn.Module):
    """A conv with dropout: behaves differently in training mode."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3, padding=1)
        self.drop = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.conv(x))


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3, padding=1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class Bypassing(nn.Module):
    """Calls a method of its child other than forward, so a patch of `block` never sees a call."""

    def __init__(self) -> None:
        super().__init__()
        self.block = _Block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block.features(x)
def squash(x: torch.Tensor) -> torch.Tensor:
    """A module-level helper that a forward calls (its code is part of the cache key)."""
    return torch.tanh(x)


class ActBase(nn.Module):
    """A base class whose method the subclass's forward uses (its code is part of the cache key too)."""

    def act(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)


class FlagSeg(ActBase):
    """Like TinySeg, plus what real MONAI networks have beyond weights: a plain attribute that changes forward
    (as SwinUNETR's `normalize`), a non-persistent buffer, a base-class method and a module-level helper."""

    def __init__(self, normalize: bool = False, gain: float = 1.0) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.InstanceNorm3d(4, affine=True))
        self.head = nn.Conv3d(4, 2, 1)
        self.normalize = normalize
        self.register_buffer("gain", torch.full((4,), gain), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.act(self.body(x)) * self.gain.view(1, -1, 1, 1, 1)
        if self.normalize:
            features = features / (features.abs().amax(dim=1, keepdim=True) + 1.0)
        return self.head(squash(features))


class WideSeg(nn.Module):
    """A middle convolution with more weights (82944) than the per-call check compares byte for byte."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv3d(1, 48, 1)
        self.mid = nn.Conv3d(48, 64, 3, padding=1)
        self.head = nn.Conv3d(64, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mid(torch.relu(self.stem(x)))))
