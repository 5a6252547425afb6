"""Dispatch, data-root resolution, MedMNIST .npz files, shipped samples and to_tensor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medveil.data import ImageDataset, Task, load_dataset, to_tensor
from medveil.data.roots import ENV_VAR, resolve_path
from medveil.data.samples import SAMPLE_NAMES, sample_path
from medveil.errors import ConfigError, DataError

SAMPLE_CLASSES = {"bloodmnist": 8, "organamnist": 11, "retinamnist": 5, "breastmnist": 2,
                  "pneumoniamnist": 2, "ham10000": 7}


def test_bloodmnist_counts_and_lazy_images(shared_data):
    ds = load_dataset(shared_data / "medmnist" / "bloodmnist.npz")
    assert ds.num_classes == 8 and ds.task is Task.MULTICLASS
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 11959, "val": 1712, "test": 3421}
    assert ds.image_shape == (28, 28, 3) and ds.source_kind == "MedMNIST .npz"
    assert ds.splits["train"]._images is None  # nothing read until asked
    assert ds.split("val").images.shape == (1712, 28, 28, 3)


def test_bare_names_resolve_under_data_root_or_env(shared_data, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(DataError, match=f"set {ENV_VAR} or pass --data-root"):
        resolve_path("bloodmnist")
    expected = shared_data / "medmnist" / "bloodmnist.npz"
    assert resolve_path("bloodmnist", shared_data) == expected
    assert resolve_path("medmnist/bloodmnist.npz", shared_data) == expected
    monkeypatch.setenv(ENV_VAR, str(shared_data))
    assert resolve_path("bloodmnist") == expected
    assert resolve_path("aptos2019") == shared_data / "aptos2019"
    with pytest.raises(DataError, match="not found in data root"):
        resolve_path("nosuchset")


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_shipped_samples_load(name):
    ds = load_dataset(sample_path(name))
    assert ds.num_classes == SAMPLE_CLASSES[name]
    assert len(ds.split("train")) == 300 and len(ds.split("val")) == 60
    assert 150 <= len(ds.split("test")) <= 200
    counts = ds.class_counts("train")
    assert counts.sum() == 300 and (counts > 0).all()  # stratified: every class present
    images = ds.split("test").images
    assert images.dtype == np.uint8 and images.shape[1:3] == (28, 28)
    if name == "ham10000":
        assert ds.split("train").ids[0].startswith("ISIC_")
    assert load_dataset(f"sample:{name}").name == name


def test_samples_are_stratified_subsets(shared_data):
    full = load_dataset(shared_data / "medmnist" / "bloodmnist.npz")
    sample = load_dataset(sample_path("bloodmnist"))
    share_full = full.class_counts("train") / len(full.split("train"))
    share_sample = sample.class_counts("train") / 300
    assert np.abs(share_full - share_sample).max() < 0.01


def test_npz_rejects_folder_options():
    with pytest.raises(ConfigError, match="--label-column cannot be used with .npz"):
        load_dataset(sample_path("breastmnist"), label_column="x")


def test_empty_and_unknown_npz(tmp_path):
    empty = tmp_path / "empty.npz"
    np.savez(empty, train_images=np.zeros((0, 28, 28), np.uint8), train_labels=np.zeros((0, 1)))
    with pytest.raises(DataError, match="dataset is empty"):
        load_dataset(empty)
    unknown = tmp_path / "mine_64.npz"
    np.savez(unknown, train_images=np.zeros((4, 64, 64), np.uint8),
             train_labels=np.array([[0], [1], [2], [1]], np.uint8))
    ds = load_dataset(unknown)
    assert isinstance(ds, ImageDataset) and ds.class_names == ["0", "1", "2"]
    assert ds.modality == "unknown" and ds.image_shape == (64, 64, 1)


def test_to_tensor_channels_and_resize():
    grey = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4) * 7
    x = to_tensor(grey, channels=3)
    assert x.shape == (2, 3, 4, 4) and x.dtype == torch.float32
    assert torch.equal(x[:, 0], x[:, 2]) and torch.allclose(x[:, 0], torch.from_numpy(grey / 255).float())
    rgb = np.zeros((1, 6, 6, 3), np.uint8)
    rgb[..., 1] = 255  # pure green -> luma 0.587
    y = to_tensor(rgb, size=3, channels=1)
    assert y.shape == (1, 1, 3, 3) and torch.allclose(y, torch.full_like(y, 0.587), atol=1e-6)
    big = to_tensor(np.full((1, 28, 28, 3), 128, np.uint8), size=64)
    assert big.shape == (1, 3, 64, 64) and torch.allclose(big, torch.full_like(big, 128 / 255))
