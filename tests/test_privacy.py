"""Differential privacy of the sites' training: the accountant against Opacus' own, the noise plan,
the budget across stages (refusal, resume), DP-SGD on the ViT, and the config's bad input."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from fed_helpers import tiny_config

from medveil.errors import ConfigError
from medveil.federated.config import load_config
from medveil.federated.dp_site import DPSites
from medveil.federated.dp_training import dp_plan, dp_train_classifier, set_trainable
from medveil.federated.engine import run_federation
from medveil.federated.export import export_model
from medveil.federated.privacy import Ledger, PrivacyOptions, epsilon_of, plan_noise
from medveil.federated.training import TrainRecipe, new_head
from medveil.models import ViTConfig, VisionTransformer
from medveil.report.run_report import build_report

opacus = pytest.importorskip("opacus")


def entry(stage, steps, model="m0", noise=1.1, rate=0.05):
    return {"stage": stage, "model": model, "noise": noise, "rate": rate, "steps": steps}


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_ledger_epsilon_matches_opacus_accountant(kind):
    """Releases composed by the ledger = Opacus' accountant stepped the same number of times."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    delta = 1e-4
    ledger = Ledger("a", delta, kind, target_epsilon=100.0)
    for stage, steps in ((1, 40), (2, 40), (3, 25)):
        ledger.record(entry(stage, steps))
    acc = RDPAccountant() if kind == "rdp" else PRVAccountant()
    for _ in range(105):
        acc.step(noise_multiplier=1.1, sample_rate=0.05)
    assert ledger.epsilon() == pytest.approx(acc.get_epsilon(delta=delta), rel=1e-6 if kind == "rdp" else 2e-2)
    assert Ledger.from_json(json.loads(json.dumps(ledger.to_json()))) == ledger


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_noise_plan_fits_every_planned_stage_and_refuses_after(kind):
    opts = PrivacyOptions(dp=True, target_epsilon=3.0, accountant=kind)
    q, steps = 0.1, 30
    sigma = plan_noise(opts, q, steps, stages=3, delta=1e-3)
    ledger = Ledger("a", 1e-3, kind, target_epsilon=3.0)
    for stage in (1, 2, 3):
        ok, eps = ledger.allows(entry(stage, steps, noise=sigma, rate=q))
        assert ok, (stage, eps)
        ledger.record(entry(stage, steps, noise=sigma, rate=q))
    assert 2.7 <= ledger.epsilon() <= 3.0  # the plan spends the budget, not more
    ok, eps = ledger.allows(entry(4, steps, noise=sigma, rate=q))
    assert not ok and eps > 3.0
    before = ledger.epsilon()
    ledger.record(entry(2, steps, noise=sigma, rate=q))  # stage 2 again from the same model: the same update
    assert ledger.epsilon() == before and len(ledger.entries) == 3
    ok, _ = ledger.allows(entry(2, steps, model="another", noise=sigma, rate=q))  # another model: a new release
    assert not ok


def test_noise_plan_with_a_head_refit_keeps_room_for_it():
    """With the calibration round's head refit planned, the noise is the smallest that fits the
    stages and the refit; the refit is a release of its own in the ledger (work "calibrate"),
    distinct from the stage's training even from the same received model."""
    opts = PrivacyOptions(dp=True, target_epsilon=3.0)
    q, steps, refit = 0.1, 30, 20
    alone = plan_noise(opts, q, steps, stages=3, delta=1e-3)
    sigma = plan_noise(opts, q, steps, stages=3, delta=1e-3, calibration_steps=refit)
    assert sigma > alone
    assert epsilon_of([(sigma, q, 3 * steps + refit)], 1e-3, "rdp") <= 3.0  # one history = stage by stage (RDP)
    ledger = Ledger("a", 1e-3, "rdp", target_epsilon=3.0)
    for stage in (1, 2, 3):
        ledger.record(entry(stage, steps, noise=sigma, rate=q))
    calibrate = {**entry(3, refit, noise=sigma, rate=q), "work": "calibrate"}
    ok, eps = ledger.allows(calibrate)
    assert ok and 2.7 <= eps <= 3.0, eps
    ledger.record(calibrate)
    assert len(ledger.entries) == 4 and ledger.epsilon() == pytest.approx(eps)
    ledger.record(dict(calibrate))  # the same refit again (a resumed run): replaced, nothing new spent
    assert len(ledger.entries) == 4
    replan = {**calibrate, "noise": sigma * 1.1}  # the same refit with another plan would reuse its noise draw
    assert ledger.conflict(replan) == calibrate and ledger.conflict(dict(calibrate)) is None


def test_dp_head_refit_learns_from_fixed_features_and_is_seeded():
    """dp_fit_head: DP-SGD on the head alone over fixed features, calibration_epochs epochs at the
    stages' rate; the same secret gives the same head, another secret another one."""
    from medveil.federated.dp_training import dp_fit_head

    torch.manual_seed(0)
    y = torch.arange(120) % 3
    f = torch.randn(120, 8) * 0.3
    f[torch.arange(120), y] += 2.0
    opts = PrivacyOptions(dp=True, calibration_epochs=6)
    recipe = TrainRecipe(epochs=15, batch_size=20, lr=5e-4)

    def fit(secret):
        head = new_head(8, 3, 0)
        stats = dp_fit_head(head, f, y, "multi-class", recipe, opts, noise_multiplier=0.5, secret_seed=secret)
        assert stats["steps"] == 6 * 6  # 6 epochs of round(120 / 20) steps, not the 15 of a stage
        return head

    a, b, c = fit(5), fit(5), fit(6)
    assert torch.equal(a.weight, b.weight) and not torch.equal(a.weight, c.weight)
    with torch.no_grad():
        assert (a(f).argmax(1) == y).float().mean() > 0.9


def test_privacy_config_bad_input(tmp_path, monkeypatch):
    for privacy, message in (({"dp": True, "target_epsilon": 0.0}, "target_epsilon must be > 0"),
                             ({"dp": True, "accountant": "gdp"}, "accountant must be one of"),
                             ({"dp": True, "trainable": "some"}, "trainable must be one of"),
                             ({"dp": True, "lr_scale": 0.0}, "lr_scale must be > 0"),
                             ({"dp": True, "batch_size": -1}, "batch_size must be >= 0"),
                             ({"dp": True, "calibration_epochs": -1}, "calibration_epochs must be"),
                             ({"dp": True, "calibration_epochs": 1.5}, "calibration_epochs must be")):
        with pytest.raises(ConfigError, match=message):
            tiny_config(tmp_path, privacy=privacy)
    with pytest.raises(ConfigError, match="fedprox"):
        tiny_config(tmp_path, privacy={"dp": True}, local={"fedprox_mu": 0.1})
    with pytest.raises(ConfigError, match="class_weighting = 'none'"):  # weights from every private label
        tiny_config(tmp_path, privacy={"dp": True}, local={"class_weighting": "balanced"})
    with pytest.raises(ConfigError, match="spends epsilon"):  # too little noise for even one stage
        plan_noise(PrivacyOptions(dp=True, target_epsilon=1.0, noise_multiplier=0.3), 0.2, 50, 3, 1e-3)
    with pytest.raises(ConfigError, match="delta 0.05 is above 1/n for client 'alpha'"):  # 36 images
        run_federation(tiny_config(tmp_path, privacy={"dp": True, "delta": 0.05}), tmp_path / "loose", progress=False)
    assert not (tmp_path / "loose").exists()  # refused before anything is written
    twins = [{"name": "alpha", "path": str(tmp_path / "alpha.npz")}, {"name": "again", "path": str(tmp_path / "alpha.npz")}]
    with pytest.raises(ConfigError, match="clients 'alpha' and 'again' hold the same dataset"):
        run_federation(tiny_config(tmp_path, privacy={"dp": True}, clients=twins), tmp_path / "twins", progress=False)
    import builtins

    real_import = builtins.__import__

    def no_opacus(name, *args, **kwargs):
        if name == "opacus" or name.startswith("opacus."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_opacus)
    with pytest.raises(ConfigError, match=r"pip install 'medveil\[dp\]'"):
        tiny_config(tmp_path, privacy={"dp": True})


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_dp_sgd_trains_the_vit_and_freezes_what_has_no_per_example_gradient(stem):
    torch.manual_seed(0)
    cfg = ViTConfig(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2,
                    decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, stem=stem)
    vit, head = VisionTransformer(cfg), new_head(32, 3, 0)
    names = set_trainable(vit, head, "all")
    assert "cls_token" not in names and "pos_embed" not in names
    assert any(n.startswith("patch_embed") for n in names) == (stem == "conv")
    assert set_trainable(vit, head, "head") == []
    assert set(set_trainable(vit, head, "last_block")) == {n for n, _ in vit.named_parameters()
                                                             if n.startswith(("blocks.1.", "norm."))}
    y = torch.arange(96) % 3
    x = torch.rand(96, 1, 16, 16) * 0.3
    for i, c in enumerate(y):
        x[i, 0, 5 * c:5 * c + 5] += 0.7
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    recipe = TrainRecipe(epochs=4, batch_size=16, lr=2e-3)
    run = lambda: dp_train_classifier(vit, head, x, y, "multi-class", recipe,  # noqa: E731
                                      PrivacyOptions(dp=True), noise_multiplier=0.5, secret_seed=7)
    stats = run()
    assert stats["steps"] == dp_plan(96, recipe)[1] == 4 * 6
    assert torch.equal(vit.cls_token, before["cls_token"])  # frozen under DP
    assert not torch.equal(vit.blocks[0].attn.qkv.weight, before["blocks.0.attn.qkv.weight"])
    with torch.no_grad():
        acc = (head(vit.forward_features(x)).argmax(1) == y).float().mean()
    assert acc > 0.6, acc  # learns the bands through clipping and noise
    assert all(p.requires_grad for n, p in vit.named_parameters() if n != "pos_embed")  # restored


def test_lr_scale_multiplies_the_learning_rate_under_dp():
    """[privacy] lr_scale: DP-SGD runs at the [local] rate times it (lr 2e-3 x 1 == lr 5e-4 x 4)."""
    cfg = ViTConfig(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2,
                    decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    x, y = torch.rand(48, 1, 16, 16), torch.arange(48) % 3
    states = []
    for lr, scale in ((2e-3, 1.0), (5e-4, 4.0), (5e-4, 1.0)):
        torch.manual_seed(0)
        vit, head = VisionTransformer(cfg), new_head(32, 3, 0)
        dp_train_classifier(vit, head, x, y, "multi-class", TrainRecipe(epochs=1, batch_size=16, lr=lr),
                            PrivacyOptions(dp=True, lr_scale=scale), noise_multiplier=0.5, secret_seed=3)
        states.append(head.weight.detach().clone())
    assert torch.allclose(states[0], states[1], atol=1e-7) and not torch.allclose(states[0], states[2], atol=1e-5)


def test_privacy_batch_size_sets_the_dp_batch_and_the_accounted_rate():
    """[privacy] batch_size: DP-SGD samples with q = batch_size / n (steps round(1 / q) per epoch),
    and the plan the site accounts is the one it trains; 0 keeps the [local] batch size."""
    from medveil.federated.dp_training import dp_recipe

    recipe = TrainRecipe(epochs=2, batch_size=16, lr=1e-3)
    assert dp_recipe(recipe, PrivacyOptions(dp=True, lr_scale=4.0)) == replace(recipe, lr=4e-3)
    big = dp_recipe(recipe, PrivacyOptions(dp=True, batch_size=48, lr_scale=1.0))
    assert big.batch_size == 48 and dp_plan(96, big) == (0.5, 2 * 2)
    cfg = ViTConfig(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2,
                    decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    vit, head = VisionTransformer(cfg), new_head(32, 3, 0)
    stats = dp_train_classifier(vit, head, torch.rand(96, 1, 16, 16), torch.arange(96) % 3, "multi-class", recipe,
                                PrivacyOptions(dp=True, batch_size=48), noise_multiplier=0.5, secret_seed=3)
    assert stats["steps"] == 4


def test_one_examples_clipped_gradient_does_not_depend_on_the_others():
    """The per-example gradient Opacus clips is the same alone or in any batch (no batch norm, no
    class weights renormalised over the batch)."""
    from opacus import GradSampleModule

    from medveil.federated.dp_training import _Classifier, per_example_loss

    torch.manual_seed(0)
    cfg = ViTConfig(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2,
                    decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, stem="conv")
    vit, head = VisionTransformer(cfg), new_head(32, 3, 0)
    set_trainable(vit, head, "all")
    model = GradSampleModule(_Classifier(vit, head), loss_reduction="sum")
    x, y = torch.rand(6, 1, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])

    def grads(idx):
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.grad_sample = None
        per_example_loss(model(x[idx]), y[idx], "multi-class", 0.1).sum().backward()
        return [p.grad_sample[list(idx).index(0)].clone() for p in model.parameters() if p.requires_grad]

    alone, batch = grads([0]), grads([3, 0, 5, 1])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(alone, batch, strict=True))
    model._close()


def tiny_dp_config(folder, **privacy):
    return tiny_config(folder, "fedavg", rounds=2, privacy={"dp": True, **privacy},
                       federation={"calibrate_heads": True},
                       local={"epochs": 1, "batch_size": 16, "lr": 1e-3, "schedule": "cosine", "warmup_epochs": 0.5})


@pytest.mark.slow
def test_federation_under_dp_spends_reports_and_resumes_identically(tmp_path):
    cfg = tiny_dp_config(tmp_path, target_epsilon=4.0, calibration_epochs=0)
    sites_a = tmp_path / "sites_a"
    full = run_federation(cfg, tmp_path / "full", progress=False, client_fit=DPSites(cfg.privacy, sites_a, 2))
    for name in ("alpha", "beta"):
        eps = [s["clients"][name]["fit"]["epsilon"] for s in full["stages"][1:]]
        assert eps[0] < eps[1] <= 4.0  # composed across stages, within the target
        ledger = json.loads((sites_a / name / "privacy.json").read_text())
        assert ledger["epsilon"] == pytest.approx(eps[1]) and [e["stage"] for e in ledger["entries"]] == [1, 2]
        assert "train_loss" not in full["stages"][1]["clients"][name]["fit"]  # only public parameters leave
        assert full["privacy"][name]["epsilon"] == pytest.approx(eps[1])
    assert "skipped" in full["stages"][-1]["calibration"]  # no head refit outside DP-SGD (calibration_epochs 0)
    export_model(tmp_path / "full" / "model.pt", tmp_path / "export")  # the model card states the budget
    card = (tmp_path / "export" / "README.md").read_text()
    assert "Differential privacy (DP-SGD)" in card and f"| alpha | {full['privacy']['alpha']['epsilon']:.2f} |" in card
    build_report(tmp_path / "full", tmp_path / "report.html")
    assert "DP epsilon spent" in (tmp_path / "report.html").read_text()
    # the same sites (same secrets), killed after stage 1 and resumed: the same model and budget
    sites_b = tmp_path / "sites_b"
    for name in ("alpha", "beta"):
        (sites_b / name).mkdir(parents=True)
        (sites_b / name / "secret").write_text((sites_a / name / "secret").read_text())
    part = tmp_path / "part"
    fit_b = DPSites(cfg.privacy, sites_b, 2)
    assert run_federation(cfg, part, max_stages=2, progress=False, client_fit=fit_b)["complete"] is False
    resumed = run_federation(load_config(part / "config.toml"), part, resume=True, progress=False, client_fit=fit_b)
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)["model"]
    b = torch.load(part / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["privacy"] == full["privacy"]
    for name in ("alpha", "beta"):
        assert json.loads((sites_b / name / "privacy.json").read_text()) == \
            json.loads((sites_a / name / "privacy.json").read_text())


@pytest.mark.slow
def test_under_dp_the_calibration_round_refits_heads_with_dp_sgd_within_the_budget(tmp_path):
    """[privacy] calibration_epochs > 0: the last round refits each head by DP-SGD in the pool's
    feature basis, a third release in each site's ledger, planned from the start so the total
    stays within the target; killed after stage 1 and resumed, the same model and ledgers."""
    cfg = tiny_dp_config(tmp_path, target_epsilon=4.0, calibration_epochs=2, calibration_dims=8)
    metrics = run_federation(cfg, tmp_path / "run", progress=False)
    last = metrics["stages"][-1]
    assert sorted(last["calibration"]["calibrated"]) == ["alpha", "beta"]
    assert last["calibration"]["basis_dims"] == 8
    for name in ("alpha", "beta"):
        ledger = json.loads((tmp_path / "run" / "sites" / name / "privacy.json").read_text())
        assert [e.get("work", "fit") for e in ledger["entries"]] == ["fit", "fit", "calibrate"]
        stage_eps = last["clients"][name]["fit"]["epsilon"]
        assert stage_eps < ledger["epsilon"] <= 4.0 and ledger["epsilon"] > 3.6  # planned: the budget spent
        assert metrics["privacy"][name]["epsilon"] == pytest.approx(ledger["epsilon"])
        assert last["calibration"]["dp"][name]["epsilon"] == pytest.approx(ledger["epsilon"])
        refit = ledger["entries"][-1]
        assert refit["steps"] == last["calibration"]["dp"][name]["dp_steps"] == 2 * round(1 / refit["rate"])
    sites_b = tmp_path / "sites_b"
    for name in ("alpha", "beta"):
        (sites_b / name).mkdir(parents=True)
        (sites_b / name / "secret").write_text((tmp_path / "run" / "sites" / name / "secret").read_text())
    fit_b = DPSites(cfg.privacy, sites_b, 2, planned_calibration=True)
    run_federation(cfg, tmp_path / "part", max_stages=2, progress=False, client_fit=fit_b)
    resumed = run_federation(load_config(tmp_path / "part" / "config.toml"), tmp_path / "part", resume=True,
                             progress=False, client_fit=fit_b)
    a = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "model.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    heads_a, heads_b = a["extra"]["heads"], b["extra"]["heads"]  # the refit heads too
    assert all(torch.equal(heads_a[n][k], heads_b[n][k]) for n in heads_a for k in heads_a[n])
    assert resumed["privacy"] == metrics["privacy"]


@pytest.mark.slow
def test_a_stage_released_but_not_checkpointed_is_sent_again_unchanged_on_resume(tmp_path):
    """A crash after a site's ledger recorded stage 1 but before the stage checkpoint: on resume the
    site is asked for stage 1 again with the same model and setup, sends the same update and counts
    it once (no site absent, the ledger unchanged)."""
    cfg = tiny_dp_config(tmp_path, calibration_epochs=0)
    run_federation(cfg, tmp_path / "run", progress=False, max_stages=2)
    ledger = (tmp_path / "run" / "sites" / "alpha" / "privacy.json").read_text()
    (tmp_path / "run" / "checkpoints" / "stage_001.pt").unlink()
    metrics = run_federation(load_config(tmp_path / "run" / "config.toml"), tmp_path / "run", resume=True,
                             progress=False, max_stages=2)
    assert not metrics["stages"][1]["absent"] and metrics["stages"][1]["participants"] == ["alpha", "beta"]
    assert (tmp_path / "run" / "sites" / "alpha" / "privacy.json").read_text() == ledger


@pytest.mark.slow
def test_a_site_over_budget_is_absent_with_the_reason(tmp_path):
    q, steps = dp_plan(36, TrainRecipe(epochs=1, batch_size=16))  # alpha: 48 train images, 25 % pooled
    one_stage = epsilon_of([(1.0, q, steps)], 1 / 360, "rdp")
    with pytest.raises(ConfigError, match="custom client_fit"):  # DP is never skipped silently
        run_federation(tiny_dp_config(tmp_path), tmp_path / "custom", progress=False,
                       client_fit=lambda *a, **k: None)
    with pytest.raises(ConfigError, match="does not plan the run's head refit"):  # refused before anything is written
        run_federation(tiny_dp_config(tmp_path, calibration_epochs=2), tmp_path / "unplanned", progress=False,
                       client_fit=DPSites(PrivacyOptions(dp=True), tmp_path / "s", 2))
    assert not (tmp_path / "unplanned").exists()
    cfg = tiny_dp_config(tmp_path, noise_multiplier=1.0, target_epsilon=1.2 * one_stage)
    metrics = run_federation(cfg, tmp_path / "run", progress=False)  # default: RUN/sites/<name>/
    assert (tmp_path / "run" / "sites" / "alpha" / "privacy.json").is_file()
    stage2 = metrics["stages"][2]
    reasons = {a["client"]: a["reason"] for a in stage2["absent"]}
    assert "alpha" in reasons and "privacy budget" in reasons["alpha"], stage2["absent"]
    assert metrics["privacy"]["alpha"]["epsilon"] <= cfg.privacy.target_epsilon


def test_a_flower_site_keeps_its_own_privacy_terms(tmp_path):
    """Over Flower the coordinator proposes; the site decides: no head refit outside DP-SGD, and
    with its own --max-epsilon no training without DP and a ceiling that the run cannot raise."""
    from types import SimpleNamespace

    pytest.importorskip("flwr")
    from medveil.errors import SiteRefused
    from medveil.federated.dp_site import DPSites
    from medveil.federated.flower.app import _site_fit

    dp_site = {"privacy": {"dp": True, "target_epsilon": 8.0, "calibration_epochs": 0}, "planned_stages": 2}
    ctx = SimpleNamespace(node_config={"state-dir": str(tmp_path), "max-epsilon": 2.0})
    with pytest.raises(SiteRefused, match="outside DP-SGD"):
        _site_fit(ctx, dp_site, calibrate=True)
    with pytest.raises(SiteRefused, match="only with differential privacy"):
        _site_fit(ctx, {}, calibrate=False)
    fit = _site_fit(ctx, dp_site, calibrate=False)
    assert isinstance(fit, DPSites) and fit.target == 2.0  # the stricter of 8 (run) and 2 (site)
    refit = {"privacy": {"dp": True, "target_epsilon": 8.0, "calibration_epochs": 2}, "planned_stages": 2,
             "planned_calibration": True}
    fit = _site_fit(ctx, refit, calibrate=True)  # the run plans the head refit with DP-SGD: the site does it
    assert isinstance(fit, DPSites) and fit.planned_calibration
    with pytest.raises(ConfigError, match="state-dir"):
        _site_fit(SimpleNamespace(node_config={}), dp_site, calibrate=False)


def test_a_site_refuses_what_would_weaken_its_guarantee(tmp_path):
    """A stage asked again from the same model with another setup (here: the clipping norm) would
    reuse its noise draw on another function of the data; a delta of 1/n or more; its dataset
    spending under a second site name; two trainings at once are serialised on the ledger."""
    import threading
    import time

    from medveil.errors import SiteRefused
    from medveil.federated.messages import FitInstructions
    from medveil.federated.sites import build_sites

    cfg = tiny_dp_config(tmp_path, calibration_epochs=0)
    clients, _ = build_sites(cfg.clients, cfg.data, 16, 3, cfg.seed)
    alpha = clients[0]
    vit = VisionTransformer(ViTConfig(**cfg.model.to_dict()))
    ins = FitInstructions(client_name="alpha", stage=1, model_config=cfg.model.to_dict(),
                          backbone=vit.state_dict(), head=new_head(vit.feature_dim, alpha.num_classes, 0).state_dict())
    recipe = TrainRecipe(epochs=1, batch_size=16)
    root = tmp_path / "state"
    first = DPSites(cfg.privacy, root, 2)(alpha, ins, recipe, 0)
    again = DPSites(cfg.privacy, root, 2)(alpha, ins, recipe, 0)  # the same release (a resumed run): same update
    assert all(torch.equal(first.head[k], again.head[k]) for k in first.head)
    assert len(json.loads((root / "alpha" / "privacy.json").read_text())["entries"]) == 1
    with pytest.raises(SiteRefused, match="another DP plan or setup"):
        DPSites(replace(cfg.privacy, max_grad_norm=2.0), root, 2)(alpha, ins, recipe, 0)
    with pytest.raises(SiteRefused, match="another DP plan or setup"):
        DPSites(cfg.privacy, root, 2)(alpha, ins, replace(recipe, lr=recipe.lr * 2), 0)
    with pytest.raises(SiteRefused, match="above 1/n"):
        DPSites(replace(cfg.privacy, delta=0.5), tmp_path / "loose", 2)(alpha, ins, recipe, 0)
    renamed = replace(alpha, name="alias")
    with pytest.raises(SiteRefused, match="already spends its budget as site 'alpha'"):
        DPSites(cfg.privacy, root, 2)(renamed, replace(ins, client_name="alias"), recipe, 0)
    sites, spans = DPSites(cfg.privacy, root, 2), []

    def hold():
        with sites._locked(alpha):
            start = time.monotonic()
            time.sleep(0.2)
            spans.append((start, time.monotonic()))

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (a0, a1), (b0, b1) = sorted(spans)
    assert b0 >= a1  # the second waited for the first
