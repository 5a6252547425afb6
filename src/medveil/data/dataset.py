"""The one in-memory shape every reader produces: :class:`ImageDataset`.

A dataset has a task, class names, a modality and named splits ("train", "val", "test";
a source without splits has everything in "train"). Images are kept as uint8 arrays
``(N, H, W, C)`` (C = 1 for grey, 3 for colour) and decoded lazily for folder/DICOM
sources, so ``medveil data info`` never decodes what it does not need.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np

from medveil.errors import DataError


class Task(str, Enum):
    MULTICLASS = "multi-class"
    BINARY = "binary"
    ORDINAL = "ordinal"
    MULTILABEL = "multi-label"


@dataclass
class Split:
    """One split: labels always in memory, images loaded on first use.

    labels: (N,) int64 class index, or (N, C) {0,1} for multi-label tasks.
    ids: per-image identifiers (file names, ISIC ids ...) or None.
    patient_ids: per-image patient/subject id or None.
    load_subset: optional loader of only some rows (indices -> images), so that a subset of a
        folder/DICOM split decodes only its own files.
    """

    labels: np.ndarray
    load_images: Callable[[], np.ndarray]
    ids: np.ndarray | None = None
    patient_ids: np.ndarray | None = None
    load_subset: Callable[[np.ndarray], np.ndarray] | None = field(default=None, repr=False)
    _images: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: np.ndarray) -> Split:
        """The rows at ``indices`` as a new split; images stay lazy when not loaded yet."""
        idx = np.asarray(indices, dtype=np.int64)
        if self._images is not None:
            images = self._images[idx]
            load, load_subset = (lambda: images), (lambda j: images[j])
        elif self.load_subset is not None:
            parent = self.load_subset
            load, load_subset = (lambda: parent(idx)), (lambda j: parent(idx[j]))
        else:
            load, load_subset = (lambda: self.images[idx]), (lambda j: self.images[idx[j]])
        pick = lambda a: None if a is None else a[idx]
        return Split(labels=self.labels[idx], load_images=load, ids=pick(self.ids),
                     patient_ids=pick(self.patient_ids), load_subset=load_subset)

    @property
    def images(self) -> np.ndarray:
        """uint8 (N, H, W, C)."""
        if self._images is None:
            images = self.load_images()
            if images.ndim == 3:
                images = images[..., None]
            if images.ndim != 4 or images.dtype != np.uint8:
                raise DataError(
                    f"images must be uint8 (N,H,W[,C]); got {images.dtype} {images.shape}"
                )
            if images.shape[0] != len(self):
                raise DataError(
                    f"{images.shape[0]} images but {len(self)} labels in one split"
                )
            self._images = images
        return self._images


@dataclass
class ImageDataset:
    name: str
    task: Task
    class_names: list[str]
    modality: str
    splits: dict[str, Split]
    source: Path
    image_shape: tuple[int, int, int] | None = None  # (H, W, C) when known without decoding
    source_kind: str = ""  # "MedMNIST .npz", "image folder + CSV", "DICOM"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise DataError(
                f"{self.source}: no split {name!r} (has {', '.join(self.splits) or 'none'})"
            )
        return self.splits[name]

    def class_counts(self, split: str) -> np.ndarray:
        """(num_classes,) image count per class in one split."""
        labels = self.split(split).labels
        if self.task is Task.MULTILABEL:
            return labels.sum(axis=0).astype(np.int64)
        return np.bincount(labels, minlength=self.num_classes).astype(np.int64)
