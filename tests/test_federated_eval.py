"""Metrics on hand-computed examples, statistics, probes and `medveil evaluate`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from medveil.cli.main import main
from medveil.metrics import (
    balanced_accuracy,
    classification_metrics,
    macro_auc,
    quadratic_kappa,
)
from medveil.evaluate.stats import format_mean_std, mean_std, paired_tests
from medveil.federated.baselines import centralised, local_only
from medveil.federated.engine import run_federation
from medveil.federated.sites import build_sites
from medveil.federated.training import TrainRecipe

from fed_helpers import tiny_config


def test_quadratic_kappa_hand_computed():
    # 3 grades, weights w_ij = (i - j)^2 / 4. Observed counts (rows true, cols predicted):
    # O = [[1,1,0],[0,1,0],[0,1,1]] -> sum w*O = 1/4 + 1/4 = 0.5.
    # Expected E = outer(row sums (2,1,2), col sums (1,3,1)) / 5 = [[2,6,2],[1,3,1],[2,6,2]] / 5
    # -> sum w*E = (0.25*6 + 1*2 + 0.25*1 + 0.25*1 + 1*2 + 0.25*6) / 5 = 1.5; kappa = 1 - 0.5/1.5.
    y_true = np.array([0, 0, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 2])
    assert quadratic_kappa(y_true, y_pred) == pytest.approx(2 / 3)
    assert quadratic_kappa(y_true, y_true) == pytest.approx(1.0)
    # off by two grades costs four times as much as off by one
    assert quadratic_kappa(np.array([0, 1, 2, 0]), np.array([0, 1, 2, 2])) < \
        quadratic_kappa(np.array([0, 1, 2, 0]), np.array([0, 1, 2, 1]))


def test_balanced_accuracy_and_auc_hand_computed():
    y_true = np.array([0, 0, 0, 0, 1, 1])
    y_pred = np.array([0, 0, 0, 1, 1, 0])
    assert balanced_accuracy(y_true, y_pred) == pytest.approx((3 / 4 + 1 / 2) / 2)
    # binary AUC from 2-column logits: positives score 0.9 and 0.3; negatives 0.1 0.2 0.4 0.8
    p1 = np.array([0.1, 0.2, 0.4, 0.8, 0.9, 0.3])
    logits = np.log(np.stack([1 - p1, p1], axis=1))
    # pairs (pos > neg): 0.9 beats 4, 0.3 beats 2 -> 6/8; class-0 AUC is the same by symmetry
    assert macro_auc(y_true, logits) == pytest.approx(6 / 8)
    m = classification_metrics("binary", y_true, logits)
    assert m["acc"] == pytest.approx(4 / 6) and m["auc"] == pytest.approx(0.75) and "qwk" not in m
    # a class absent from the test labels is left out of the macro AUC instead of raising
    three = np.array([[2.0, 0, 0], [0, 2.0, 0], [0, 0.5, 1.0], [1.0, 0, 0]])
    assert macro_auc(np.array([0, 1, 1, 0]), three) == pytest.approx(1.0)
    assert "qwk" in classification_metrics("ordinal", np.array([0, 1, 1, 0]), three)


def test_multilabel_metrics():
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    logits = np.array([[2.0, -1], [-1, 2], [1, -1], [-2, -2]])
    m = classification_metrics("multi-label", y, logits)
    assert m["acc"] == pytest.approx((4 / 4 + 3 / 4) / 2)
    # label 0: both positives above both negatives (1.0); label 1: positives (2, -1) vs
    # negatives (-1, -2): 3 wins + 1 tie of 4 pairs = 0.875
    assert m["auc"] == pytest.approx((1.0 + 0.875) / 2)


def test_stats_mean_std_and_paired_tests():
    assert mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert mean_std([0.5]) == (0.5, 0.0)
    assert math.isnan(mean_std([])[0])
    assert format_mean_std([0.8, 0.9]) == "85.0 ± 7.1"
    a = [0.9, 0.8, 0.85, 0.7, 0.95, 0.6]
    b = [x - d for x, d in zip(a, [0.01, 0.02, 0.03, 0.04, 0.05, 0.06], strict=True)]
    r = paired_tests(a, b)
    assert r["n"] == 6 and r["wins"] == 6 and r["losses"] == 0
    assert r["wilcoxon_p"] == pytest.approx(2 / 2**6)  # exact: all 6 differences positive
    d = np.array([0.01, 0.02, 0.03, 0.04, 0.05, 0.06])
    t = d.mean() / (d.std(ddof=1) / np.sqrt(6))
    assert r["t_stat"] == pytest.approx(t) and r["mean_diff"] == pytest.approx(0.035)
    same = paired_tests([0.5, 0.6], [0.5, 0.6])
    assert same["wilcoxon_p"] == 1.0 and same["ties"] == 2
    assert paired_tests([0.5, float("nan")], [0.4, 0.3])["n"] == 1


def test_baselines_and_evaluate_command(tmp_path, capsys):
    cfg = tiny_config(tmp_path, strategy="fedavg", rounds=1)
    clients, _ = build_sites(cfg.clients, cfg.data, 16, 3, cfg.seed)
    recipe = TrainRecipe(epochs=3, batch_size=16, lr=2e-3)
    local = local_only(cfg.model, clients, recipe, seed=0)
    assert set(local) == {"alpha", "beta"} and all(0 <= m["acc"] <= 1 for m in local.values())
    run_federation(cfg, tmp_path / "run", progress=False)
    assert main(["evaluate", str(tmp_path / "run"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "alpha" in out and "mim_only" in out
    result = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    for source in ("final", "mim_only"):
        for kind in ("probe", "finetune"):
            assert 0.0 <= result[source]["beta"][kind]["acc"] <= 1.0
    # the band datasets are linearly separable from raw pixels: the probe must beat chance clearly
    assert result["final"]["alpha"]["probe"]["acc"] > 0.6
    stage0 = torch.load(tmp_path / "run" / "checkpoints" / "stage_000.pt", weights_only=True)
    state = {k: v for k, v in stage0["model"].items() if not k.startswith(("decoder_", "mask_token"))}
    pooled = centralised(cfg.model, state, clients, recipe, seed=0)
    assert set(pooled) == {"alpha", "beta"} and all(0 <= m["acc"] <= 1 for m in pooled.values())


@pytest.mark.parametrize("weighting", ["none", "balanced"])
def test_centralised_uses_the_clients_recipe(tmp_path, monkeypatch, weighting):
    """The pooled upper bound trains like the clients do: each sample's loss weighted by its own
    client's inverse-frequency class weights when the recipe says "balanced", heads at
    head_lr_scale x the backbone's learning rate."""
    import medveil.federated.baselines as baselines
    from medveil.federated.training import balanced_weights, task_loss
    from medveil.models import VisionTransformer

    cfg = tiny_config(tmp_path, strategy="fedavg", rounds=1)
    clients, _ = build_sites(cfg.clients, cfg.data, 16, 3, cfg.seed)
    clients[0].y_train[: len(clients[0].y_train) * 3 // 4] = 0  # make one client imbalanced
    used: list[torch.Tensor | None] = []

    def spy(logits, y, task, weight=None, smoothing=0.0):
        used.append(weight)
        return task_loss(logits, y, task, weight, smoothing)

    lrs: list[list[float]] = []
    real_adamw = torch.optim.AdamW

    def adamw(groups, **kw):
        opt = real_adamw(groups, **kw)
        lrs.append([g["lr"] for g in opt.param_groups])
        return opt

    monkeypatch.setattr(baselines, "task_loss", spy)
    monkeypatch.setattr(baselines.torch.optim, "AdamW", adamw)
    recipe = TrainRecipe(epochs=1, batch_size=16, lr=1e-3, class_weighting=weighting)
    state = VisionTransformer(cfg.model, num_classes=0).state_dict()
    baselines.centralised(cfg.model, state, clients, recipe, seed=0)
    if weighting == "none":
        assert used and all(w is None for w in used)
    else:
        expected = [balanced_weights(d.y_train, d.num_classes, d.task) for d in clients]
        assert expected[0].max() > 1.5  # the imbalanced client's rare classes weigh more
        for w in expected:
            assert any(u is not None and torch.equal(u, w) for u in used)
        assert all(u is not None for u in used)
    assert lrs == [[1e-3, 1e-3 * recipe.head_lr_scale]]
