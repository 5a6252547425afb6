"""uint8 images -> float tensors (N, C, H, W) in [0, 1] at a requested size and channel count."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from medveil.errors import DataError


def convert_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Float (N, C, H, W) -> (N, channels, H, W): grey -> RGB repeats, RGB -> grey is ITU-R 601 luma."""
    c = x.shape[1]
    if c == channels:
        return x
    if c == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1).contiguous()
    if c == 3 and channels == 1:
        luma = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x * luma).sum(dim=1, keepdim=True)
    raise DataError(f"cannot convert {c}-channel images to {channels} channels")


def to_tensor(images: np.ndarray, size: int | None = None, channels: int | None = None) -> torch.Tensor:
    """Convert uint8 (N, H, W[, C]) to float32 (N, C, H, W) in [0, 1].

    size: resize (bilinear, antialiased) to size x size when given and different.
    channels: 1 or 3. Grey -> RGB repeats the channel; RGB -> grey uses ITU-R 601 luma.
    """
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise DataError(f"expected images (N,H,W[,C]), got shape {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    if channels is not None:
        x = convert_channels(x, channels)
    if size is not None and (x.shape[2] != size or x.shape[3] != size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = x.clamp_(0.0, 1.0)
    return x
