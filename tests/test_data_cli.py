"""``medveil data info/check`` and ``medveil demo``; every bad input is one line and exit code 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from medveil.cli.main import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medveil: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture
def folder(tmp_path):
    """Three PNG/JPEG images and a CSV; tests break it in different ways."""
    rng = np.random.default_rng(0)
    for i, ext in enumerate([".png", ".jpg", ".png"]):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"im{i}{ext}")
    (tmp_path / "labels.csv").write_text("id,label\nim0,0\nim1,1\nim2,1\n")
    return tmp_path


def test_info_on_a_sample_prints_summary_and_counts(capsys):
    code, out, _ = run(capsys, "data", "info", "sample:retinamnist")
    assert code == 0
    assert "name:        retinamnist" in out and "task:        ordinal, 5 classes" in out
    assert "image size:  28 x 28" in out and "channels:    3 (RGB)" in out
    assert out.strip().splitlines()[-1].split() == ["total", "images", "300", "60", "200", "560"]


def test_info_and_check_on_a_folder(capsys, folder):
    code, out, _ = run(capsys, "data", "info", str(folder), "--classes", "benign,malignant")
    assert code == 0 and "1 malignant" in out and "binary, 2 classes" in out
    code, out, _ = run(capsys, "data", "check", str(folder), "--size", "16")
    assert code == 0 and "train: 3 images decoded, 16 x 16 x 3" in out


def test_missing_path(capsys, tmp_path):
    assert_one_line_error(*run(capsys, "data", "info", str(tmp_path / "nope.npz"))[::2],
                          "nope.npz: no such file or folder")


@pytest.mark.parametrize("victim", ["im0.png", "im1.jpg"])
def test_truncated_image(capsys, folder, victim):
    data = (folder / victim).read_bytes()
    (folder / victim).write_bytes(data[: len(data) // 2])
    code, _, err = run(capsys, "data", "check", str(folder))
    row = {"im0.png": "row 2 (id 'im0')", "im1.jpg": "row 3 (id 'im1')"}[victim]
    assert_one_line_error(code, err, f"labels.csv {row}", victim, "corrupt or truncated image")


def test_row_with_missing_image(capsys, folder):
    (folder / "im2.png").unlink()
    code, _, err = run(capsys, "data", "info", str(folder))
    assert_one_line_error(code, err, "labels.csv row 4 (id 'im2')", "image not found")


def test_label_outside_declared_classes(capsys, folder):
    code, _, err = run(capsys, "data", "info", str(folder), "--classes", "only")
    assert_one_line_error(code, err, "labels.csv row 3 (id 'im1')", "label '1' is outside the 1 declared")


def test_label_outside_classes_in_npz(capsys, tmp_path):
    path = tmp_path / "breastmnist.npz"  # known name: 2 classes
    np.savez(path, train_images=np.zeros((3, 28, 28), np.uint8), train_labels=np.array([[0], [1], [5]]))
    code, _, err = run(capsys, "data", "info", str(path))
    assert_one_line_error(code, err, "breastmnist.npz", "row 2 has label 5 outside the 2 declared")


def test_check_reports_images_shared_by_splits(capsys, tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    train[5] = train[0]  # a repeat inside train
    test = np.stack([train[1], train[2], rng.integers(0, 256, (28, 28), dtype=np.uint8)])
    path = tmp_path / "breastmnist.npz"
    np.savez(path, train_images=train, train_labels=np.array([[0], [1], [0], [1], [0], [0]]),
             test_images=test, test_labels=np.array([[1], [0], [1]]))  # train[1] is 1, test[0] too; train[2] 0 vs 0
    code, out, _ = run(capsys, "data", "check", str(path))
    assert code == 0 and "OK" in out
    assert "duplicates: train: 1 image(s) repeat an earlier image of train" in out
    assert "duplicates: train and test: 2 image(s) of test also in train\n" in out  # same labels: no conflict
    np.savez(path, train_images=train, train_labels=np.array([[0], [1], [0], [1], [0], [0]]),
             test_images=test, test_labels=np.array([[0], [0], [1]]))
    assert "(1 with another label)" in run(capsys, "data", "check", str(path))[1]
    np.savez(path, train_images=train[:5], train_labels=np.array([[0], [1], [0], [1], [0]]))
    assert "duplicates" not in run(capsys, "data", "check", str(path))[1]


def test_empty_datasets(capsys, folder, tmp_path):
    (folder / "labels.csv").write_text("id,label\n")
    assert_one_line_error(*run(capsys, "data", "info", str(folder))[::2], "labels.csv: no data rows")
    empty = tmp_path / "empty.npz"
    np.savez(empty, train_images=np.zeros((0, 28, 28), np.uint8), train_labels=np.zeros((0, 1), np.uint8),
             test_images=np.zeros((0, 28, 28), np.uint8), test_labels=np.zeros((0, 1), np.uint8))
    assert_one_line_error(*run(capsys, "data", "info", str(empty))[::2], "empty.npz: dataset is empty")


def test_missing_named_column(capsys, folder):
    code, _, err = run(capsys, "data", "info", str(folder), "--patient-column", "subject")
    assert_one_line_error(code, err, "labels.csv: no column 'subject' (columns: id, label)")


def test_bare_name_without_data_root(capsys, monkeypatch):
    monkeypatch.delenv("MEDVEIL_DATA_ROOT", raising=False)
    code, _, err = run(capsys, "data", "info", "bloodmnist")
    assert_one_line_error(code, err, "MEDVEIL_DATA_ROOT", "--data-root")


def test_debug_shows_the_traceback(capsys, tmp_path):
    from medveil.errors import DataError

    with pytest.raises(DataError):
        main(["--debug", "data", "info", str(tmp_path / "nope")])


def test_demo_summarises_every_sample(capsys, tmp_path):
    code, out, _ = run(capsys, "demo", "--only", "samples", "--out", str(tmp_path / "demo"))
    assert code == 0 and "step 1/1: samples" in out
    result = json.loads((tmp_path / "demo" / "demo.json").read_text())
    samples = result["samples"]
    assert set(samples) == {"bloodmnist", "organamnist", "retinamnist", "breastmnist",
                            "pneumoniamnist", "ham10000"}
    assert samples["organamnist"]["channels"] == 1 and len(samples["organamnist"]["classes"]) == 11


def test_demo_unknown_step_is_one_line_error(capsys, tmp_path):
    code, _, err = run(capsys, "demo", "--only", "samples,bogus", "--out", str(tmp_path / "demo"))
    assert code == 2 and "unknown step(s) bogus" in err and err.count("\n") == 1
    assert not (tmp_path / "demo").exists()
