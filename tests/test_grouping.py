"""k-anonymous grouping: sizes in [k, 2k-1], partitions, subjects never split, errors."""

from __future__ import annotations

import numpy as np
import pytest

from medveil.anonymize.baselines import group_representatives, k_same_pixel
from medveil.anonymize.grouping import (
    greedy_farthest_groups,
    group_by_subject,
    group_means,
    group_problems,
    make_groups,
    mdav_groups,
)
from medveil.errors import MedVeilError


def _assert_partition(groups: list[np.ndarray], n: int) -> None:
    allidx = np.concatenate(groups)
    assert len(allidx) == n and np.array_equal(np.sort(allidx), np.arange(n))
    for g in groups:
        assert g.dtype.kind == "i" and np.array_equal(g, np.sort(g))


def _points(n: int, seed: int, dim: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim))


@pytest.mark.parametrize("method", ["greedy", "mdav", "random"])
def test_sizes_between_k_and_2k_minus_1_for_many_n_and_k(method: str) -> None:
    for n in range(1, 41):
        X = _points(n, seed=n)
        for k in range(1, min(n, 9) + 1):
            groups = make_groups(X, k, method, seed=n)
            _assert_partition(groups, n)
            sizes = [len(g) for g in groups]
            assert k <= min(sizes) and max(sizes) <= 2 * k - 1, (method, n, k, sizes)
            assert len(groups) == n // k  # as many groups as possible
            if method == "mdav":  # MDAV: all of size k except the last
                assert all(s == k for s in sizes[:-1]) and k <= sizes[-1] <= 2 * k - 1


def test_greedy_follows_the_reference_order_on_clusters() -> None:
    # three clear 1-D clusters: farthest from the centroid first (100s), then 13, 11, 10
    X = np.array([0, 1, 2, 10, 11, 13, 100, 101, 102], dtype=float)[:, None]
    groups = greedy_farthest_groups(X, 3, seed=0)
    assert [g.tolist() for g in groups] == [[6, 7, 8], [3, 4, 5], [0, 1, 2]]


def test_greedy_leftover_joins_nearest_group_without_stealing() -> None:
    # N=7, k=3: {0,1,2} first, then {48.5, 50, 51}; 52 is left over and joins its nearest
    # group; the reference would instead take a member from a finished group (size k-1).
    X = np.array([0, 1, 2, 50, 51, 52, 48.5])[:, None]
    groups = greedy_farthest_groups(X, 3, seed=0)
    assert [g.tolist() for g in groups] == [[0, 1, 2], [3, 4, 5, 6]]


def test_mdav_reference_example() -> None:
    X = np.arange(9, dtype=float)[:, None]
    assert [g.tolist() for g in mdav_groups(X, 3)] == [[0, 1, 2], [6, 7, 8], [3, 4, 5]]
    X = np.arange(10, dtype=float)[:, None]  # 10 = 3k + 1 -> last group of 4
    assert sorted(len(g) for g in mdav_groups(X, 3)) == [3, 3, 4]


def test_deterministic_under_seed_and_seed_breaks_ties() -> None:
    X = _points(50, seed=1, dim=16)
    a, b = greedy_farthest_groups(X, 4, seed=7), greedy_farthest_groups(X, 4, seed=7)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert all(np.array_equal(x, y) for x, y in zip(mdav_groups(X, 4), mdav_groups(X, 4)))
    ties = np.zeros((12, 3))  # all points identical: only the seed decides
    runs = {tuple(tuple(g) for g in greedy_farthest_groups(ties, 3, seed=s)) for s in range(6)}
    assert len(runs) > 1


def test_latent_shaped_input_is_flattened() -> None:
    X = np.random.default_rng(0).normal(size=(20, 14, 8)).astype(np.float32)  # (N, layers, dim)
    flat = X.reshape(20, -1)
    for f in (lambda x: greedy_farthest_groups(x, 3, 0), lambda x: mdav_groups(x, 3)):
        assert [g.tolist() for g in f(X)] == [g.tolist() for g in f(flat)]


def test_k_equal_one_and_k_equal_n() -> None:
    X = _points(7, seed=0)
    for method in ("greedy", "mdav", "random"):
        singles = make_groups(X, 1, method)
        assert sorted(int(g[0]) for g in singles) == list(range(7))
        assert all(len(g) == 1 for g in singles)
        (whole,) = make_groups(X, 7, method)
        assert whole.tolist() == list(range(7))


@pytest.mark.parametrize(
    ("X", "k", "match"),
    [
        (np.zeros((4, 2)), 5, r"k=5 is larger than the 4 points"),
        (np.zeros((4, 2)), 0, r"k must be an integer >= 1"),
        (np.zeros((4, 2)), 2.5, r"k must be an integer >= 1"),
        (np.zeros((4, 2)), True, r"k must be an integer >= 1"),
        (np.array([[0.0, 1.0], [np.nan, 0.0], [1.0, np.inf]]), 2, r"row 1 has NaN/Inf .*2 rows"),
        (np.zeros((0, 3)), 1, r"N >= 1"),
        (np.zeros(5), 1, r"shape \(N, \.\.\.\)"),
    ],
)
def test_bad_input_is_one_line_error(X: np.ndarray, k: object, match: str) -> None:
    for method in ("greedy", "mdav", "random"):
        with pytest.raises(MedVeilError, match=match) as err:
            make_groups(X, k, method)  # type: ignore[arg-type]
        assert "\n" not in str(err.value)


def test_cli_offers_every_method() -> None:
    from medveil.anonymize.grouping import METHODS
    from medveil.cli.release_cmd import GROUPINGS

    assert GROUPINGS == METHODS


def test_unknown_method() -> None:
    with pytest.raises(MedVeilError, match="unknown grouping method 'kmeans'"):
        make_groups(np.zeros((4, 2)), 2, "kmeans")


@pytest.mark.parametrize("method", ["greedy", "mdav", "random"])
def test_subjects_never_split_and_each_group_has_k_to_2k_minus_1_people(method: str) -> None:
    rng = np.random.default_rng(3)
    for trial in range(25):
        n_people = int(rng.integers(2, 30))
        per_person = rng.integers(1, 5, size=n_people)  # 1..4 images each (eyes, visits)
        subjects = np.repeat([f"pt{p:03d}" for p in range(n_people)], per_person)
        rng.shuffle(subjects)
        X = rng.normal(size=(len(subjects), 6))
        for k in (1, 2, 3, 5):
            if k > n_people:
                with pytest.raises(MedVeilError, match=f"only {n_people} distinct subjects"):
                    group_by_subject(X, subjects, k, method)
                continue
            groups = group_by_subject(X, subjects, k, method, seed=trial)
            _assert_partition(groups, len(subjects))
            owner = {}
            for gi, g in enumerate(groups):
                people = set(subjects[g])
                assert k <= len(people) <= 2 * k - 1
                for p in people:
                    assert owner.setdefault(p, gi) == gi, f"subject {p} split"
            assert not any(group_problems([subjects[g] for g in groups], k,
                                          {s: s for s in subjects}).values())


def test_random_groups_are_seeded_and_ignore_the_points() -> None:
    X = _points(40, seed=0)
    a = make_groups(X, 4, "random", seed=1)
    assert [g.tolist() for g in a] == [g.tolist() for g in make_groups(X * 100 + 3, 4, "random", seed=1)]
    assert [g.tolist() for g in a] != [g.tolist() for g in make_groups(X, 4, "random", seed=2)]
    sizes = sorted(len(g) for g in make_groups(_points(43, seed=0), 4, "random"))
    assert sizes == [4] * 7 + [5] * 3  # 43 = 10 groups, sizes differ by at most one


@pytest.mark.parametrize("method", ["greedy", "mdav", "random"])
def test_label_strata_make_pure_groups_and_pool_small_classes(method: str) -> None:
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(23), np.ones(12), np.full(3, 2), np.full(2, 3)].astype(int)
    rng.shuffle(labels)
    X = rng.normal(size=(len(labels), 3))
    groups = make_groups(X, 5, method, labels=labels)
    _assert_partition(groups, len(labels))
    assert all(5 <= len(g) <= 9 for g in groups)
    kinds = sorted(tuple(sorted(set(labels[g].tolist()))) for g in groups)
    # classes 0 and 1 pure; the 3 + 2 images of classes 2 and 3 pooled into one group of 5
    assert kinds == [(0,)] * 4 + [(1,)] * 2 + [(2, 3)]
    # a pool smaller than k joins the largest class: at k = 6, classes 2 + 3 (5 rows) go to class 0
    kinds6 = {tuple(sorted(set(labels[g].tolist()))) for g in make_groups(X, 6, method, labels=labels)}
    assert (1,) in kinds6 and all(set(c) <= {0, 2, 3} for c in kinds6 if c != (1,))
    assert any(2 in c or 3 in c for c in kinds6)


def test_label_strata_with_subjects_use_the_subjects_majority_label() -> None:
    subjects = np.repeat([f"pt{p}" for p in range(12)], 2)
    labels = np.repeat(np.r_[np.zeros(6), np.ones(6)].astype(int), 2)
    labels[0] = 1  # pt0: one eye grade 1, the other 0 -> majority tie -> the lower, 0
    groups = group_by_subject(_points(24, seed=0), subjects, 3, "random", labels=labels)
    for g in groups:
        people = set(subjects[g])
        assert 3 <= len(people) <= 5
        subject_labels = {int(labels[subjects == p].min()) if p == "pt0" else int(labels[subjects == p][0])
                          for p in people}
        assert len(subject_labels) == 1  # label-pure in people


def test_bad_grouping_labels_are_one_line_errors() -> None:
    with pytest.raises(MedVeilError, match=r"one integer class >= 0 per row \(6\)"):
        make_groups(_points(6, seed=0), 2, labels=np.zeros(5, dtype=int))
    with pytest.raises(MedVeilError, match="one integer class"):
        make_groups(_points(6, seed=0), 2, labels=np.full(6, -1))


def test_subject_grouping_uses_subject_means() -> None:
    # subject A's two rows average to 0, near B (0.1) and far from C/D (10, 10.1)
    X = np.array([-1.0, 1.0, 0.1, 10.0, 10.1])[:, None]
    groups = group_by_subject(X, ["A", "A", "B", "C", "D"], 2, "mdav")
    assert sorted(g.tolist() for g in groups) == [[0, 1, 2], [3, 4]]


def test_subject_id_errors() -> None:
    X = np.zeros((3, 2))
    with pytest.raises(MedVeilError, match="2 subject ids for 3 rows"):
        group_by_subject(X, ["a", "b"], 1)
    with pytest.raises(MedVeilError, match="subject id missing at row 1"):
        group_by_subject(X, ["a", "", "b"], 1)
    with pytest.raises(MedVeilError, match="only 2 distinct subjects"):
        group_by_subject(X, ["a", "a", "b"], 3)


def test_group_problems_names_what_breaks() -> None:
    probs = group_problems([["a", "b", "c"], ["d", "e"], ["c", "f", "g"]], 3)
    assert probs["k_anonymous"] == ["group 1 has 2 distinct members < k=3"]
    assert probs["members_disjoint"] == ["member c is in group 0 and group 2"]
    subj = {"a": 1, "b": 1, "c": 2, "d": 3, "e": 4, "f": 1, "g": 5}
    probs = group_problems([["a", "b", "c"], ["d", "e"], ["f", "g"]], 2, subj,
                           names=["x", "y", "z"])
    assert probs["k_anonymous"] == []
    assert probs["subjects_disjoint"] == ["subject 1 is in x and z"]


def test_group_means_and_k_same_pixel() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(9, 4, 4, 3), dtype=np.uint8)
    groups = [np.array([0, 3, 4]), np.array([1, 2, 5, 6]), np.array([7, 8])]
    means = group_means(images, groups)
    assert means.dtype == np.float64 and means.shape == (3, 4, 4, 3)
    np.testing.assert_allclose(means[1], images[[1, 2, 5, 6]].astype(float).mean(axis=0))
    pix = k_same_pixel(images, groups)
    assert pix.dtype == np.uint8
    np.testing.assert_array_equal(pix, np.rint(means).astype(np.uint8))
    with pytest.raises(MedVeilError, match="uint8 images"):
        k_same_pixel(images.astype(np.float32), groups)
    with pytest.raises(MedVeilError, match="group 1 is empty"):
        group_means(images, [np.array([0]), np.array([], dtype=int)])


def test_group_representatives() -> None:
    rng = np.random.default_rng(1)
    X = rng.normal(size=(30, 2, 3))
    groups = mdav_groups(X, 4)
    reps = group_representatives(X, groups)
    assert reps.shape == (len(groups),)
    for g, r in zip(groups, reps):
        centroid = X[g].mean(axis=0)
        d = ((X[g] - centroid) ** 2).sum(axis=(1, 2))
        assert r == g[np.argmin(d)]
    rand = group_representatives(X, groups, "random", seed=5)
    assert all(r in g for g, r in zip(groups, rand))
    assert np.array_equal(rand, group_representatives(X, groups, "random", seed=5))
    with pytest.raises(MedVeilError, match="unknown representative method"):
        group_representatives(X, groups, "medoid")


def test_moderate_scale_gives_exact_groups_of_k() -> None:
    """600 points in 256 dimensions, N a multiple of k: a partition into groups of exactly k
    (speed at scale is measured by the k-SALSA benchmark, not timed here)."""
    X = np.random.default_rng(0).normal(size=(600, 256)).astype(np.float32)
    for method in ("greedy", "mdav"):
        groups = make_groups(X, 5, method)
        _assert_partition(groups, 600)
        assert {len(g) for g in groups} == {5}
