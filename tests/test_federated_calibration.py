"""Head calibration (``[federation] calibrate_heads``): the head fit, and the last-stage round in
which the clients refit their heads on the final backbone and send back only the head."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fed_helpers import tiny_config
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from medveil.federated import client
from medveil.federated.calibration import fit_linear_head, local_calibrate
from medveil.federated.rebuild import build_backbone
from medveil.federated.engine import run_federation
from medveil.federated.sites import build_sites
from medveil.federated.training import extract_features


def blobs(n: int = 240, d: int = 6, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Imbalanced Gaussian classes (half of the samples in class 0), features on varied scales."""
    rng = np.random.default_rng(seed)
    y = np.where(rng.random(n) < 0.5, 0, rng.integers(1, classes, n))
    x = rng.normal(size=(n, d)) + 1.5 * np.eye(classes, d)[y]
    x = x * rng.uniform(0.1, 20.0, d) + rng.normal(0, 5, d)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


@pytest.mark.parametrize("weighting", ["none", "balanced"])
def test_head_is_scikit_learns_logistic_regression_on_raw_features(weighting):
    """Multinomial L2 logistic regression (C = 1) on standardised features, folded into a head on
    raw features: the same probabilities as scikit-learn's with the same class weights."""
    x, y = blobs()
    head = fit_linear_head(x, y, 3, "multi-class", weighting)
    assert head["weight"].shape == (3, 6) and head["bias"].shape == (3,) and head["weight"].dtype == torch.float32
    ours = torch.softmax(x.double() @ head["weight"].double().T + head["bias"].double(), 1).numpy()
    ref = make_pipeline(StandardScaler(), LogisticRegression(
        C=1.0, class_weight="balanced" if weighting == "balanced" else None, tol=1e-10, max_iter=5000))
    ref.fit(x.double().numpy(), y.numpy())
    np.testing.assert_allclose(ours, ref.predict_proba(x.double().numpy()), atol=2e-4)
    recall = [float((ours.argmax(1)[y.numpy() == c] == c).mean()) for c in range(3)]
    if weighting == "balanced":  # the minority classes are not given up for the majority
        assert min(recall) > 0.5


def test_head_for_multilabel_and_a_class_absent_from_the_train_split():
    x, y = blobs(classes=3, seed=1)
    head = fit_linear_head(x, y, 4, "multi-class", "balanced")  # class 3 has no sample
    logits = x @ head["weight"].T + head["bias"]
    assert torch.isfinite(logits).all() and (logits.argmax(1) != 3).all()
    multi = torch.stack([y == 0, x[:, 1] > x[:, 1].median()], 1).long()
    head = fit_linear_head(x, multi, 2, "multi-label", "balanced")
    pred = (x @ head["weight"].T + head["bias"]) > 0
    assert (pred == multi.bool()).float().mean() > 0.8


def test_calibration_round_refits_heads_on_the_final_backbone(tmp_path):
    """The last stage adds one round: each client reports the received model, refits its head on
    the frozen final backbone and sends back the head only. The backbone is the one of the same
    run without calibration; the heads are exactly the clients' fit on their train split."""
    plain = run_federation(tiny_config(tmp_path, "distill", rounds=1), tmp_path / "plain", progress=False)
    cfg = tiny_config(tmp_path, "distill", rounds=1, federation={"calibrate_heads": True})
    cal = run_federation(cfg, tmp_path / "cal", progress=False)
    last = cal["stages"][-1]
    assert last["calibration"]["calibrated"] == ["alpha", "beta"] and last["calibration"]["rejected"] == []
    model = torch.load(tmp_path / "cal" / "model.pt", map_location="cpu", weights_only=True)
    ref = torch.load(tmp_path / "plain" / "model.pt", map_location="cpu", weights_only=True)
    for key in model["model"]:
        assert torch.equal(model["model"][key], ref["model"][key]), key
    backbone = build_backbone(cfg.model.to_dict(), {k: v for k, v in model["model"].items()
                                                    if not k.startswith(("mask_token", "decoder_"))})
    clients, _ = build_sites(cfg.clients, cfg.data, cfg.model.img_size, cfg.model.in_chans, cfg.seed)
    for data in clients:
        info = last["clients"][data.name]
        # the uncalibrated universal model's metrics are kept: those of the plain run
        assert info["test_before_calibration"] == plain["stages"][-1]["clients"][data.name]["test"]
        assert info["bytes"]["calibrate_up"] < info["bytes"]["calibrate_down"] / 20  # a head, not a backbone
        expected = fit_linear_head(extract_features(backbone, data.x_train), data.y_train, data.num_classes,
                                   data.task, cfg.local.class_weighting)
        for key, value in expected.items():
            torch.testing.assert_close(model["extra"]["heads"][data.name][key], value, atol=1e-5, rtol=1e-4)
    assert "calibrate" in last["phase_seconds"] and (tmp_path / "cal" / "accuracy_by_stage.png").is_file()
    assert json.loads((tmp_path / "cal" / "metrics.json").read_text())["final"] == {
        n: last["clients"][n]["test"] for n in ("alpha", "beta")}


def test_a_bad_calibrated_head_is_rejected_and_the_old_head_kept(tmp_path, monkeypatch):
    def faulty(data, ins, recipe, seed, device="cpu"):
        update = local_calibrate(data, ins, recipe, seed, device)
        if data.name == "beta":
            update.head["weight"][0, 0] = float("nan")
        if data.name == "alpha":  # a head-only round must not carry a backbone
            update.backbone = dict(ins.backbone)
        return update

    monkeypatch.setattr(client, "local_calibrate", faulty)
    run_federation(tiny_config(tmp_path, "fedavg", rounds=1), tmp_path / "plain", progress=False)
    cfg = tiny_config(tmp_path, "fedavg", rounds=1, federation={"calibrate_heads": True})
    metrics = run_federation(cfg, tmp_path / "cal", progress=False)
    calibration = metrics["stages"][-1]["calibration"]
    assert calibration["calibrated"] == []
    reasons = {r["client"]: r["reason"] for r in calibration["rejected"]}
    assert "NaN or Inf" in reasons["beta"] and "unexpected keys" in reasons["alpha"]
    assert metrics["stages"][-1]["rejected"] == calibration["rejected"]  # fedavg's own updates were fine
    heads = torch.load(tmp_path / "cal" / "model.pt", map_location="cpu", weights_only=True)["extra"]["heads"]
    ref = torch.load(tmp_path / "plain" / "model.pt", map_location="cpu", weights_only=True)["extra"]["heads"]
    for name in ("alpha", "beta"):
        for key in heads[name]:
            assert torch.equal(heads[name][key], ref[name][key])
