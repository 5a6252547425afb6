"""Image folder + CSV reader: on generated PNG/JPEG folders and on the real APTOS folder."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medveil.data import Task, load_dataset
from medveil.errors import ConfigError, DataError


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def make_folder(root: Path, n: int = 6, mode: str = "RGB", size=(20, 16), ext: str = ".png",
                subdir: str = "images") -> list[np.ndarray]:
    """n images named img<i><ext> in root/subdir; returns their pixel arrays (H, W[, C])."""
    rng = np.random.default_rng(0)
    (root / subdir).mkdir(parents=True, exist_ok=True)
    arrays = []
    for i in range(n):
        shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
        a = rng.integers(0, 256, shape, dtype=np.uint8)
        Image.fromarray(a).save(root / subdir / f"img{i}{ext}")
        arrays.append(a)
    return arrays


def test_reads_labels_patients_and_splits_with_autodetected_columns(tmp_path):
    arrays = make_folder(tmp_path, n=6)
    write_csv(tmp_path / "labels.csv", ["image_id", "label", "patient_id", "split"], [
        [f"img{i}", ["cat", "dog", "bird"][i % 3], f"p{i // 2}", ["train", "train", "test"][i % 3]]
        for i in range(6)
    ])
    ds = load_dataset(tmp_path)
    assert ds.class_names == ["bird", "cat", "dog"]  # sorted string labels
    assert ds.task is Task.MULTICLASS
    assert list(ds.splits) == ["train", "test"]
    train = ds.split("train")
    assert train.ids.tolist() == ["img0", "img1", "img3", "img4"]
    assert train.labels.tolist() == [1, 2, 1, 2]
    assert train.patient_ids.tolist() == ["p0", "p0", "p1", "p2"]
    assert ds.image_shape == (16, 20, 3)
    images = train.images
    assert images.shape == (4, 16, 20, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[2], arrays[3])  # PNG is lossless


def test_named_columns_classes_task_and_ids_with_extension(tmp_path):
    make_folder(tmp_path, n=4, mode="L", ext=".jpg", subdir="pics")
    write_csv(tmp_path / "t.csv", ["File", "Severity"],
              [[f"img{i}.jpg", g] for i, g in enumerate([0, 2, 1, 2])])
    ds = load_dataset(tmp_path / "t.csv", id_column="file", label_column="Severity",
                      classes=["none", "mild", "severe"], task="ordinal", size=8)
    assert ds.task is Task.ORDINAL and ds.class_names == ["none", "mild", "severe"]
    assert ds.split("train").labels.tolist() == [0, 2, 1, 2]  # no split column -> train
    assert ds.image_shape == (8, 8, 1)
    assert ds.split("train").images.shape == (4, 8, 8, 1)  # grey stays one channel


def test_two_classes_default_to_binary_and_int_labels_keep_their_value(tmp_path):
    make_folder(tmp_path, n=4, subdir=".")
    write_csv(tmp_path / "a.csv", ["id", "diagnosis"], [[f"img{i}", i % 2] for i in range(4)])
    assert load_dataset(tmp_path).task is Task.BINARY
    write_csv(tmp_path / "a.csv", ["id", "diagnosis"], [[f"img{i}", [0, 3][i % 2]] for i in range(4)])
    ds = load_dataset(tmp_path)
    assert ds.class_names == ["0", "1", "2", "3"] and ds.class_counts("train").tolist() == [2, 0, 0, 2]


def test_mixed_modes_and_sizes_go_to_the_majority_with_a_warning(tmp_path, caplog):
    make_folder(tmp_path, n=3, mode="RGB", size=(20, 16))
    Image.fromarray(np.full((10, 12), 200, np.uint8)).save(tmp_path / "images" / "grey.png")
    write_csv(tmp_path / "l.csv", ["id", "label"], [[f"img{i}", i % 2] for i in range(3)] + [["grey", 1]])
    ds = load_dataset(tmp_path)
    with caplog.at_level(logging.WARNING, logger="medveil"):
        images = ds.split("train").images
    assert images.shape == (4, 16, 20, 3)
    assert np.all(images[3] == 200)  # grey -> RGB repeats the channel, resize keeps the flat value
    text = caplog.text
    assert "1 of 4 images are grey; converting them to RGB" in text
    assert "1 of 4 images are not 20x16; resizing" in text


def test_subset_decodes_only_its_rows(tmp_path):
    arrays = make_folder(tmp_path, n=5)
    write_csv(tmp_path / "l.csv", ["id", "label"], [[f"img{i}", i % 2] for i in range(5)])
    sub = load_dataset(tmp_path).split("train").subset(np.array([4, 1]))
    assert sub.ids.tolist() == ["img4", "img1"]
    np.testing.assert_array_equal(sub.images[0], arrays[4])


@pytest.mark.parametrize("case, kwargs, error, match", [
    ("label", dict(classes=["a", "b"]), DataError, r"l\.csv row 4 \(id 'img2'\): label 'c' is outside"),
    ("column", dict(label_column="grade"), DataError, r"no column 'grade' \(columns: id, label\)"),
    ("task", dict(task="binary"), ConfigError, "binary needs 2 classes"),
])
def test_bad_labels_and_options(tmp_path, case, kwargs, error, match):
    make_folder(tmp_path, n=3)
    write_csv(tmp_path / "l.csv", ["id", "label"], [["img0", "a"], ["img1", "b"], ["img2", "c"]])
    with pytest.raises(error, match=match):
        load_dataset(tmp_path, **kwargs)


def test_aptos_labels_without_decoding(aptos_dir):
    ds = load_dataset(aptos_dir)
    assert ds.name == "aptos2019" and ds.task is Task.ORDINAL and ds.modality == "colour fundus"
    assert list(ds.splits) == ["train"] and len(ds.split("train")) == 3662
    assert ds.class_counts("train").tolist() == [1805, 370, 999, 193, 295]
    assert ds.image_shape == (224, 224, 3)
    sub = ds.split("train").subset(np.arange(0, 3662, 400))  # decodes 10 images only
    assert sub.images.shape == (10, 224, 224, 3)
    assert sub.ids[0] == "000c1434d8d7"
