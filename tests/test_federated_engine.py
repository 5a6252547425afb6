"""The in-process engine: run folder, resume == uninterrupted, rejected updates, bad input, CLI."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from medveil.cli.main import main
from medveil.errors import ConfigError, DataError, MedVeilError
from medveil.federated.client import local_fit
from medveil.federated.config import dump_toml, load_config
from medveil.federated.engine import run_federation
from medveil.federated.universal import load_universal
from medveil.federated.sites import build_sites, load_pool

from fed_helpers import make_npz, tiny_config


def model_tensors(path):
    return torch.load(path, map_location="cpu", weights_only=True)


RECIPES = {"default": {},
           # the convolutional stem with flips + warm-up / cosine (issue 18's recipe levers)
           "conv_flip_cos": {"model": {"stem": "conv"},
                             "local": {"augment": "flip", "schedule": "cosine", "warmup_epochs": 0.5}},
           # heads on [cls, mean of patch tokens] (2D wide) through training, curation and calibration
           "token_avg_calibrated": {"model": {"global_pool": "token+avg"},
                                    "federation": {"calibrate_heads": True}}}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_run_folder_and_resume_identical_to_uninterrupted(tmp_path, recipe):
    cfg = tiny_config(tmp_path, strategy="distill", rounds=2, **RECIPES[recipe])
    full = run_federation(cfg, tmp_path / "full", progress=False)
    run = tmp_path / "full"
    for name in ("config.toml", "metrics.json", "model.pt", "accuracy_by_stage.png", "complete"):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["stage_000.pt", "stage_002.pt", "updates.pt"]
    metrics = json.loads((run / "metrics.json").read_text())
    stage = metrics["stages"][1]
    assert stage["participants"] == ["alpha", "beta"]
    for name in ("alpha", "beta"):
        info = stage["clients"][name]
        assert info["bytes"]["fit_down"] > 10_000 and info["bytes"]["fit_up"] > 10_000
        assert 0.0 <= info["test"]["acc"] <= 1.0 and info["test"]["n"] > 0
    assert stage["curation"][0]["aggregated"] == 2
    assert set(metrics["final"]) == {"alpha", "beta"}
    universal = load_universal(run / "model.pt")
    assert universal.registry["beta"].num_classes == 2
    assert universal.heads["beta"].in_features == universal.cfg.feature_dim
    assert universal.predict("beta", torch.rand(3, 3, 16, 16)).shape == (3, 2)
    with pytest.raises(MedVeilError, match="no task 'gamma'"):
        universal.predict("gamma", torch.rand(1, 3, 16, 16))

    # "killed" after stage 1: no complete marker, no final metrics; resume finishes it
    part = tmp_path / "part"
    partial = run_federation(cfg, part, max_stages=2, progress=False)
    assert partial["complete"] is False
    assert not (part / "complete").exists() and not (part / "metrics.json").exists()
    with pytest.raises(ConfigError, match="--resume"):
        run_federation(cfg, part, progress=False)
    resumed = run_federation(load_config(part / "config.toml"), part, resume=True, progress=False)
    a, b = model_tensors(run / "model.pt"), model_tensors(part / "model.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for name in a["extra"]["heads"]:
        for key in a["extra"]["heads"][name]:
            assert torch.equal(a["extra"]["heads"][name][key], b["extra"]["heads"][name][key])
    strip = lambda ms: [{k: v for k, v in s.items() if k not in ("seconds", "cpu_seconds", "phase_seconds")} for s in ms]  # noqa: E731
    assert strip(full["stages"]) == strip(resumed["stages"])
    # a complete run refuses to be overwritten, and the config round-trips through TOML
    with pytest.raises(ConfigError, match="complete run"):
        run_federation(cfg, run, progress=False)
    assert load_config(run / "config.toml").to_dict() == cfg.to_dict()
    assert dump_toml(load_config(run / "config.toml")) == dump_toml(cfg)


@pytest.mark.parametrize("strategy", ["fedavg", "relay"])
def test_stage_evaluated_in_next_training_round_equals_its_own_round(tmp_path, strategy):
    """Stage 1 of a 2-stage run is evaluated inside stage 2's training messages (relay: alpha
    there, beta, who trains later, in an evaluation-only round); a 1-stage run evaluates the
    same stage-1 model in a round of its own: the same test metrics."""
    two = run_federation(tiny_config(tmp_path, strategy, rounds=2), tmp_path / "two", progress=False)
    one = run_federation(tiny_config(tmp_path, strategy, rounds=1), tmp_path / "one", progress=False)
    fused, alone = two["stages"][1], one["stages"][1]
    assert fused["evaluation"] == "next stage" and "evaluate_next" not in fused
    assert alone["evaluation"] == two["stages"][2]["evaluation"] == "own round"
    for name in ("alpha", "beta"):
        assert fused["clients"][name]["test"] == alone["clients"][name]["test"]
        assert fused["clients"][name]["bytes"]["eval_up"] == alone["clients"][name]["bytes"]["eval_up"]
    assert "eval_down" not in fused["clients"]["alpha"]["bytes"]  # the model came with training
    assert ("eval_down" in fused["clients"]["beta"]["bytes"]) == (strategy == "relay")


def test_poisoned_update_is_rejected_logged_and_not_aggregated(tmp_path):
    cfg = tiny_config(tmp_path, strategy="fedavg", rounds=1)
    seen = {}

    def client_fit(data, ins, recipe, seed, device="cpu"):
        update = local_fit(data, ins, recipe, seed, device)
        if data.name == "beta":
            update.backbone["blocks.0.norm1.weight"][0] = math.nan
        seen[data.name] = update
        return update

    metrics = run_federation(cfg, tmp_path / "run", progress=False, client_fit=client_fit)
    rejected = metrics["stages"][1]["rejected"]
    assert [r["client"] for r in rejected] == ["beta"]
    assert "NaN or Inf" in rejected[0]["reason"]
    model = model_tensors(tmp_path / "run" / "model.pt")["model"]
    for key, value in seen["alpha"].backbone.items():  # FedAvg of the one good update
        assert torch.equal(model[key], value), key
    assert all(torch.isfinite(v).all() for v in model.values())


def test_sites_hold_the_pool_apart(tmp_path):
    cfg = tiny_config(tmp_path)
    clients, pool = build_sites(cfg.clients, cfg.data, 16, 3, cfg.seed)
    assert [len(c.x_train) for c in clients] == [36, 30]  # 48 and 40 minus 25% for the pool
    assert len(pool) == 12 + 10
    assert pool.shape[1:] == (3, 16, 16) and clients[0].x_train.shape[1:] == (3, 16, 16)
    flat_pool = {tuple(x.flatten().tolist()) for x in pool}
    for c in clients:
        assert not flat_pool & {tuple(x.flatten().tolist()) for x in c.x_train}


def test_unused_train_images_are_held_out_apart_from_members_and_pool(tmp_path):
    """eval_split "unused-train" (the audit's population non-members): train images that neither the
    client (max_train 20 of alpha's 36) nor the pool uses; the members stay the same images."""
    cfg = tiny_config(tmp_path, data={"max_train": 20})
    (alpha, _), (held, pool) = [build_sites(cfg.clients, replace(cfg.data, eval_split=split), 16, 3, cfg.seed)
                                 for split in ("test", "unused-train")]
    assert torch.equal(alpha[0].x_train, held[0].x_train) and len(held[0].x_test) == 36 - 20
    flat = {tuple(x.flatten().tolist()) for x in held[0].x_train} | {tuple(x.flatten().tolist()) for x in pool}
    assert not flat & {tuple(x.flatten().tolist()) for x in held[0].x_test}
    with pytest.raises(DataError, match="none is left unused"):  # every train image outside the pool in use
        build_sites(cfg.clients, replace(cfg.data, eval_split="unused-train", max_train=0), 16, 3, cfg.seed)


def test_pool_folder_and_empty_pool(tmp_path):
    folder = tmp_path / "pool"
    (folder / "sub").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((20, 24), 40 * i, np.uint8)).save(folder / "sub" / f"{i}.png")
    pool = load_pool(folder, 16, 3)
    assert pool.shape == (3, 3, 16, 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        load_pool(tmp_path / "empty", 16, 3)
    cfg = tiny_config(tmp_path, strategy="distill", data={"pool_fraction": 0.0})
    with pytest.raises(DataError, match="pool, but it is empty"):
        run_federation(cfg, tmp_path / "run", progress=False)
    # a client's own dataset as the pool would put its val / test images into pretraining
    with pytest.raises(ConfigError, match=r"pool_path is \(or holds\) the dataset of client 'beta'"):
        tiny_config(tmp_path, data={"pool_path": str(tmp_path / "beta.npz")})
    image_folder = folder / "sub"  # a pool folder holding a client's image folder would read its images
    with pytest.raises(ConfigError, match="the dataset of client 'imgs'"):
        tiny_config(tmp_path, data={"pool_path": str(folder)},
                    clients=[{"name": "imgs", "path": str(image_folder)}])


def test_bad_configs_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown strategy 'magic'"):
        tiny_config(tmp_path, federation={"strategy": "magic"})
    with pytest.raises(ConfigError, match="client 'ghost': dataset not found"):
        tiny_config(tmp_path, clients=[{"name": "ghost", "path": str(tmp_path / "ghost.npz")}])
    with pytest.raises(ConfigError, match="unknown key"):
        tiny_config(tmp_path, local={"epoch": 2})
    make_npz(tmp_path / "c.npz", 3, 16)
    with pytest.raises(ConfigError, match="no shipped sample"):
        tiny_config(tmp_path, clients=[{"name": "x", "sample": "nosuchmnist"}])
    cfg = tiny_config(tmp_path, clients=[{"name": "c", "path": str(tmp_path / "c.npz"), "num_classes": 4}])
    with pytest.raises(DataError, match="has 3 classes but the config declares num_classes = 4"):
        build_sites(cfg.clients, cfg.data, 16, 3, 0)


def test_cli_federate_then_resume(tmp_path, capsys):
    cfg = tiny_config(tmp_path, strategy="relay", rounds=1)
    config = tmp_path / "fed.toml"
    config.write_text(dump_toml(cfg))
    run = tmp_path / "run"
    assert main(["federate", "--config", str(config), "--out", str(run), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "strategy relay (sequential)" in out and "alpha" in out and (run / "complete").is_file()
    assert main(["federate", "--out", str(run), "--resume", "--quiet"]) == 0  # complete: nothing to do
    assert main(["federate", "--config", str(config), "--out", str(run)]) == 2
    assert "already holds a complete run" in capsys.readouterr().err


def test_cli_errors_and_help(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[federation]\nstrategy = "magic"\n[[clients]]\nsample = "bloodmnist"\n')
    assert main(["federate", "--config", str(bad), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medveil: error:") and "unknown strategy 'magic'" in err and "\n" not in err
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "not a complete federated run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["federate", "--help"])
    assert "--resume" in capsys.readouterr().out


def test_resume_compares_what_changes_the_run(tmp_path):
    """--resume refuses a config that differs from the run's config.toml, but without DP the
    [privacy] options change nothing: a run started under an older privacy default (the head
    refit's 20 epochs) still resumes; with DP on, the same difference is refused."""
    run = tmp_path / "run"
    run.mkdir()
    old = tiny_config(tmp_path, privacy={"calibration_epochs": 20})
    (run / "config.toml").write_text(dump_toml(old))
    (run / "metrics.json").write_text('{"final": {}}')
    (run / "complete").touch()
    assert run_federation(tiny_config(tmp_path), run, resume=True, progress=False) == {"final": {}}
    old_dp = tiny_config(tmp_path, privacy={"dp": True, "calibration_epochs": 20})
    for saved, now in ((old, {"dp": True}), (old_dp, {"dp": True})):  # DP turned on; DP's refit changed
        (run / "config.toml").write_text(dump_toml(saved))
        with pytest.raises(ConfigError, match="different config"):
            run_federation(tiny_config(tmp_path, privacy=now), run, resume=True, progress=False)
