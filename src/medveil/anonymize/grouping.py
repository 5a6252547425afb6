"""k-anonymous grouping: partition N points (flattened W+ codes) into groups of >= k.

Three algorithms; the first two are microaggregation on Euclidean distances of the flattened
rows (members are similar), the third ignores the points (members are unrelated):

- :func:`greedy_farthest_groups` - the k-SALSA reference: take the unassigned point farthest
  from the centroid of the unassigned points, group it with its k-1 nearest unassigned
  neighbours, repeat. Corrected for N mod k != 0: the r < k points left at the end each join
  the group with the nearest centroid (no member is ever taken from a group), so every group
  has k..2k-1 members.
- :func:`mdav_groups` - MDAV microaggregation (Domingo-Ferrer & Torra 2005): groups of exactly
  k, the last one k..2k-1.
- :func:`random_groups` - a seeded random partition into groups of k..2k-1 (sizes differ by at
  most one). A group of similar people yields an image that resembles every member, which is
  what a linkage attack exploits (benchmarks/ksalsa.py measures it); a random group yields an
  image that resembles none of them in particular, at a cost in utility.

Label strata (``labels=``, any method): each class is grouped on its own, so every group is
label-pure (the release's labels are exact, not majorities). Classes with fewer than k units
are pooled and grouped together; if even the pool has fewer than k units it is grouped with
the largest class. :func:`group_by_subject` runs on one mean point per subject (patient) so
that all images of a person fall in one group and k counts people (a subject's label is the
majority of its images' labels). :func:`make_groups` picks.

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

from medveil.errors import MedVeilError, at

METHODS: tuple[str, ...] = ("greedy", "mdav", "random")


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


def random_groups(n: int, k: int, seed: int = 0) -> list[np.ndarray]:
    """Seeded random partition of rows 0..n-1 into n // k groups of k..2k-1 (sizes differ by
    at most one), as sorted int64 row-index arrays."""
    _check_k(k, n)
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(g) for g in np.array_split(perm, n // k)]


def group_by_subject(
    X: np.ndarray, subject_ids: Sequence[Hashable] | np.ndarray, k: int,
    method: str = "greedy", seed: int = 0, labels: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Group rows so that each group holds k..2k-1 distinct subjects and no subject is split.

    Each subject's rows are averaged into one point, the subject points are grouped with
    ``method`` (within label strata when ``labels`` is given: a subject's label is the
    majority of its rows', ties to the lower), and each group is expanded back to all its
    subjects' rows.
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
    subject_labels = None
    if labels is not None:
        labels = _label_array(labels, len(X))
        subject_labels = majority_labels(rows_of, labels, int(labels.max()) + 1)
    subject_groups = _group_points(subject_points, k, method, seed, subject_labels)
    return [np.sort(np.concatenate([rows_of[s] for s in g])) for g in subject_groups]


def make_groups(
    X: np.ndarray, k: int, method: str = "greedy", seed: int = 0,
    subject_ids: Sequence[Hashable] | np.ndarray | None = None,
    labels: np.ndarray | None = None,
) -> list[np.ndarray]:
    """One entry point: group rows (``subject_ids=None``) or subjects with ``method``, within
    label strata when ``labels`` (one int per row) is given."""
    if subject_ids is not None:
        return group_by_subject(X, subject_ids, k, method, seed, labels)
    return _group_points(X, k, method, seed,
                         None if labels is None else _label_array(labels, len(np.asarray(X))))


def majority_labels(groups: Sequence[np.ndarray], labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(G,) majority class of each group; ties go to the lower class (as in labels.csv)."""
    return np.array([np.bincount(labels[np.asarray(g)], minlength=num_classes).argmax()
                     for g in groups], dtype=np.int64)


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


def _group_points(X: np.ndarray, k: int, method: str, seed: int,
                  labels: np.ndarray | None = None) -> list[np.ndarray]:
    if method not in METHODS:
        raise MedVeilError(f"unknown grouping method {method!r} (choose from {', '.join(METHODS)})")
    X = _as_points(X, k)
    if labels is not None:
        return [rows[g] for rows in label_strata(labels, k)
                for g in _group_points(X[rows], k, method, seed)]
    if method == "greedy":
        return greedy_farthest_groups(X, k, seed)
    if method == "mdav":
        return mdav_groups(X, k)
    return random_groups(len(X), k, seed)


def label_strata(labels: np.ndarray, k: int) -> list[np.ndarray]:
    """Row indices of each class with >= k rows; the smaller classes pooled into one more
    stratum if it reaches k rows, else added to the largest class."""
    classes = np.unique(labels)
    rows = [np.flatnonzero(labels == c) for c in classes]
    big = [r for r in rows if len(r) >= k]
    small = np.sort(np.concatenate([np.zeros(0, np.int64), *(r for r in rows if len(r) < k)]))
    if len(small) >= k or not big:
        return big + ([small] if len(small) else [])
    largest = int(np.argmax([len(r) for r in big]))
    big[largest] = np.sort(np.concatenate([big[largest], small]))
    return big


def _label_array(labels: np.ndarray, n: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer) or (labels < 0).any():
        raise MedVeilError(f"grouping labels: need one integer class >= 0 per row ({n}), got "
                           f"shape {labels.shape} dtype {labels.dtype}")
    return labels.astype(np.int64)


def _as_points(X: np.ndarray, k: int) -> np.ndarray:
    """Validate k and X; return X as float64 (N, D)."""
    X = np.asarray(X)
    if X.ndim < 2 or X.shape[0] == 0:
        _check_k(k, 1)  # a bad k is reported first
        raise MedVeilError(f"expected points of shape (N, ...) with N >= 1, got {X.shape}")
    _check_k(k, X.shape[0])
    try:
        X = X.reshape(X.shape[0], -1).astype(np.float64, copy=False)
    except (TypeError, ValueError):
        raise MedVeilError(f"points must be numeric, got dtype {X.dtype}") from None
    bad = np.flatnonzero(~np.isfinite(X).all(axis=1))
    if bad.size:
        raise MedVeilError(f"point row {bad[0]} has NaN/Inf values ({bad.size} rows affected)")
    return X


RELEASE_MIN_K = 2  # a released image must stand for at least two people: k = 1 hides no one


def require_k(k: object, minimum: int = RELEASE_MIN_K, where: str = "") -> int:
    """The one rule for k: an integer (not a bool) >= ``minimum``; one MedVeilError line if not.
    Releases, ``anonymize`` and ``verify-release`` use the default (2); the grouping algorithms
    themselves accept k = 1 (groups of one)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < minimum:
        raise MedVeilError(f"{at(where)}k must be an integer >= {minimum}, got {k!r}")
    return int(k)


def _check_k(k: object, n: int) -> None:
    require_k(k, minimum=1)
    if k > n:
        raise MedVeilError(f"k={k} is larger than the {n} points to group; need N >= k")


def _subject_array(subject_ids: Sequence[Hashable] | np.ndarray, n: int) -> np.ndarray:
    ids = list(subject_ids)
    if len(ids) != n:
        raise MedVeilError(f"{len(ids)} subject ids for {n} rows; need one per row")
    for row, s in enumerate(ids):
        if s is None or (isinstance(s, float) and np.isnan(s)) or str(s).strip() == "":
            raise MedVeilError(f"subject id missing at row {row}")
    return np.array([str(s) for s in ids])
