"""Privacy of a release: can an attacker link a released image back to the people in its group?

- Linkage attack (k-SALSA protocol): a pair classifier (real image, synthetic image) ->
  "this real person is in that synthetic image's group". Trained on pairs from the private
  set's release (its audit gives the truth), tested on a held-out set anonymised separately:
  for every synthetic test image, all real test images are ranked by the classifier's score;
  metric = top-k precision (members among the k best-ranked / k), chance = |group| / N.
- Label-aware chance (given the labels): the expected top-k precision of an attacker who knows
  every real test image's true label and the released label of each synthetic image, and ranks
  the reals of that label first, at random within. A release that carries its labels (the point
  of releasing) gives at least this much away, whatever the images; for label-pure groups it is
  about (number of classes) x k / N.
- Nearest-neighbour re-identification: the share of synthetic images whose nearest real image
  (Euclidean, feature-net embedding) is one of its group's members; chance = |group| / N.

Attack features per image: the feature net's embedding and a 8 x 8 thumbnail of the pixels
(both standardised on the attacker's training reals); pair features = (|a - b|, a * b);
classifier = logistic regression (scikit-learn), negatives sampled at random (seeded).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from medveil.data.tensors import to_tensor
from medveil.evaluate.fidelity import embed_images, nearest_real
from medveil.models.features import FeatureNet

THUMB = 8


def image_features(images: np.ndarray, net: FeatureNet, size: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, H, W, C) -> (embeddings (N, D), thumbnails (N, C*8*8)) at ``size`` px."""
    x = to_tensor(images, size=size, channels=3)
    emb = embed_images(net, x).numpy().astype(np.float64)
    thumb = F.adaptive_avg_pool2d(x, THUMB).flatten(1).numpy().astype(np.float64)
    return emb, thumb


class FeatureCache:
    """:func:`image_features` of each image array, computed once per array (keyed by identity;
    the cache holds a reference so the key stays valid): the private reals are shared by
    every candidate release, so their embeddings are computed once, not once per use."""

    def __init__(self, net: FeatureNet, size: int) -> None:
        self.net, self.size = net, size
        self._memo: dict[int, tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]] = {}

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        key = id(images)
        if key not in self._memo:
            with torch.no_grad():
                self._memo[key] = (images, image_features(images, self.net, self.size))
        return self._memo[key][1]


class LinkageAttack:
    """Pair classifier over standardised image features."""

    def __init__(self, negatives_per_positive: int = 5, C: float = 0.1, seed: int = 0) -> None:
        self.neg, self.seed = negatives_per_positive, seed
        self.scaler = StandardScaler()
        self.clf = LogisticRegression(C=C, max_iter=5000)

    def fit(self, real: np.ndarray, syn: np.ndarray, groups: Sequence[np.ndarray]) -> LinkageAttack:
        """real (N, F), syn (G, F) features; groups[g] = row indices of synthetic g's members."""
        self.scaler.fit(real)
        r, s = self.scaler.transform(real), self.scaler.transform(syn)
        rng = np.random.default_rng(self.seed)
        pos = [(g, m) for g, members in enumerate(groups) for m in np.asarray(members)]
        member_sets = [set(np.asarray(m).tolist()) for m in groups]
        neg = []
        for g, _ in pos:
            for m in rng.integers(0, len(real), size=self.neg):
                if int(m) not in member_sets[g]:
                    neg.append((g, int(m)))
        pairs = np.array(pos + neg)
        y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
        self.clf.fit(_pair(r[pairs[:, 1]], s[pairs[:, 0]]), y)
        return self

    def scores(self, real: np.ndarray, syn: np.ndarray) -> np.ndarray:
        """(G, N) score of "real n is in synthetic g's group" for every pair."""
        r, s = self.scaler.transform(real), self.scaler.transform(syn)
        out = np.empty((len(s), len(r)))
        for g in range(len(s)):
            out[g] = self.clf.decision_function(_pair(r, np.broadcast_to(s[g], r.shape)))
        return out


def _pair(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.concatenate([np.abs(a - b), a * b], axis=1)


def topk_precision(scores: np.ndarray, groups: Sequence[np.ndarray], k: int) -> dict[str, float]:
    """Mean over synthetic images of |members among the top-k ranked reals| / k, and chance."""
    n = scores.shape[1]
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    hits = [len(set(top[g].tolist()) & set(np.asarray(m).tolist())) / k for g, m in enumerate(groups)]
    chance = float(np.mean([len(m) / n for m in groups]))
    return {"topk_precision": float(np.mean(hits)), "chance": chance, "k": int(k)}


def label_chance(groups: Sequence[np.ndarray], syn_labels: np.ndarray, real_labels: np.ndarray,
                 k: int) -> float:
    """Expected top-k precision of ranking the reals whose label equals each synthetic image's
    label first (uniformly at random within each tier), averaged over synthetic images."""
    real_labels = np.asarray(real_labels)
    n = len(real_labels)
    tier = dict(zip(*np.unique(real_labels, return_counts=True)))  # label -> number of reals
    out = []
    for members, y in zip(groups, np.asarray(syn_labels)):
        members = np.asarray(members)
        same = int(tier.get(y, 0))
        m_same = int(np.sum(real_labels[members] == y))
        m_other = len(members) - m_same
        if same >= k:  # top k drawn from the `same` tier only
            hits = k * m_same / same
        else:  # the whole tier, then k - same drawn from the rest
            hits = m_same + (k - same) * m_other / max(n - same, 1)
        out.append(hits / k)
    return float(np.mean(out))


def nn_reid(real_emb: np.ndarray, syn_emb: np.ndarray, groups: Sequence[np.ndarray]) -> dict[str, float]:
    """Share of synthetic images whose nearest real image is a member of its group, and chance."""
    _, idx = nearest_real(real_emb, syn_emb)
    hits = [int(idx[g]) in set(np.asarray(m).tolist()) for g, m in enumerate(groups)]
    chance = float(np.mean([len(m) / len(real_emb) for m in groups]))
    return {"nn_reid_rate": float(np.mean(hits)), "chance": chance}


def linkage_privacy(
    net: FeatureNet, size: int, k: int,
    train_real: np.ndarray, train_syn: np.ndarray, train_groups: Sequence[np.ndarray],
    test_real: np.ndarray, test_syn: np.ndarray, test_groups: Sequence[np.ndarray],
    seed: int = 0, features: FeatureCache | None = None,
    test_labels: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Train the attack on (private reals, their release), test on (held-out reals, theirs).
    ``features``: a cache shared across calls (its net and size must be ``net``, ``size``).
    ``test_labels`` = (labels of the test reals, released labels of the test synthetic images)
    adds the label-aware chance to the linkage result."""
    cache = features or FeatureCache(net, size)
    feats = {name: cache(imgs) for name, imgs in (("tr", train_real), ("ts", train_syn),
                                                  ("er", test_real), ("es", test_syn))}
    attack = LinkageAttack(seed=seed).fit(np.hstack(feats["tr"]), np.hstack(feats["ts"]),
                                          train_groups)
    scores = attack.scores(np.hstack(feats["er"]), np.hstack(feats["es"]))
    linkage = topk_precision(scores, test_groups, k)
    if test_labels is not None:
        linkage["label_chance"] = label_chance(test_groups, test_labels[1], test_labels[0], k)
    return {"linkage": linkage,
            "nn_reid": nn_reid(feats["er"][0], feats["es"][0], test_groups),
            "attack": {"features": f"{net.name} embedding + {THUMB}x{THUMB} thumbnail",
                       "classifier": "logistic regression on (|a-b|, a*b)",
                       "negatives_per_positive": attack.neg, "seed": seed,
                       "n_train_groups": len(train_groups), "n_test_groups": len(test_groups),
                       "n_test_real": int(len(test_real))}}
