"""medveil audit: membership inference where the answer is known (a memorising model is found
out, an untrained one is not), and on a finished run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fed_helpers import tiny_config

from medveil.cli.main import main
from medveil.evaluate.audit import (
    attack_metrics,
    audit_one,
    audit_run,
    audit_site,
    example_losses,
    matched_members,
    split_nonmembers,
    strip_curves,
)
from medveil.federated.engine import run_federation
from medveil.federated.sites import ClientData
from medveil.federated.training import TrainRecipe, new_head, train_classifier
from medveil.data import Task
from medveil.errors import MedVeilError
from medveil.models import ViTConfig, VisionTransformer


def test_attack_metrics_on_known_scores():
    rng = np.random.default_rng(0)
    perfect = attack_metrics(np.full(200, 1.0) + rng.random(200), rng.random(2000) - 1.0)
    assert perfect["auc"] == 1.0 and perfect["tpr_at_1pct_fpr"] == 1.0 and perfect["tpr_at_0.1pct_fpr"] == 1.0
    blind = attack_metrics(rng.random(2000), rng.random(2000))
    assert abs(blind["auc"] - 0.5) < 0.03 and blind["tpr_at_1pct_fpr"] < 0.03
    # the chance band: what no signal reaches on these sizes; a perfect attack is far above it
    assert perfect["auc"] > perfect["chance_95"]["auc"] and perfect["tpr_at_1pct_fpr"] > perfect["chance_95"]["tpr_at_1pct_fpr"]
    assert 0.5 < blind["chance_95"]["auc"] < 0.53 and 0.01 <= blind["chance_95"]["tpr_at_1pct_fpr"] < 0.05
    small = attack_metrics(rng.random(150), rng.random(150))  # few images: a wide band
    assert small["chance_95"]["auc"] > blind["chance_95"]["auc"]
    ref, ev = split_nonmembers(11, 3)
    assert len(ref) == 5 and len(ev) == 6 and not set(ref) & set(ev)
    y_in, y_out = np.array([0] * 80 + [1] * 20), np.array([0] * 10 + [1] * 10)  # other class balance
    keep = matched_members(y_in, y_out, 0)
    assert np.bincount(y_in[keep]).tolist() == [20, 20] and len(set(keep)) == 40


def test_a_grouped_reference_split_keeps_look_alikes_together():
    """reference_split = "grouped": near-copies of one image (slices of one patient) fall in one
    look-alike group, and each group lies whole in R or in E."""
    from medveil.evaluate.audit import image_groups

    g = torch.Generator().manual_seed(0)
    patients = torch.rand(6, 1, 16, 16, generator=g)
    x = patients.repeat_interleave(10, 0) + 0.02 * torch.rand(60, 1, 16, 16, generator=g)  # 10 slices each
    groups = image_groups(x, size=10)
    assert len(set(groups.tolist())) == 6
    assert all(len(set(groups[10 * p:10 * p + 10].tolist())) == 1 for p in range(6))
    ref, ev = split_nonmembers(60, 3, groups)
    assert len(ref) == len(ev) == 30 and not set(groups[ref].tolist()) & set(groups[ev].tolist())


def toy_site(n: int = 32) -> ClientData:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2 * n, 1, 16, 16, generator=g)
    y = torch.randint(0, 4, (2 * n,), generator=g)  # random labels: only memorising fits them
    return ClientData("toy", Task.MULTICLASS, list("abcd"), "unknown", "toy", x[:n], y[:n], x[n:], y[n:])


def test_a_memorising_model_is_found_and_an_untrained_one_is_not():
    torch.manual_seed(0)
    data = toy_site()
    cfg = ViTConfig(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2,
                    decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    untrained = (VisionTransformer(cfg).eval(), new_head(32, 4, 1))
    memoriser = (VisionTransformer(cfg), new_head(32, 4, 2))
    train_classifier(*memoriser, data.x_train, data.y_train, data.task, TrainRecipe(epochs=80, batch_size=8, lr=2e-3), 0)
    assert float(example_losses(torch.zeros(1, 4), torch.tensor([0]), data.task)[0]) == pytest.approx(np.log(4))
    eval_idx = np.arange(len(data.x_test))
    out = audit_site(data, {"memoriser": memoriser, "untrained": untrained}, untrained, eval_idx)
    assert out["memoriser"]["loss"]["auc"] > 0.9 and out["memoriser"]["calibrated"]["auc"] > 0.9
    assert abs(out["untrained"]["loss"]["auc"] - 0.5) < 0.2
    assert out["untrained"]["calibrated"]["auc"] == 0.5  # target = reference: every score is 0


def test_the_backbone_target_separates_a_memorising_head_from_its_backbone():
    """A universal model whose head memorised the members on an untrained backbone: the
    ``universal`` target gives them away, the ``backbone`` target (the same backbone, a head fit on
    the reference half of the non-members) does not: the signal is in the head."""
    from medveil.federated.calibration import fit_linear_head
    from medveil.federated.rebuild import build_head
    from medveil.federated.training import extract_features

    torch.manual_seed(0)
    data = toy_site(48)
    cfg = ViTConfig(img_size=16, patch_size=4, in_chans=1, embed_dim=96, depth=1, num_heads=2,
                    decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)  # more features than members
    backbone = VisionTransformer(cfg).eval()
    memorised = fit_linear_head(extract_features(backbone, data.x_train), data.y_train, 4, data.task, C=1e4)
    head = build_head(memorised, 4, "toy")
    out = audit_one(data, cfg.to_dict(), backbone.state_dict(), TrainRecipe(epochs=1, batch_size=8), None,
                    (backbone, head), run_seed=0)
    assert set(out) == {"universal", "backbone"}
    assert out["universal"]["loss"]["auc"] > 0.9
    assert abs(out["backbone"]["loss"]["auc"] - 0.5) < 0.2


@pytest.mark.slow
def test_audit_a_finished_run(tmp_path, capsys):
    cfg = tiny_config(tmp_path, "fedavg", rounds=1)
    run_federation(cfg, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "checkpoints" / "updates.pt").is_file()  # what the server received
    assert main(["audit", str(tmp_path / "run"), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "alpha" in text and "calibrated" in text and "universal" in text and "update" in text
    report = json.loads((tmp_path / "run" / "audit.json").read_text())
    for name in ("alpha", "beta"):
        site = report["sites"][name]
        assert site["update_stage"] == 1
        for target in ("update", "universal", "backbone"):  # backbone: the universal one, a head fit on R
            for attack in ("loss", "calibrated"):
                m = site[target][attack]
                assert 0.0 <= m["auc"] <= 1.0 and 0.0 <= m["tpr_at_1pct_fpr"] <= 1.0 and "roc" not in m
    assert (tmp_path / "run" / "audit_roc.png").stat().st_size > 5000
    assert report["nonmembers"] == "test" and report["sites"]["alpha"]["update"]["loss"]["n_nonmembers"] == 12
    # non-members from the val split (alpha: 12 val images, half of them scored; test has 24)
    assert main(["audit", str(tmp_path / "run"), "--quiet", "--nonmembers", "val"]) == 0
    report = json.loads((tmp_path / "run" / "audit.json").read_text())
    assert report["nonmembers"] == "val" and report["sites"]["alpha"]["update"]["loss"]["n_nonmembers"] == 6
    with pytest.raises(MedVeilError, match="non-members must come from one of test, val, unused-train"):
        audit_run(tmp_path / "run", progress=False, nonmembers="train")
    with pytest.raises(MedVeilError, match="no site has unused train images"):  # both train on every image
        audit_run(tmp_path / "run", progress=False, nonmembers="unused-train")
    # rebuilt with max_train 30: alpha (36 outside the pool) keeps 6 unused train images, beta (30) none
    config = tmp_path / "run" / "config.toml"
    config.write_text(config.read_text().replace("max_train = 0", "max_train = 30"))
    assert main(["audit", str(tmp_path / "run"), "--quiet", "--nonmembers", "unused-train"]) == 0
    assert "beta          not audited:" in capsys.readouterr().out
    report = json.loads((tmp_path / "run" / "audit.json").read_text())
    assert report["nonmembers"] == "unused-train" and "none is left unused" in report["sites"]["beta"]["unavailable"]
    assert report["sites"]["alpha"]["update"]["loss"]["n_nonmembers"] == 3  # half of the 6
    capped = audit_run(tmp_path / "run", progress=False, nonmembers="unused-train", max_nonmembers=4)
    assert capped["sites"]["alpha"]["update"]["loss"]["n_nonmembers"] == 2  # half of 4 of the 6
    with pytest.raises(MedVeilError, match="--max-nonmembers must be 0"):
        audit_run(tmp_path / "run", progress=False, max_nonmembers=2)
    with pytest.raises(MedVeilError, match="reference split must be one of random, grouped"):
        audit_run(tmp_path / "run", progress=False, reference_split="pairs")
    (tmp_path / "half").mkdir()
    assert main(["audit", str(tmp_path / "half")]) == 2


@pytest.mark.slow
def test_a_site_audits_its_own_releases_as_the_run_audit_does(tmp_path, capsys):
    """`medveil site audit`: from what a Flower site keeps (federated.site_record: its data
    options, the backbone it first trained from, its last update) it gets the numbers `medveil
    audit` gets in-process. Here the records are written from an in-process run; the Flower test
    (test_flower_deploy) checks the records a real SuperNode writes."""
    from medveil.federated.engine import mim_only_state
    from medveil.federated.flower.transport import site_options
    from medveil.federated.messages import ClientUpdate, FitInstructions
    from medveil.federated.site_record import audit_folder, keep_release

    cfg = tiny_config(tmp_path, "fedavg", rounds=1)
    run = tmp_path / "run"
    run_federation(cfg, run, progress=False)
    in_process = json.loads(json.dumps(strip_curves(audit_run(run, progress=False))))
    u = torch.load(run / "checkpoints" / "updates.pt", weights_only=True)["alpha"]
    state = tmp_path / "site-state"
    ins = FitInstructions("alpha", 1, cfg.model.to_dict(), mim_only_state(run), {})
    update = ClientUpdate("alpha", u["stage"], u["backbone"], u["head"], n_samples=1)
    folder = audit_folder(state / "privacy", "alpha")
    keep_release(folder, site_options(cfg), "alpha", cfg.clients[0].path, ins, update)
    assert main(["site", "audit", "--name", "alpha", "--state", str(state), "--model", str(run / "model.pt")]) == 0
    assert "alpha" in capsys.readouterr().out
    at_site = json.loads((audit_folder(state / "privacy", "alpha") / "audit.json").read_text())
    assert at_site["sites"]["alpha"] == in_process["sites"]["alpha"]
    # non-members from the val split: the site and the run agree again
    in_process_val = json.loads(json.dumps(strip_curves(audit_run(run, progress=False, nonmembers="val"))))
    assert main(["site", "audit", "--name", "alpha", "--state", str(state), "--model", str(run / "model.pt"),
                 "--nonmembers", "val"]) == 0
    at_site = json.loads((audit_folder(state / "privacy", "alpha") / "audit.json").read_text())
    assert at_site["nonmembers"] == "val" and at_site["sites"]["alpha"] == in_process_val["sites"]["alpha"]
    assert at_site["sites"]["alpha"] != in_process["sites"]["alpha"]
    grouped = json.loads(json.dumps(strip_curves(audit_run(run, progress=False, reference_split="grouped"))))
    assert main(["site", "audit", "--name", "alpha", "--state", str(state), "--model", str(run / "model.pt"),
                 "--reference-split", "grouped"]) == 0
    at_site = json.loads((audit_folder(state / "privacy", "alpha") / "audit.json").read_text())
    assert at_site["reference_split"] == grouped["reference_split"] == "grouped"
    assert at_site["sites"]["alpha"] == grouped["sites"]["alpha"] != in_process["sites"]["alpha"]
    assert main(["site", "audit", "--name", "beta", "--state", str(state)]) == 2  # nothing kept for beta
    # a later run: its first release starts the records again (no mix of two runs)
    ins2 = FitInstructions("alpha", 1, cfg.model.to_dict(), u["backbone"], {})
    keep_release(folder, site_options(cfg), "alpha", cfg.clients[0].path, ins2, update)
    assert torch.equal(torch.load(folder / "reference_start.pt", weights_only=True)["backbone"]["cls_token"],
                       u["backbone"]["cls_token"])
    ins3 = FitInstructions("alpha", 2, cfg.model.to_dict(), mim_only_state(run), {})  # same run, later stage
    keep_release(folder, site_options(cfg), "alpha", cfg.clients[0].path, ins3, update)
    assert torch.equal(torch.load(folder / "reference_start.pt", weights_only=True)["backbone"]["cls_token"],
                       u["backbone"]["cls_token"])


def test_the_seed_mean_of_audits_averages_every_figure():
    """benchmarks/audit_grouped.py --seeds N: the mean row averages each figure (chance bands
    too) over the seeds' audits and keeps a site that was not audited as such."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from audit_grouped import mean_of

    def audit(auc: float) -> dict:
        m = {"auc": auc, "tpr_at_1pct_fpr": auc / 10, "chance_95": {"auc": 0.53, "tpr_at_1pct_fpr": 0.02 + auc / 100}}
        return {"a": {"update": {"loss": m, "calibrated": m}, "update_stage": 3}, "b": {"unavailable": "none unused"}}

    mean = mean_of([audit(0.5), audit(0.6)])
    assert mean["a"]["update"]["loss"]["auc"] == pytest.approx(0.55)
    assert mean["a"]["update"]["calibrated"]["chance_95"]["tpr_at_1pct_fpr"] == pytest.approx(0.0255)
    assert "update_stage" not in mean["a"] and mean["b"] == {"unavailable": "none unused"}
    refused = audit(0.7)  # a seed whose last update was refused under DP, and a site it did not audit
    refused["a"] = {"universal": refused["a"]["update"], "update_missing": "refused"}
    refused["c"] = {"unavailable": "none unused"}
    first = audit(0.5)
    first["a"]["universal"] = first["a"]["update"]
    first["c"] = first["a"]
    mean = mean_of([first, refused])
    assert set(mean["a"]) == {"universal"} and mean["a"]["universal"]["loss"]["auc"] == pytest.approx(0.6)
    assert mean["c"] == {"unavailable": "none unused"}


def test_the_audit_benchmark_records_each_runs_val_accuracy(tmp_path):
    """benchmarks/audit_grouped.py keeps, beside the audits, each run's final val accuracy per
    site and the mean: the utility a shorter DP head refit (--refit) trades against."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from audit_grouped import val_accuracy

    (tmp_path / "metrics.json").write_text(json.dumps({"final": {"a": {"acc": 0.9, "bacc": 0.8},
                                                                 "b": {"acc": 0.6, "bacc": 0.5}}}))
    assert val_accuracy(tmp_path) == {"a": 0.9, "b": 0.6, "mean": 0.75}
