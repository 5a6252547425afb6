"""Deterministic splits: stratified by label, grouped by patient (or duplicate group) when asked.

- :func:`split_indices`: train/val/test index arrays. Without groups: stratified shuffle
  (sklearn ``train_test_split``). With groups: one fold of ``StratifiedGroupKFold`` (a fraction
  f uses round(1/f) folds, so a fold holds 1/round(1/f) of the items, e.g. 1/6 for f = 0.18),
  then whole groups are moved in or out until the part holds round(f * n) items (as close as
  the group sizes allow), each move the one that keeps the label proportions closest to the
  whole set's. No group (patient) lands in two splits.
- :func:`hold_out_unlabelled`: set a fraction of a (train) split apart as an unlabelled pool,
  e.g. the federated server's pool; returns (kept, pool) indices.
- :func:`resplit`: apply :func:`split_indices` to one split of an :class:`ImageDataset`.

Same inputs and seed give the same indices. Groups are any per-item ids, e.g. patient ids, or
``duplicates.merge_groups(patient_ids, duplicates.duplicate_groups(images))``.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from medveil.data.dataset import ImageDataset
from medveil.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def split_indices(
    labels: np.ndarray,
    *,
    val: float = 0.1,
    test: float = 0.2,
    groups: np.ndarray | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """{"train", "val", "test"} -> sorted int64 indices into ``labels`` (empty parts left out).

    val, test: fractions of all items; groups: per-item group ids kept within one split.
    """
    if val < 0 or test < 0 or val + test >= 1:
        raise ConfigError(f"split fractions val={val}, test={test} must be >= 0 and sum below 1")
    labels = np.asarray(labels)
    everything = np.arange(len(labels))
    rest, test_idx = _take(everything, labels, test, groups, seed)
    val_frac = val / (1.0 - test) if val else 0.0
    train_idx, val_idx = _take(rest, labels, val_frac, groups, seed + 1)
    parts = {"train": train_idx, "val": val_idx, "test": test_idx}
    return {name: np.sort(idx) for name, idx in parts.items() if len(idx) or name == "train"}


def hold_out_unlabelled(
    labels: np.ndarray,
    fraction: float,
    *,
    groups: np.ndarray | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(kept, pool): set ``fraction`` of the items apart (stratified, grouped when given).

    The pool's labels are meant to be dropped by the caller (the server sees images only).
    """
    if not 0 <= fraction < 1:
        raise ConfigError(f"unlabelled fraction must be in [0, 1), got {fraction}")
    kept, pool = _take(np.arange(len(labels)), np.asarray(labels), fraction, groups, seed)
    return np.sort(kept), np.sort(pool)


def resplit(
    dataset: ImageDataset,
    *,
    val: float = 0.1,
    test: float = 0.2,
    seed: int = 0,
    by_patient: bool = True,
    groups: np.ndarray | None = None,
    source: str = "train",
) -> ImageDataset:
    """A copy of ``dataset`` whose split ``source`` is cut into train/val/test.

    Groups: ``groups`` when given, else the split's patient ids when ``by_patient`` and present.
    Other splits of the dataset are dropped (they would overlap the new val/test).
    """
    split = dataset.split(source)
    if groups is None and by_patient:
        groups = split.patient_ids
    parts = split_indices(split.labels, val=val, test=test, groups=groups, seed=seed)
    return dataclasses.replace(dataset, splits={k: split.subset(v) for k, v in parts.items()})


def _take(
    items: np.ndarray, labels: np.ndarray, fraction: float, groups: np.ndarray | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``items`` (indices) into (rest, taken) with ``fraction`` of them taken."""
    empty = np.empty(0, dtype=np.int64)
    if fraction <= 0 or len(items) == 0:
        return items, empty
    if fraction > 0.5:  # folds can only take <= 1/2: take the complement instead
        taken, rest = _take(items, labels, 1.0 - fraction, groups, seed)
        return rest, taken
    y = _strata(labels[items])
    if groups is None:
        n_take = max(1, int(round(fraction * len(items))))
        if n_take >= len(items):
            raise DataError(f"cannot set {fraction:.0%} of {len(items)} items apart")
        stratify = y if y is not None and _stratifiable(y, n_take, len(items)) else None
        if y is not None and stratify is None:
            log.warning("some classes are too small to stratify %d items; splitting at random",
                        len(items))
        rest, taken = train_test_split(items, test_size=n_take, stratify=stratify,
                                       random_state=seed, shuffle=True)
        return rest, taken
    g = np.asarray(groups)[items]
    n_splits = max(2, int(round(1.0 / fraction)))
    n_groups = len(np.unique(g))
    if n_groups < n_splits:
        raise DataError(f"only {n_groups} patients/groups: too few to set {fraction:.0%} apart "
                        "by group")
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    y_fold = y if y is not None else np.zeros(len(items), dtype=np.int64)
    taken_pos = next(folds.split(np.zeros(len(items)), y_fold, g))[1]
    taken = np.zeros(len(items), dtype=bool)
    taken[taken_pos] = True
    taken = _fit_size(taken, g, y_fold, int(round(fraction * len(items))), seed)
    return items[~taken], items[taken]


def _fit_size(taken: np.ndarray, groups: np.ndarray, y: np.ndarray, n_take: int, seed: int
              ) -> np.ndarray:
    """Move whole groups across the boundary until ``taken`` (bool per item) holds ``n_take``
    items or no group fits the gap. Each move is the group that leaves the taken part's label
    counts closest (squared error) to n_take x the overall label fractions; ties go to a seeded
    random order. Returns the new mask."""
    _, gid = np.unique(groups, return_inverse=True)
    classes, yid = np.unique(y, return_inverse=True)
    counts = np.zeros((gid.max() + 1, len(classes)), dtype=np.int64)  # (groups, classes)
    np.add.at(counts, (gid, yid), 1)
    sizes = counts.sum(axis=1)
    in_taken = np.zeros(len(sizes), dtype=bool)
    in_taken[gid[taken]] = True
    target = n_take * counts.sum(axis=0) / len(y)  # (classes,) label counts wanted in taken
    order = np.random.default_rng(seed).permutation(len(sizes))  # tie-break
    have = counts[in_taken].sum(axis=0)
    while (gap := n_take - int(have.sum())) != 0:
        sign = 1 if gap > 0 else -1  # +1: move a group in, -1: move one out
        cand = order[(in_taken[order] == (sign < 0)) & (sizes[order] <= abs(gap))]
        if len(cand) == 0:
            break
        err = (((have + sign * counts[cand]) - target) ** 2).sum(axis=1)
        best = cand[int(np.argmin(err))]
        in_taken[best] = sign > 0
        have = have + sign * counts[best]
    return in_taken[gid]


def _strata(labels: np.ndarray) -> np.ndarray | None:
    """Class per item for stratification; None for multi-label (N, C) labels."""
    return labels if labels.ndim == 1 else None


def _stratifiable(y: np.ndarray, n_take: int, n: int) -> bool:
    counts = np.unique(y, return_counts=True)[1]
    n_classes = len(counts)
    return counts.min() >= 2 and n_take >= n_classes and n - n_take >= n_classes
