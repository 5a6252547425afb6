"""`medveil anonymize` end to end on tiny data: a release that verify-release passes, --quick,
kill/resume, patient grouping, k > N errors and `medveil evaluate-release`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medveil.anonymize import quick
from medveil.anonymize.pipeline import AnonymizeConfig, Models, PrivateSet, anonymize
from medveil.anonymize.alignment import AlignConfig
from medveil.anonymize.verify import verify_release
from medveil.cli.main import main
from medveil.data.samples import sample_path
from medveil.errors import DataError
from medveil.models.stylegan2 import GANConfig, Generator

SPEC = "random-conv:seed=0,width=8"
TINY = GANConfig(resolution=32, z_dim=16, w_dim=16, mapping_layers=1, channel_base=128,
                 channel_max=16)
FAST = ["--feature-net", SPEC, "--steps", "3", "--invert-steps", "2", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory) -> Path:
    """23 train + 12 test RetinaMNIST images (MedMNIST layout)."""
    src = np.load(sample_path("retinamnist"))
    path = tmp_path_factory.mktemp("data") / "tinyretina.npz"
    np.savez(path, train_images=src["train_images"][:23], train_labels=src["train_labels"][:23],
             test_images=src["test_images"][:12], test_labels=src["test_labels"][:12])
    return path


@pytest.fixture(scope="module")
def tiny_gan(tmp_path_factory) -> Path:
    """A random tiny generator saved as a GAN checkpoint file."""
    torch.manual_seed(0)
    G = Generator(TINY)
    path = tmp_path_factory.mktemp("gan") / "tiny.pt"
    torch.save({"G_ema": G.state_dict(), "G": G.state_dict(), "config": {"gan": TINY.to_dict()}},
               path)
    return path


def _private(tiny_npz: Path) -> PrivateSet:
    from medveil.anonymize.pipeline import private_set
    from medveil.data.loading import load_dataset

    return private_set(load_dataset(tiny_npz), "train")


def test_cli_anonymize_release_passes_verify(tiny_npz, tiny_gan, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["anonymize", "--data", str(tiny_npz), "--k", "5", "--out", str(out),
                 "--gan", str(tiny_gan), *FAST])
    assert code == 0
    captured = capsys.readouterr()
    assert "keep audit/ apart" in captured.err
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] is True and report["k"] == 5 and report["n_members"] == 23
    assert report["weights"] == {"lambda_c": 100.0, "lambda_s": 0.05, "gram_scale": "mean",
                                 "patches": 4}
    assert report["feature_nets"]["content"]["name"].startswith("random-conv:seed=0")
    assert report["steps"]["align"] == 3 and "align_s" in report["timings"]
    assert not (out / ".work").exists()
    verdict = verify_release(out)
    assert verdict.passed, verdict.table()
    assert verdict.n_images == 4  # 23 // 5 groups of 5..9
    with open(out / "release" / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    assert [c for c in rows[0] if c.startswith("frac_")] == [f"frac_{i}" for i in range(5)]
    assert main(["verify-release", str(out)]) == 0
    # a second run into a complete release is refused, --overwrite replaces it
    assert main(["anonymize", "--data", str(tiny_npz), "--k", "5", "--out", str(out),
                 "--gan", str(tiny_gan), *FAST]) == 2
    assert "already holds a complete release" in capsys.readouterr().err


def test_cli_quick_smoke(tiny_npz, tmp_path, monkeypatch):
    from medveil.generative.train import GANTrainer

    monkeypatch.setattr(quick, "TINY_GAN", TINY)  # even tinier than --quick's own
    monkeypatch.setattr(GANTrainer, "flops_per_image", lambda self: float("nan"))  # not under test
    out = tmp_path / "quick"
    code = main(["anonymize", "--data", str(tiny_npz), "--k", "5", "--out", str(out), "--quick",
                 "--quick-gan-steps", "2", "--quick-encoder-steps", "0", *FAST])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["models"]["quick"] is True and report["models"]["gan_steps"] == 2
    assert report["image_size"] == [32, 32, 3]
    assert verify_release(out).passed


def test_cli_random_grouping_within_labels_gives_exact_labels(tiny_npz, tiny_gan, tmp_path):
    out = tmp_path / "strat"
    assert main(["anonymize", "--data", str(tiny_npz), "--k", "3", "--out", str(out),
                 "--gan", str(tiny_gan), "--grouping", "random", "--stratify-labels", *FAST]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["grouping"] == "random" and report["config"]["stratify_labels"] is True
    labels = np.load(tiny_npz)["train_labels"].ravel()  # counts 11 / 1 / 6 / 2 / 3 per grade
    with open(out / "audit" / "groups.csv") as f:
        members: dict[str, list[int]] = {}
        for r in csv.DictReader(f):
            members.setdefault(r["file"], []).append(int(labels[int(r["member_id"].split("-")[1])]))
    kinds = sorted(tuple(sorted(set(m))) for m in members.values())
    # grades 0, 2, 4 (>= k images) in label-pure groups; grades 1 + 3 (1 + 2 images) pooled
    assert kinds == [(0,)] * 3 + [(1, 3)] + [(2,)] * 2 + [(4,)]
    assert verify_release(out).passed


def test_k_larger_than_n_is_one_line_error(tiny_npz, tiny_gan, tmp_path, capsys):
    code = main(["anonymize", "--data", str(tiny_npz), "--k", "50", "--out",
                 str(tmp_path / "o"), "--gan", str(tiny_gan), *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("medveil: error:") and "k=50" in err[0] and "23 images" in err[0]
    assert not (tmp_path / "o").exists()


def test_kill_then_resume(tiny_npz, tiny_gan, tmp_path):
    from medveil.generative.checkpoint import load_generator

    from medveil.models.encoder import Encoder, EncoderConfig

    full_data = _private(tiny_npz)
    data = PrivateSet(full_data.images[:14], full_data.labels[:14], full_data.ids[:14],
                      full_data.class_names, source="tiny")
    G = load_generator(tiny_gan)
    torch.manual_seed(1)
    encoder = Encoder(EncoderConfig.for_generator(G, width=8, head_channels=16)).eval()
    models = Models(G, encoder)  # encoder + projector inversion
    cfg = AnonymizeConfig(k=3, feature_net=SPEC, align=AlignConfig(steps=2), invert_steps=1,
                          batch_groups=1)
    full = anonymize(data, models, tmp_path / "full", cfg, progress=False)
    n_groups = len(full.groups)
    assert n_groups == 4 and all(3 <= len(g) <= 5 for g in full.groups)

    class Killed(Exception):
        pass

    def die_after_two(idx):
        if idx[0] >= 1:  # the second batch (group 1) has been persisted
            raise Killed

    out = tmp_path / "killed"
    with pytest.raises(Killed):
        anonymize(data, models, out, cfg, progress=False, on_batch=die_after_two)
    assert not (out / "report.json").exists()
    assert not (out / "release").exists()
    assert len(list((out / ".work").glob("batch-*.npz"))) == 2
    with pytest.raises(DataError):
        verify_release(out)
    resumed = anonymize(data, models, out, cfg, progress=False)
    assert resumed.report["timings"]["groups_resumed"] == 2
    assert resumed.report["timings"]["groups_aligned_this_run"] == n_groups - 2
    np.testing.assert_array_equal(resumed.images, full.images)  # identical to an unbroken run
    assert verify_release(out).passed


def _write_folder(root: Path, n: int, patients: list[str]) -> Path:
    src = np.load(sample_path("retinamnist"))
    (root / "imgs").mkdir(parents=True)
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "grade", "patient"])
        for i in range(n):
            Image.fromarray(src["train_images"][i]).save(root / "imgs" / f"eye{i:03d}.png")
            w.writerow([f"eye{i:03d}", int(src["train_labels"][i, 0]), patients[i]])
    return root


def test_patient_grouping_and_too_few_patients(tiny_gan, tmp_path, capsys):
    patients = [f"P{i // 2}" for i in range(14)]  # 7 patients, two eyes each
    root = _write_folder(tmp_path / "folder", 14, patients)
    out = tmp_path / "out"
    args = ["anonymize", "--images", str(root / "imgs"), "--labels", str(root / "labels.csv"),
            "--id-column", "image", "--label-column", "grade", "--patient-column", "patient",
            "--out", str(out), "--gan", str(tiny_gan), *FAST]
    assert main([*args, "--k", "3"]) == 0
    with open(out / "audit" / "groups.csv") as f:
        rows = list(csv.DictReader(f))
    by_file: dict[str, set[str]] = {}
    for r in rows:
        by_file.setdefault(r["file"], set()).add(r["patient_id"])
    assert all(len(p) >= 3 for p in by_file.values())
    patient_files = {}
    for r in rows:
        patient_files.setdefault(r["patient_id"], set()).add(r["file"])
    assert all(len(f) == 1 for f in patient_files.values())  # no patient split across images
    assert json.loads((out / "report.json").read_text())["group_by"] == "patient"
    assert verify_release(out).passed
    capsys.readouterr()
    assert main([*args[:-len(FAST)], *FAST, "--k", "8", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "only 7 distinct patients" in err and "k=8" in err


def test_cli_evaluate_release(tiny_npz, tiny_gan, tmp_path, capsys):
    out, held = tmp_path / "priv", tmp_path / "held"
    base = ["--data", str(tiny_npz), "--gan", str(tiny_gan), *FAST, "--steps", "1",
            "--invert-steps", "1"]
    assert main(["anonymize", *base, "--k", "3", "--out", str(out)]) == 0
    assert main(["anonymize", *base, "--split", "test", "--k", "3", "--out", str(held)]) == 0
    capsys.readouterr()
    result = tmp_path / "eval.json"
    code = main(["evaluate-release", str(out), "--data", str(tiny_npz), "--test-data",
                 str(tiny_npz), "--test-release", str(held), "--feature-net", SPEC,
                 "--epochs", "1", "--seeds", "1", "--json", str(result), "--no-progress"])
    assert code == 0
    table = capsys.readouterr().out
    assert "k-SALSA" in table and "k-Same-Pixel" in table and "real N/k" in table
    payload = json.loads(result.read_text())
    ks = payload["results"]["k-SALSA"]
    assert 0 <= ks["utility"]["acc_mean"] <= 1 and np.isfinite(ks["fidelity"]["fid"])
    link = ks["privacy"]["linkage"]
    assert 0 <= link["topk_precision"] <= 1 and link["chance"] == pytest.approx(3 / 12, abs=0.1)
    assert 0 < link["label_chance"] <= 1 and "w/ label" in table
    # a real member is its own nearest real image: N/k real is re-identified every time
    assert payload["results"]["real N/k"]["privacy"]["nn_reid"]["nn_reid_rate"] == 1.0
    assert payload["results"]["real N/k"]["nn_reid_private"]["nn_reid_rate"] == 1.0
    assert "NN re-identification against the private images" in table


def test_demo_run_small(tiny_gan, tmp_path):
    from medveil.anonymize import demo

    summary = demo.run(tmp_path / "demo", tiny_gan, k=3, n_images=12, align_steps=1,
                       invert_steps=1, progress=False)
    assert summary["verify_passed"] and summary["k"] == 3 and summary["n_members"] == 12
    assert (tmp_path / "demo" / "release" / "labels.csv").is_file()


def test_cli_paths_are_the_current_folders_and_people_are_counted(tiny_gan, tmp_path, capsys, monkeypatch):
    """A path on the command line is relative to where the command runs (not to the CSV), and
    the summary counts people and images apart."""
    patients = [f"P{i // 2}" for i in range(14)]  # 7 patients, two images each
    _write_folder(tmp_path / "f2", 14, patients)
    monkeypatch.chdir(tmp_path)
    args = ["anonymize", "--images", "f2/imgs", "--labels", "f2/labels.csv", "--id-column", "image",
            "--label-column", "grade", "--patient-column", "patient", "--out", "out", "--gan",
            str(tiny_gan), *FAST, "--k", "3"]
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "made from 14 images of 7 people" in out, out
    assert verify_release(tmp_path / "out").passed
