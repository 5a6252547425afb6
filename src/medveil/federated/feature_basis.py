"""A public coordinate system for a head refit under differential privacy.

Why: DP-SGD on a linear head over the raw backbone features learns little at a site's size (600
images: the clipped, noised gradient is dominated by the features' common mean and their
low-variance directions), and the exact refit's standardisation (:mod:`.calibration`) reads the
private images' statistics. The server holds public images instead: its pool. After the last
stage it describes the universal backbone's features on the pool by their mean and top-``k``
principal axes, whitened (scikit-learn ``PCA(whiten=True)``), and sends that with the
calibration instructions. A site then fits its head by DP-SGD on ``k`` whitened coordinates
(:func:`~medveil.federated.dp_training.dp_fit_head`) and folds it back into a head on raw
features, so the universal model keeps one plain linear head per task. The evidence (validation
splits only): ``benchmarks/results/privacy_calibration_validation.json`` and README.

The basis is computed from the pool only (no site's private image, never a label); over Flower
it is one more record of the server's message (``features``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from medveil.federated.messages import StateDict
from medveil.federated.training import extract_features
from medveil.models import VisionTransformer


def pool_feature_basis(backbone: VisionTransformer, pool: torch.Tensor, dims: int, seed: int = 0) -> StateDict:
    """:func:`feature_basis` of the backbone's features on ``pool`` (empty for fewer than 2 images:
    the site then refits on raw features)."""
    if len(pool) < 2 or dims < 1:
        return {}
    return feature_basis(extract_features(backbone, pool), dims, seed)


def feature_basis(features: torch.Tensor, dims: int, seed: int = 0) -> StateDict:
    """{"mean": (D,), "basis": (D, k)} with z = (x - mean) @ basis the top-k principal coordinates
    of ``features`` (M, D), each of unit variance there; k = min(dims, M - 1, D), less any axis
    with under 1e-6 of the largest variance (whitening it would blow up the noise)."""
    from sklearn.decomposition import PCA

    feats = features.double().numpy()
    k = min(dims, len(feats) - 1, feats.shape[1])
    pca = PCA(k, whiten=True, random_state=seed).fit(feats)
    var = torch.from_numpy(pca.explained_variance_)
    keep = var > 1e-6 * var.max()
    basis = torch.from_numpy(pca.components_)[keep].T / var[keep].sqrt()  # (D, k): project, then whiten
    return {"mean": torch.from_numpy(pca.mean_).float(), "basis": basis.float().contiguous()}


def to_basis(features: torch.Tensor, basis: StateDict) -> torch.Tensor:
    """(N, D) raw features -> (N, k) coordinates in ``basis`` (unchanged without one)."""
    if not basis:
        return features
    return (features - basis["mean"]) @ basis["basis"]


def fold_head(head: nn.Linear, basis: StateDict) -> StateDict:
    """The state of the head on raw features equal to ``head`` on basis coordinates:
    W z + b = (W B^T) x + (b - W B^T mean)."""
    w, b = head.weight.detach(), head.bias.detach()
    if not basis:
        return {"weight": w.clone(), "bias": b.clone()}
    w_raw = w @ basis["basis"].T
    return {"weight": w_raw.contiguous(), "bias": (b - w_raw @ basis["mean"]).contiguous()}
