"""Reference releases that need no GAN, for the utility/privacy comparison.

- :func:`k_same_pixel` - the k-Same-Pixel baseline (k-Same family): the pixel average of each
  group's real images. k-anonymous by construction, but blurry.
- :func:`group_representatives` - one real member per group (N/k real images): the
  non-private upper reference ("(d) N/k real images" of the evaluation protocol).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medveil.anonymize.grouping import group_means
from medveil.errors import MedVeilError

REPRESENTATIVES: tuple[str, ...] = ("closest", "random")


def k_same_pixel(images: np.ndarray, groups: Sequence[np.ndarray]) -> np.ndarray:
    """uint8 (N, H, W, C) real images, index groups -> uint8 (G, H, W, C) group averages."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise MedVeilError(f"k-Same-Pixel needs uint8 images (N,H,W,C), got {images.dtype} "
                           f"{images.shape}")
    return group_means(images, groups, dtype=np.uint8)


def group_representatives(
    X: np.ndarray, groups: Sequence[np.ndarray], method: str = "closest", seed: int = 0,
) -> np.ndarray:
    """(G,) row index of one member per group.

    X: (N, ...) features the groups were made on (latents, or images). "closest": the member
    nearest (Euclidean) to its group centroid; "random": a seeded uniform pick.
    """
    if method == "random":
        rng = np.random.default_rng(seed)
        return np.array([int(rng.choice(np.asarray(g))) for g in groups], dtype=np.int64)
    if method != "closest":
        raise MedVeilError(f"unknown representative method {method!r} "
                           f"(choose from {', '.join(REPRESENTATIVES)})")
    X = np.asarray(X)
    centroids = group_means(X, groups)
    picks = []
    for g, idx in enumerate(groups):
        idx = np.asarray(idx)
        diff = X[idx].reshape(len(idx), -1).astype(np.float64) - centroids[g].reshape(1, -1)
        picks.append(int(idx[np.argmin(np.einsum("nd,nd->n", diff, diff))]))
    return np.array(picks, dtype=np.int64)
