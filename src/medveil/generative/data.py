"""Images for GAN training: one split of a dataset as float (N, C, R, R) in [0, 1].

Only the split asked for is read (train on the private split; keep the test split out).
Images whose size differs from the GAN resolution are resized (one warning with the count);
grey images feeding an RGB model (or the reverse) are converted explicitly by ``to_tensor``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from medveil.data import load_dataset, to_tensor
from medveil.errors import DataError


def images_to_gan_tensor(images: np.ndarray, resolution: int, channels: int,
                         where: str = "images") -> torch.Tensor:
    """uint8 (N, H, W[, C]) -> float (N, channels, resolution, resolution) in [0, 1]."""
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[0] == 0:
        raise DataError(f"{where}: expected a non-empty image array (N,H,W[,C]), got {images.shape}")
    n, h, w, c = images.shape
    if (h, w) != (resolution, resolution):
        warnings.warn(f"{where}: resized {n} image(s) from {h}x{w} to {resolution}x{resolution}",
                      stacklevel=2)
    if c != channels:
        warnings.warn(f"{where}: converted {n} image(s) from {c} to {channels} channel(s)",
                      stacklevel=2)
    return to_tensor(images, size=resolution, channels=channels)


def load_gan_images(path: str | Path, split: str, resolution: int, channels: int,
                    limit: int | None = None) -> torch.Tensor:
    """Read one split of the dataset at ``path`` -> (N, channels, R, R) in [0, 1]."""
    ds = load_dataset(path)
    images = ds.split(split).images
    if limit is not None:
        images = images[:limit]
    return images_to_gan_tensor(images, resolution, channels, where=f"{path} [{split}]")
