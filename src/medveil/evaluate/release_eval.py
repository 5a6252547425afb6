"""Evaluate k-anonymous releases and their baselines (k-SALSA evaluation protocol).

For every candidate training set (k-SALSA images with majority labels, centroid images
G(w_bar), k-Same-Pixel, GAN reconstructions of N/k real images, N/k real images):

- utility: :func:`medveil.evaluate.utility.utility_scores` (same small CNN, real test images);
- fidelity: FID, KID and nearest-real distance vs the private images
  (:mod:`medveil.evaluate.fidelity`, with the documented feature net; every image set is
  embedded once and the embeddings are shared by fidelity and privacy);
- privacy: linkage attack top-k precision and nearest-neighbour re-identification
  (:mod:`medveil.evaluate.linkage`), trained on the private set's version of the set and
  tested on the held-out set's version; plus ``nn_reid_private``: how often an image's
  nearest private image is one of its own members (an attacker holding the private images).

:func:`read_release` reads a release folder back (images, labels, audit groups), so
``medveil evaluate-release`` can score any release written by ``medveil anonymize``.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from medveil.anonymize.baselines import group_representatives, k_same_pixel
from medveil.anonymize.grouping import majority_labels
from medveil.errors import DataError
from medveil.evaluate.fidelity import metrics_from_embeddings
from medveil.evaluate.linkage import FeatureCache, linkage_privacy, nn_reid
from medveil.evaluate.utility import UtilityConfig, utility_scores
from medveil.models.features import FeatureNet

SET_NAMES = ("k-SALSA", "centroid", "k-Same-Pixel", "GAN recon N/k", "real N/k")


@dataclass
class SyntheticSet:
    """One released (or baseline) image per group of a real set."""

    images: np.ndarray  # uint8 (G, H, W, C)
    labels: np.ndarray  # (G,) int training label (majority of the group, or the member's own)
    groups: list[np.ndarray]  # row indices into the real set of each image's group


def baseline_sets(groups: Sequence[np.ndarray], labels: np.ndarray, num_classes: int,
                  reals: np.ndarray, ksalsa: np.ndarray | None = None,
                  centroids: np.ndarray | None = None, recons: np.ndarray | None = None,
                  seed: int = 0) -> dict[str, SyntheticSet]:
    """Every candidate set for one grouping of a real set (reals uint8 (N, R, R, C) at the
    synthetic resolution). "N/k" sets take one random member per group (seeded) with its own
    label; the others are labelled with the group majority. Sets whose inputs are None are left out."""
    groups = [np.asarray(g) for g in groups]
    major = majority_labels(groups, labels, num_classes)
    reps = group_representatives(reals, groups, method="random", seed=seed)
    sets = {"k-Same-Pixel": SyntheticSet(k_same_pixel(reals, groups), major, groups),
            "real N/k": SyntheticSet(reals[reps], labels[reps], groups)}
    if ksalsa is not None:
        sets["k-SALSA"] = SyntheticSet(ksalsa, major, groups)
    if centroids is not None:
        sets["centroid"] = SyntheticSet(centroids, major, groups)
    if recons is not None:
        sets["GAN recon N/k"] = SyntheticSet(recons[reps], labels[reps], groups)
    return {name: sets[name] for name in SET_NAMES if name in sets}


def evaluate_sets(
    private_sets: Mapping[str, SyntheticSet], private_reals: np.ndarray,
    test_reals: np.ndarray, test_labels: np.ndarray, num_classes: int, k: int,
    net: FeatureNet, *, heldout_sets: Mapping[str, SyntheticSet] | None = None,
    utility: UtilityConfig = UtilityConfig(), per_image: bool = False,
    progress: bool | None = None,
) -> dict[str, dict[str, Any]]:
    """Utility, fidelity and (with ``heldout_sets``: the same methods applied to the test
    set) privacy of every set in ``private_sets``. Reals are uint8 (N, H, W, C)."""
    util = utility_scores({n: (s.images, s.labels) for n, s in private_sets.items()},
                          test_reals, test_labels, num_classes, utility, progress)
    out: dict[str, dict[str, Any]] = {}
    caches: dict[int, FeatureCache] = {}  # per image size: reals embedded once for all sets
    for name, s in private_sets.items():
        size = s.images.shape[1]
        cache = caches.setdefault(size, FeatureCache(net, size))
        real_emb, syn_emb = cache(private_reals)[0], cache(s.images)[0]
        fid = {**metrics_from_embeddings(torch.from_numpy(real_emb), torch.from_numpy(syn_emb)),
               "feature_net": net.name}
        own = nn_reid(real_emb, syn_emb, s.groups)
        if not per_image:
            fid.pop("nn_real_distance")
        row: dict[str, Any] = {"n_images": len(s.images), "utility": util[name], "fidelity": fid,
                               "nn_reid_private": own}
        if heldout_sets is not None and name in heldout_sets:
            h = heldout_sets[name]
            row["privacy"] = linkage_privacy(net, size, k, private_reals, s.images, s.groups,
                                             test_reals, h.images, h.groups, features=cache,
                                             test_labels=(test_labels, h.labels))
        out[name] = row
    return out


# ----------------------------------------------------------------------------- release folders


@dataclass
class ReleaseFolder:
    files: list[str]
    images: np.ndarray  # uint8 (G, H, W, C)
    labels: np.ndarray  # (G,) majority label from labels.csv
    members: list[list[str]]  # member ids of each image, from audit/groups.csv


def read_release(out_dir: str | Path) -> ReleaseFolder:
    """Read OUT/release (images, labels.csv) and OUT/audit/groups.csv back."""
    out = Path(out_dir)
    labels_csv, groups_csv = out / "release" / "labels.csv", out / "audit" / "groups.csv"
    for p in (labels_csv, groups_csv):
        if not p.is_file():
            raise DataError(f"{p}: missing; {out} is not a release folder written by "
                            "`medveil anonymize`")
    with open(labels_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    members: dict[str, list[str]] = {}
    with open(groups_csv, newline="") as f:
        for row in csv.DictReader(f):
            members.setdefault(row["file"], []).append(row["member_id"])
    files = [r["file"] for r in rows]
    missing = [f for f in files if f not in members]
    if missing:
        raise DataError(f"{groups_csv}: no members for released image {missing[0]}")
    images = []
    for name in files:
        try:
            with Image.open(out / "release" / "images" / name) as im:
                arr = np.asarray(im.convert("RGB" if im.mode not in ("L", "I;16") else "L"))
        except OSError as err:
            raise DataError(f"{out / 'release' / 'images' / name}: unreadable ({err})") from None
        images.append(arr[..., None] if arr.ndim == 2 else arr)
    return ReleaseFolder(files, np.stack(images), np.array([int(r["label"]) for r in rows]),
                         [members[f] for f in files])


def index_groups(release: ReleaseFolder, ids: Sequence[str], where: str) -> list[np.ndarray]:
    """Member ids of each released image -> row indices into a real set with ``ids``."""
    row_of = {str(i): r for r, i in enumerate(ids)}
    groups = []
    for f, ms in zip(release.files, release.members):
        unknown = [m for m in ms if m not in row_of]
        if unknown:
            raise DataError(f"{where}: member {unknown[0]} of released image {f} is not in this "
                            "image set; pass the set the release was made from")
        groups.append(np.array([row_of[m] for m in ms], dtype=np.int64))
    return groups


def format_table(results: Mapping[str, Mapping[str, Any]], title: str = "") -> str:
    """One row per set: utility acc/kappa, FID/KID, linkage top-k precision vs chance (and vs
    the label-aware chance, when known), NN re-id."""
    head = (f"{'set':<14} {'n':>5} {'acc':>13} {'qwk':>13} {'FID':>8} {'KID':>8} "
            f"{'top-k prec':>10} {'chance':>7} {'w/ label':>8} {'NN re-id':>8} {'chance':>7}")
    lines = ([title] if title else []) + [head, "-" * len(head)]
    for name, r in results.items():
        u, f, p = r["utility"], r["fidelity"], r.get("privacy")
        link = (f"{p['linkage']['topk_precision']:>10.3f} {p['linkage']['chance']:>7.3f} "
                f"{p['linkage'].get('label_chance', float('nan')):>8.3f} "
                f"{p['nn_reid']['nn_reid_rate']:>8.3f} {p['nn_reid']['chance']:>7.3f}"
                if p else f"{'-':>10} {'-':>7} {'-':>8} {'-':>8} {'-':>7}")
        lines.append(f"{name:<14} {r['n_images']:>5} {u['acc_mean']:>6.3f}+-{u['acc_std']:<5.3f}"
                     f" {u['qwk_mean']:>6.3f}+-{u['qwk_std']:<5.3f} {f['fid']:>8.2f} "
                     f"{f['kid_mean']:>8.4f} {link}")
    if any(r.get("privacy") for r in results.values()):
        lines.append("top-k prec: linkage attack; chance |group|/N; w/ label: chance for an "
                     "attacker who knows every real test image's label and each image's label")
    return "\n".join(lines)
