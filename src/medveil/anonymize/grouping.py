"""k-anonymous grouping: partition N points (flattened W+ codes) into groups of >= k.

Two algorithms, both on Euclidean distances of the flattened rows:

- :func:`greedy_farthest_groups` - the k-SALSA reference: take the unassigned point farthest
  from the centroid of the unassigned points, group it with its k-1 nearest unassigned
  neighbours, repeat. Corrected for N mod k != 0: the r < k points left at the end each join
  the group with the nearest centroid (no member is ever taken from a group), so every group
  has k..2k-1 members.
- :func:`mdav_groups` - MDAV microaggregation (Domingo-Ferrer & Torra 2005): groups of exactly
  k, the last one k..2k-1.

:func:`group_by_subject` runs either on one mean point per subject (patient) so that all
images of a person fall in one group and k counts people. :func:`make_groups` picks.

Cost: one squared-distance matrix (sklearn, BLAS; N^2 float64 of memory: 72 MB at N=3000),
then O(N) work per group. The farthest point from the centroid of a set U is the point with
the largest sum of squared distances to U (||x-c||^2 = mean_j ||x-x_j||^2 - const), so the
centroid never has to be formed.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
from scipy.spatial.distance import cdist
from sklearn.metrics.pairwise import euclidean_distances

from medveil.errors import MedVeilError

METHODS: tuple[str, ...] = ("greedy", "mdav")


def greedy_farthest_groups(X: np.ndarray, k: int, seed: int = 0) -> list[np.ndarray]:
    """Reference greedy grouping, corrected: every group has k..2k-1 members.

    X: (N, ...) points (flattened to (N, D)). seed: breaks exact distance ties (a seeded
    permutation of the points), so the result is deterministic for a given seed.
    Returns groups as sorted int64 row-index arrays, in the order they were formed.
    """
    X = _as_points(X, k)
    perm = np.random.default_rng(seed).permutation(len(X))
    pool = _Pool(X[perm])
    groups: list[np.ndarray] = []
    while pool.size >= k:
        far = pool.farthest_from_centroid()
        groups.append(pool.take_nearest(far, k))
    groups = [perm[g] for g in groups]
    if pool.size:
        leftover = perm[np.flatnonzero(pool.alive)]
        nearest = cdist(X[leftover], group_means(X, groups), "sqeuclidean").argmin(axis=1)
        for g in np.unique(nearest):
            groups[g] = np.concatenate([groups[g], leftover[nearest == g]])
    return [np.sort(g) for g in groups]


def mdav_groups(X: np.ndarray, k: int) -> list[np.ndarray]:
    """MDAV microaggregation: groups of k, the last one k..2k-1 (deterministic).

    While >= 3k points remain: r = farthest from the centroid, group r with its k-1 nearest;
    s = farthest remaining from r, group s with its k-1 nearest. Then with 2k..3k-1 left, one
    more group around the farthest point; the rest (k..2k-1) is the last group.
    """
    X = _as_points(X, k)
    pool = _Pool(X)
    groups: list[np.ndarray] = []
    while pool.size >= 3 * k:
        r = pool.farthest_from_centroid()
        groups.append(pool.take_nearest(r, k))
        s = pool.farthest_from(r)
        groups.append(pool.take_nearest(s, k))
    if pool.size >= 2 * k:
        groups.append(pool.take_nearest(pool.farthest_from_centroid(), k))
    groups.append(np.flatnonzero(pool.alive))
    return [np.sort(g) for g in groups]


def group_by_subject(
    X: np.ndarray, subject_ids: Sequence[Hashable] | np.ndarray, k: int,
    method: str = "greedy", seed: int = 0,
) -> list[np.ndarray]:
    """Group rows so that each group holds k..2k-1 distinct subjects and no subject is split.

    Each subject's rows are averaged into one point, the subject points are grouped with
    ``method`` ("greedy" or "mdav"), and each group is expanded back to all its subjects' rows.
    """
    X = _as_points(X, 1)
    subjects = _subject_array(subject_ids, len(X))
    uniq, inverse, counts = np.unique(subjects, return_inverse=True, return_counts=True)
    if k > len(uniq):
        raise MedVeilError(
            f"k={k} but only {len(uniq)} distinct subjects among {len(X)} rows; need at least k"
        )
    order = np.argsort(inverse, kind="stable")
    rows_of = np.split(order, np.cumsum(counts)[:-1])  # rows of subject s = rows_of[s]
    subject_points = group_means(X, rows_of)
    subject_groups = _group_points(subject_points, k, method, seed)
    return [np.sort(np.concatenate([rows_of[s] for s in g])) for g in subject_groups]


def make_groups(
    X: np.ndarray, k: int, method: str = "greedy", seed: int = 0,
    subject_ids: Sequence[Hashable] | np.ndarray | None = None,
) -> list[np.ndarray]:
    """One entry point: group rows (``subject_ids=None``) or subjects with ``method``."""
    if subject_ids is not None:
        return group_by_subject(X, subject_ids, k, method, seed)
    return _group_points(X, k, method, seed)


def group_means(X: np.ndarray, groups: Sequence[np.ndarray],
                dtype: type = np.float64) -> np.ndarray:
    """(G, *X.shape[1:]) mean of each group's rows; integer ``dtype`` rounds to nearest.

    Works on latents (N, L, D) and on uint8 images (N, H, W, C) alike, one group at a time,
    so it never holds a float copy of all of X.
    """
    X = np.asarray(X)
    out = np.empty((len(groups), *X.shape[1:]), dtype=dtype)
    rounding = np.issubdtype(out.dtype, np.integer)
    for g, idx in enumerate(groups):
        if len(idx) == 0:
            raise MedVeilError(f"group {g} is empty; cannot average it")
        mean = X[np.asarray(idx)].mean(axis=0, dtype=np.float64)
        out[g] = np.rint(mean) if rounding else mean
    return out


def group_problems(
    groups: Sequence[Sequence[Hashable]], k: int,
    subject_of: Mapping[Hashable, Hashable] | None = None,
    names: Sequence[str] | None = None, subject_word: str = "subject",
) -> dict[str, list[str]]:
    """What breaks k-anonymity in a grouping of member ids, one message per problem.

    Keys: "k_anonymous" (a group with < k distinct members, or subjects when ``subject_of``
    maps member -> subject), "members_disjoint" (a member in several groups) and
    "subjects_disjoint" (a subject in several groups; only checked with ``subject_of``).
    names / subject_word: what to call groups (default "group <index>") and subjects.
    """
    label = (lambda g: names[g]) if names is not None else (lambda g: f"group {g}")
    problems: dict[str, list[str]] = {"k_anonymous": [], "members_disjoint": [],
                                      "subjects_disjoint": []}
    unit = "members" if subject_of is None else f"{subject_word}s"
    member_group: dict[Hashable, int] = {}
    subject_group: dict[Hashable, int] = {}
    for g, members in enumerate(groups):
        distinct = set(members)
        people = distinct if subject_of is None else {subject_of[m] for m in distinct}
        if len(people) < k:
            problems["k_anonymous"].append(f"{label(g)} has {len(people)} distinct {unit} < k={k}")
        for m in distinct:
            if member_group.setdefault(m, g) != g:
                problems["members_disjoint"].append(
                    f"member {m} is in {label(member_group[m])} and {label(g)}")
        if subject_of is not None:
            for p in people:
                if subject_group.setdefault(p, g) != g:
                    problems["subjects_disjoint"].append(
                        f"{subject_word} {p} is in {label(subject_group[p])} and {label(g)}")
    return problems


# ----------------------------------------------------------------------------- internals


class _Pool:
    """Unassigned points with their pairwise squared distances and running distance sums."""

    def __init__(self, X: np.ndarray) -> None:
        centred = X - X.mean(axis=0)  # centring keeps the BLAS distance trick accurate
        self.d2 = euclidean_distances(centred, squared=True)  # (N, N)
        np.fill_diagonal(self.d2, 0.0)
        self.alive = np.ones(len(X), dtype=bool)
        self.sums = self.d2.sum(axis=1)  # (N,) sum of squared distances to the alive points
        self.size = len(X)

    def farthest_from_centroid(self) -> int:
        # ||x - c||^2 = sums[x] / m - const  ->  argmax of the sums over the alive points
        return int(np.argmax(np.where(self.alive, self.sums, -np.inf)))

    def farthest_from(self, i: int) -> int:
        return int(np.argmax(np.where(self.alive, self.d2[i], -np.inf)))

    def take_nearest(self, i: int, k: int) -> np.ndarray:
        """Remove and return point i and its k-1 nearest alive neighbours."""
        d = np.where(self.alive, self.d2[i], np.inf)
        d[i] = -1.0  # i itself always comes first
        members = np.argpartition(d, k - 1)[:k] if k < len(d) else np.flatnonzero(self.alive)
        self.alive[members] = False
        self.size -= len(members)
        self.sums -= self.d2[members].sum(axis=0)
        return members


def _group_points(X: np.ndarray, k: int, method: str, seed: int) -> list[np.ndarray]:
    if method == "greedy":
        return greedy_farthest_groups(X, k, seed)
    if method == "mdav":
        return mdav_groups(X, k)
    raise MedVeilError(f"unknown grouping method {method!r} (choose from {', '.join(METHODS)})")


def _as_points(X: np.ndarray, k: int) -> np.ndarray:
    """Validate k and X; return X as float64 (N, D)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise MedVeilError(f"k must be an integer >= 1, got {k!r}")
    X = np.asarray(X)
    if X.ndim < 2 or X.shape[0] == 0:
        raise MedVeilError(f"expected points of shape (N, ...) with N >= 1, got {X.shape}")
    if k > X.shape[0]:
        raise MedVeilError(f"k={k} is larger than the {X.shape[0]} points to group; need N >= k")
    try:
        X = X.reshape(X.shape[0], -1).astype(np.float64, copy=False)
    except (TypeError, ValueError):
        raise MedVeilError(f"points must be numeric, got dtype {X.dtype}") from None
    bad = np.flatnonzero(~np.isfinite(X).all(axis=1))
    if bad.size:
        raise MedVeilError(f"point row {bad[0]} has NaN/Inf values ({bad.size} rows affected)")
    return X


def _subject_array(subject_ids: Sequence[Hashable] | np.ndarray, n: int) -> np.ndarray:
    ids = list(subject_ids)
    if len(ids) != n:
        raise MedVeilError(f"{len(ids)} subject ids for {n} rows; need one per row")
    for row, s in enumerate(ids):
        if s is None or (isinstance(s, float) and np.isnan(s)) or str(s).strip() == "":
            raise MedVeilError(f"subject id missing at row {row}")
    return np.array([str(s) for s in ids])
