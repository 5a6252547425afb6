"""``medveil predict``: a universal model's task applied to images MedVeil reads, with the bad
inputs a new user hits (unknown task, foreign file, existing --out, other class count)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from fed_helpers import make_npz, tiny_config

from medveil.cli.main import main
from medveil.federated.engine import run_federation


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("predict")
    cfg = tiny_config(folder, "fedavg", rounds=1)
    run_federation(cfg, folder / "run", progress=False)
    return folder


def test_predict_writes_one_row_per_image_and_scores_labels(run, capsys):
    out = run / "pred.csv"
    assert main(["predict", str(run / "run" / "model.pt"), str(run / "alpha.npz"), "--task", "alpha",
                 "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader(out.open()))
    n_test = len(np.load(run / "alpha.npz")["test_labels"])
    assert len(rows) == n_test and rows[0]["id"] == "0"
    probs = np.array([[float(r[k]) for k in r if k.startswith("prob_")] for r in rows])
    assert probs.shape[1] == 3 and np.allclose(probs.sum(1), 1, atol=1e-4)
    names = [k[len("prob_"):] for k in rows[0] if k.startswith("prob_")]
    assert [r["predicted"] for r in rows] == [names[i] for i in probs.argmax(1)]
    assert f"predicted {n_test} images (test)" in printed and "acc " in printed
    # the colour site's images on the grey site's task would be a class-count mismatch: refused
    assert main(["predict", str(run / "run" / "model.pt"), str(run / "beta.npz"), "--task", "alpha",
                 "--out", str(run / "other.csv")]) == 2
    assert "has 3 (" in capsys.readouterr().err and not (run / "other.csv").exists()


def test_predict_converts_other_sizes_and_refuses_bad_input(run, tmp_path, capsys):
    big = make_npz(tmp_path / "big.npz", 3, 12, seed=5)  # same classes, then resized below
    d = dict(np.load(big))
    d["test_images"] = np.repeat(np.repeat(d["test_images"], 2, axis=1), 2, axis=2)  # twice the size
    np.savez(tmp_path / "big2.npz", **d)
    model = str(run / "run" / "model.pt")
    assert main(["predict", model, str(tmp_path / "big2.npz"), "--task", "alpha", "--out",
                 str(tmp_path / "p.csv"), "--quiet"]) == 0
    assert "warning: converted" in capsys.readouterr().out
    assert main(["predict", model, str(tmp_path / "big2.npz"), "--task", "alpha", "--out",
                 str(tmp_path / "p.csv")]) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err
    assert main(["predict", model, str(tmp_path / "big2.npz"), "--task", "gamma", "--out",
                 str(tmp_path / "q.csv")]) == 2
    assert "tasks: alpha, beta" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    assert main(["predict", str(tmp_path / "junk.pt"), str(tmp_path / "big2.npz"), "--task", "alpha",
                 "--out", str(tmp_path / "r.csv")]) == 2
    err = capsys.readouterr().err
    assert "not a readable universal model" in err and err.count("\n") == 1
    assert not (tmp_path / "q.csv").exists() and not (tmp_path / "r.csv").exists()


def test_predict_a_folder_of_plain_images_without_labels(run, tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "scans"
    (folder / "ward2").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg", "ward2/c.png"):
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(folder / name)  # grey, 40 px
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "scans.csv"
    assert main(["predict", str(run / "run" / "model.pt"), str(folder), "--task", "beta", "--out", str(out),
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader(out.open()))
    assert [r["id"] for r in rows] == ["a", "b", "ward2/c"]
    assert "converted 3 images" in printed and "acc " not in printed  # no labels: no metrics
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(run / "run" / "model.pt"), str(tmp_path / "empty"), "--task", "beta",
                 "--out", str(tmp_path / "e.csv")]) == 2
    assert "no image files" in capsys.readouterr().err
