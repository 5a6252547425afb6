"""Fidelity of a synthetic image set: FID, KID and per-image nearest-real distance, all in the
embedding space of a documented :class:`~medveil.models.features.FeatureNet` (no Inception
weights here). Every result dict carries the feature net's ``describe()``: FID values computed
with different feature nets are not comparable.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from sklearn.neighbors import NearestNeighbors
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from medveil.errors import DataError
from medveil.models.features import FeatureNet


class FeatureModule(nn.Module):
    """A FeatureNet as torchmetrics' ``feature`` module, for streaming use, e.g.
    ``FrechetInceptionDistance(feature=FeatureModule(net), normalize=True)``.
    Accepts images (B, C, H, W) uint8 in [0, 255] (what torchmetrics passes when normalize=False)
    or float in [0, 1] (normalize=True) -> (B, D)."""

    def __init__(self, net: FeatureNet) -> None:
        super().__init__()
        self.net = net
        self.num_features = int(net.dim)  # torchmetrics reads this instead of probing a 299 px image

    @torch.no_grad()
    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        x = imgs.float() / 255.0 if imgs.dtype == torch.uint8 else imgs.float()
        return self.net.embed(x)


class _Precomputed(nn.Module):
    """Identity feature module: lets torchmetrics consume embeddings we computed once."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return emb


def _check(images: torch.Tensor, what: str) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise DataError(f"{what} images must be (N, 1|3, H, W), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return images.float()


def embed_images(net: FeatureNet, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """(N, C, H, W) float in [0, 1] -> (N, D) embeddings, batched, no grad."""
    device = next(net.parameters()).device
    with torch.no_grad():
        return torch.cat([net.embed(b.to(device)).cpu() for b in images.split(batch_size)])


def nearest_real(real_emb: torch.Tensor | np.ndarray, fake_emb: torch.Tensor | np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """For each fake embedding: Euclidean distance to and index of the nearest real one, (M,), (M,)."""
    nn_index = NearestNeighbors(n_neighbors=1).fit(np.asarray(real_emb, dtype=np.float64))
    dist, idx = nn_index.kneighbors(np.asarray(fake_emb, dtype=np.float64))
    return dist[:, 0], idx[:, 0]


def metrics_from_embeddings(real_emb: torch.Tensor, fake_emb: torch.Tensor, *,
                            kid_subset_size: int | None = None, kid_subsets: int = 100,
                            seed: int = 0) -> dict[str, Any]:
    """FID, KID and nearest-real distances from embeddings (N, D) and (M, D)."""
    for what, emb in (("real", real_emb), ("fake", fake_emb)):
        if emb.shape[0] < 2:
            raise DataError(f"{what} set has {emb.shape[0]} image(s); FID/KID need at least 2")
    real_emb, fake_emb = real_emb.double().cpu(), fake_emb.double().cpu()
    dim = real_emb.shape[1]
    subset = min(kid_subset_size or 1000, real_emb.shape[0], fake_emb.shape[0])
    fid = FrechetInceptionDistance(feature=_Precomputed(dim))
    with warnings.catch_warnings():  # "KID keeps all features in memory": we already hold them
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=_Precomputed(dim), subset_size=subset, subsets=kid_subsets)
    for metric in (fid, kid):
        metric.update(real_emb, real=True)
        metric.update(fake_emb, real=False)
    fid_value = float(fid.compute())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    dist, _ = nearest_real(real_emb, fake_emb)
    return {
        "fid": fid_value,
        "kid_mean": float(kid_mean),
        "kid_std": float(kid_std),
        "kid_subset_size": subset,
        "kid_subsets": kid_subsets,
        "n_real": int(real_emb.shape[0]),
        "n_fake": int(fake_emb.shape[0]),
        "nn_real_distance_mean": float(dist.mean()),
        "nn_real_distance_median": float(np.median(dist)),
        "nn_real_distance_min": float(dist.min()),
        "nn_real_distance": dist.tolist(),
    }


def fidelity_metrics(real: torch.Tensor, fake: torch.Tensor, net: FeatureNet, *,
                     kid_subset_size: int | None = None, kid_subsets: int = 100,
                     batch_size: int = 64, seed: int = 0) -> dict[str, Any]:
    """FID, KID (mean, std over random subsets) and nearest-real distances of ``fake`` vs ``real``.

    real, fake: (N, 1|3, H, W) float in [0, 1] (uint8 accepted). kid_subset_size defaults to
    min(1000, N_real, N_fake). KID subsets are drawn with ``seed`` (the global RNG is untouched).
    The per-image list ``nn_real_distance`` is in the same order as ``fake``. ``feature_net`` is
    the net's name, ``feature_net_info`` its full ``describe()``.
    """
    real, fake = _check(real, "real"), _check(fake, "fake")
    result = metrics_from_embeddings(embed_images(net, real, batch_size), embed_images(net, fake, batch_size),
                                     kid_subset_size=kid_subset_size, kid_subsets=kid_subsets, seed=seed)
    return {**result, "feature_net": net.name, "feature_net_info": net.describe()}
