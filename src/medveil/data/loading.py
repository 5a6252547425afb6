"""Pick the reader for a path: ``.npz`` -> MedMNIST, a folder with a CSV (or the CSV itself)
-> image folder, ``.dcm`` file or a folder of them -> DICOM. Bare names resolve against the
data root (see :mod:`medveil.data.roots`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medveil.data.dataset import ImageDataset, Task
from medveil.data.medmnist import read_medmnist
from medveil.data.roots import resolve_path
from medveil.errors import ConfigError, DataError

# Options of load_dataset that a DICOM folder without a CSV accepts (a .npz accepts none).
_DICOM_OK = ("size", "window", "modality")


def load_dataset(
    path: str | Path,
    *,
    data_root: str | Path | None = None,
    id_column: str | None = None,
    label_column: str | None = None,
    patient_column: str | None = None,
    split_column: str | None = None,
    image_dir: str | Path | None = None,
    classes: Sequence[str] | None = None,
    task: str | Task | None = None,
    modality: str | None = None,
    size: int | tuple[int, int] | None = None,
    window: tuple[float, float] | None = None,
) -> ImageDataset:
    """Load a dataset from a path or a name under the data root.

    Column/class/task options apply to image folders with a CSV; ``size``/``window``/
    ``modality`` also to DICOM; a ``.npz`` file takes none of them (resize with ``to_tensor``).
    """
    p = resolve_path(path, data_root)
    options: dict[str, Any] = {
        k: v for k, v in dict(
            id_column=id_column, label_column=label_column, patient_column=patient_column,
            split_column=split_column, image_dir=image_dir, classes=classes, task=task,
            modality=modality, size=size, window=window,
        ).items() if v is not None
    }
    suffix = p.suffix.lower()
    if p.is_file() and suffix == ".npz":
        _reject(p, options, allowed=(), kind=".npz files")
        return read_medmnist(p)
    if (p.is_file() and suffix == ".csv") or (p.is_dir() and any(p.glob("*.csv"))):
        from medveil.data.folder_csv import read_image_folder

        return read_image_folder(p, **options)
    if (p.is_file() and suffix == ".dcm") or (p.is_dir() and _has_dicom(p)):
        from medveil.data.dicom_folder import read_dicom

        _reject(p, options, allowed=_DICOM_OK, kind="DICOM files without a CSV")
        dataset = read_dicom(p, size=_square(size), window=window)
        if modality is not None:
            dataset.modality = modality
        return dataset
    if p.is_dir():
        from medveil.data.dicom_folder import read_plain_images

        _reject(p, options, allowed=("size", "modality"), kind="image folders without a CSV")
        dataset = read_plain_images(p, size=_square(size))
        if modality is not None:
            dataset.modality = modality
        return dataset
    raise DataError(f"{p}: not a dataset MedVeil can read (.npz, image folder + CSV, DICOM)")


def _has_dicom(folder: Path) -> bool:
    return any(q.suffix.lower() == ".dcm" for q in folder.rglob("*"))


def _square(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _reject(path: Path, options: dict[str, Any], allowed: Sequence[str], kind: str) -> None:
    extra = [k for k in options if k not in allowed]
    if extra:
        names = ", ".join(f"--{k.replace('_', '-')}" for k in extra)
        raise ConfigError(f"{path}: {names} cannot be used with {kind}")
