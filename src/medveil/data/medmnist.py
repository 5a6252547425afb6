"""Reader for MedMNIST-format ``.npz`` files.

Layout: ``{train,val,test}_images`` uint8 (N, H, W) grey or (N, H, W, 3) colour and
``{train,val,test}_labels`` uint8 (N, 1) (or (N, C) for multi-label); optional
``{split}_ids``. Unknown file names are accepted as multi-class with classes inferred
from the labels (modality "unknown"). Labels are read at once; image arrays are checked
from their ``.npy`` headers and read on first use, so ``data info`` stays fast at 224 px.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from medveil.data.catalog import MEDMNIST, medmnist_key
from medveil.data.dataset import ImageDataset, Split, Task
from medveil.errors import DataError

SPLITS = ("train", "val", "test")
_NPZ_ERRORS = (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError)


def read_medmnist(path: Path) -> ImageDataset:
    try:
        archive = np.load(path, allow_pickle=False)
        keys = set(archive.files)
    except _NPZ_ERRORS as err:
        raise DataError(f"{path}: not a readable .npz file ({err})") from None

    present = [s for s in SPLITS if f"{s}_images" in keys]
    if not present:
        raise DataError(f"{path}: no '<split>_images' arrays (has {sorted(keys)})")
    info = MEDMNIST.get(medmnist_key(path.stem))
    multilabel = info is not None and info.task is Task.MULTILABEL

    splits: dict[str, Split] = {}
    shape: tuple[int, int, int] | None = None
    for name in present:
        if f"{name}_labels" not in keys:
            raise DataError(f"{path}: '{name}_images' has no matching '{name}_labels'")
        labels = _read(archive, path, f"{name}_labels")
        img_shape, img_dtype = _array_header(archive, path, f"{name}_images")
        if img_shape[:1] == (0,) and len(labels) == 0:
            continue
        if img_dtype != np.uint8 or len(img_shape) not in (3, 4):
            raise DataError(f"{path}: '{name}_images' must be uint8 (N,H,W[,C]), got "
                            f"{img_dtype} {img_shape}")
        if img_shape[0] != len(labels):
            raise DataError(
                f"{path}: split '{name}' has {img_shape[0]} images but {len(labels)} labels"
            )
        ids = _read(archive, path, f"{name}_ids") if f"{name}_ids" in keys else None
        labels = labels.astype(np.int64)
        labels = labels if multilabel else labels.reshape(len(labels), -1)[:, 0]
        load = _lazy(archive, path, f"{name}_images")
        splits[name] = Split(labels=labels, load_images=load, ids=ids,
                             load_subset=lambda idx, load=load: load()[idx])
        shape = (img_shape[1], img_shape[2], img_shape[3] if len(img_shape) == 4 else 1)

    if not splits:
        raise DataError(f"{path}: dataset is empty (0 images in {', '.join(present)})")
    if info is None:
        n_classes = int(max(s.labels.max() for s in splits.values()) + 1)
        task = Task.BINARY if n_classes == 2 else Task.MULTICLASS
        class_names = [str(i) for i in range(n_classes)]
        modality = "unknown"
    else:
        task, class_names, modality = info.task, list(info.class_names), info.modality

    dataset = ImageDataset(
        name=path.stem, task=task, class_names=class_names, modality=modality,
        splits=splits, source=path, image_shape=shape, source_kind="MedMNIST .npz",
    )
    _check_labels(dataset)
    return dataset


def _read(archive, path: Path, key: str) -> np.ndarray:
    try:
        return archive[key]
    except _NPZ_ERRORS as err:
        raise DataError(f"{path}: array '{key}' is corrupt ({err})") from None


def _lazy(archive, path: Path, key: str):
    """A loader that reads ``key`` once, on first call."""
    cache: list[np.ndarray] = []

    def load() -> np.ndarray:
        if not cache:
            cache.append(_read(archive, path, key))
        return cache[0]

    return load


def _array_header(archive, path: Path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one array from its ``.npy`` header, without reading the data."""
    try:
        with archive.zip.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read(f)
    except _NPZ_ERRORS as err:
        raise DataError(f"{path}: array '{key}' is corrupt ({err})") from None
    return tuple(shape), dtype


def _check_labels(dataset: ImageDataset) -> None:
    for name, split in dataset.splits.items():
        if dataset.task is Task.MULTILABEL:
            if split.labels.ndim != 2 or split.labels.shape[1] != dataset.num_classes:
                raise DataError(f"{dataset.source}: split '{name}' labels have shape "
                                f"{split.labels.shape}, expected (N, {dataset.num_classes})")
            continue
        bad = np.flatnonzero((split.labels < 0) | (split.labels >= dataset.num_classes))
        if bad.size:
            raise DataError(
                f"{dataset.source}: split '{name}' row {bad[0]} has label {split.labels[bad[0]]} "
                f"outside the {dataset.num_classes} declared classes"
            )
