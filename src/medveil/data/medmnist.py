"""Reader for MedMNIST-format ``.npz`` files.

Layout: ``{train,val,test}_images`` uint8 (N, H, W) grey or (N, H, W, 3) colour and
``{train,val,test}_labels`` uint8 (N, 1) (or (N, C) for multi-label); optional
``{split}_ids``. Unknown file names are accepted as multi-class with classes inferred
from the labels (modality "unknown").
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from medveil.data.catalog import MEDMNIST, medmnist_key
from medveil.data.dataset import ImageDataset, Split, Task
from medveil.errors import DataError

SPLITS = ("train", "val", "test")


def read_medmnist(path: Path) -> ImageDataset:
    try:
        archive = np.load(path, allow_pickle=False)
        keys = set(archive.files)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"{path}: not a readable .npz file ({err})") from None

    present = [s for s in SPLITS if f"{s}_images" in keys]
    if not present:
        raise DataError(f"{path}: no '<split>_images' arrays (has {sorted(keys)})")
    info = MEDMNIST.get(medmnist_key(path.stem))

    splits: dict[str, Split] = {}
    shape: tuple[int, int, int] | None = None
    for name in present:
        if f"{name}_labels" not in keys:
            raise DataError(f"{path}: '{name}_images' has no matching '{name}_labels'")
        try:
            labels = archive[f"{name}_labels"]
            images = archive[f"{name}_images"]
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
            raise DataError(f"{path}: array '{name}_images' is corrupt ({err})") from None
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise DataError(
                f"{path}: '{name}_images' must be uint8 (N,H,W[,C]), got {images.dtype} "
                f"{images.shape}"
            )
        if len(images) != len(labels):
            raise DataError(
                f"{path}: split '{name}' has {len(images)} images but {len(labels)} labels"
            )
        ids = archive[f"{name}_ids"] if f"{name}_ids" in keys else None
        multilabel = info is not None and info.task is Task.MULTILABEL
        labels = labels.astype(np.int64)
        labels = labels if multilabel else labels.reshape(len(labels), -1)[:, 0]
        splits[name] = Split(labels=labels, load_images=lambda im=images: im, ids=ids)
        h, w = images.shape[1:3]
        shape = (h, w, images.shape[3] if images.ndim == 4 else 1)

    if info is None:
        n_classes = int(max(s.labels.max() for s in splits.values() if len(s)) + 1)
        task = Task.BINARY if n_classes == 2 else Task.MULTICLASS
        class_names = [str(i) for i in range(n_classes)]
        modality = "unknown"
    else:
        task, class_names, modality = info.task, list(info.class_names), info.modality

    dataset = ImageDataset(
        name=path.stem, task=task, class_names=class_names, modality=modality,
        splits=splits, source=path, image_shape=shape,
    )
    _check_labels(dataset)
    return dataset


def _check_labels(dataset: ImageDataset) -> None:
    for name, split in dataset.splits.items():
        if len(split) == 0:
            continue
        if dataset.task is Task.MULTILABEL:
            if split.labels.shape[1] != dataset.num_classes:
                raise DataError(f"{dataset.source}: split '{name}' labels have "
                                f"{split.labels.shape[1]} columns, expected {dataset.num_classes}")
            continue
        bad = np.flatnonzero((split.labels < 0) | (split.labels >= dataset.num_classes))
        if bad.size:
            raise DataError(
                f"{dataset.source}: split '{name}' row {bad[0]} has label {split.labels[bad[0]]} "
                f"outside the {dataset.num_classes} declared classes"
            )
