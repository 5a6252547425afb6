"""Privacy attacks on a release: top-k precision, the linkage attack's power on a leaking
release vs a non-leaking one, and features computed once per image array."""

from __future__ import annotations

import numpy as np
import pytest

from medveil.evaluate.linkage import FeatureCache, label_chance, linkage_privacy, topk_precision
from medveil.models.features import build_feature_net

SPEC = "random-conv:seed=0,width=8"


def test_topk_precision_counts_members_among_the_best_ranked():
    scores = np.array([[0.9, 0.8, 0.1, 0.0],   # members {0, 1}: both on top -> 1.0
                       [0.9, 0.1, 0.8, 0.0]])  # members {1, 3}: neither on top -> 0.0
    r = topk_precision(scores, [np.array([0, 1]), np.array([1, 3])], k=2)
    assert r["topk_precision"] == 0.5 and r["chance"] == 0.5 and r["k"] == 2


def test_label_chance_is_the_oracle_label_attacker_top_k_precision():
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    # pure group of label 0: top 2 drawn from the 4 zeros -> 2/4; pure label 1 (2 of them) -> 1
    assert label_chance([np.array([0, 1])], np.array([0]), labels, k=2) == pytest.approx(0.5)
    assert label_chance([np.array([4, 5])], np.array([1]), labels, k=2) == pytest.approx(1.0)
    # tier smaller than k: both ones, then 1 of the 8 others, of which 1 is a member
    assert label_chance([np.array([4, 5, 0])], np.array([1]), labels, k=3) == pytest.approx(
        (2 + 1 / 8) / 3)
    # against the attacker itself: label match first, random tie-break, many draws
    groups = [np.array([0, 1, 6]), np.array([4, 5, 2]), np.array([7, 8, 9])]
    syn = np.array([0, 1, 2])
    rng = np.random.default_rng(0)
    draws = [topk_precision((labels[None, :] == syn[:, None]) + rng.random((3, 10)) * 0.5,
                            groups, k=3)["topk_precision"] for _ in range(4000)]
    assert np.mean(draws) == pytest.approx(label_chance(groups, syn, labels, k=3), abs=0.01)


def _people(n: int, seed: int) -> np.ndarray:
    """n distinct 'people': smooth random colour fields, uint8 (n, 16, 16, 3)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(n, 4, 4, 3))
    return np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2).astype(np.uint8)


def _release(real: np.ndarray, k: int, leak: bool, seed: int):
    groups = [np.arange(i, i + k) for i in range(0, len(real), k)]
    if leak:  # each synthetic image is its first member, barely changed: linkable
        syn = np.stack([real[g[0]] for g in groups])
    else:  # unrelated images: nothing to link
        syn = _people(len(groups), seed + 100)
    return syn, groups


@pytest.mark.parametrize("leak", [True, False])
def test_linkage_attack_finds_leaks_and_not_noise(leak):
    net = build_feature_net(SPEC)
    k = 2
    train_real, test_real = _people(80, 0), _people(40, 1)
    train_syn, train_groups = _release(train_real, k, leak, 0)
    test_syn, test_groups = _release(test_real, k, leak, 1)
    r = linkage_privacy(net, 16, k, train_real, train_syn, train_groups, test_real, test_syn,
                        test_groups)
    chance = r["linkage"]["chance"]
    assert chance == pytest.approx(k / 40)
    if leak:
        assert r["linkage"]["topk_precision"] >= 0.45  # the copied member is found (max 0.5)
        assert r["nn_reid"]["nn_reid_rate"] == 1.0
    else:
        assert r["linkage"]["topk_precision"] < 0.25
        assert r["nn_reid"]["nn_reid_rate"] < 0.3


def test_feature_cache_embeds_each_array_once():
    net = build_feature_net(SPEC)
    calls = []
    embed = net.embed
    net.embed = lambda x: calls.append(len(x)) or embed(x)  # type: ignore[method-assign]
    cache = FeatureCache(net, 16)
    a, b = _people(10, 0), _people(6, 1)
    emb_a, thumb_a = cache(a)
    cache(a)
    cache(b)
    assert sum(calls) == 16  # a once, b once
    assert emb_a.shape == (10, net.dim) and thumb_a.shape == (10, 3 * 8 * 8)
    # a cache shared by calls gives the same result as a fresh one
    syn, groups = _release(a, 2, True, 0)
    shared = linkage_privacy(net, 16, 2, a, syn, groups, a, syn, groups, features=cache)
    fresh = linkage_privacy(net, 16, 2, a, syn, groups, a, syn, groups)
    assert shared["linkage"] == fresh["linkage"]
