"""Read images without labels: one ``.dcm`` file or a folder of them (searched recursively)
becomes an unlabelled dataset (one class, "unlabelled"; Modality and PatientID from the
headers); so does a folder of plain images (PNG, JPEG, TIFF ...) without a CSV (ids: the file
paths inside the folder, without suffix; modality unknown). A reader beside :mod:`.medmnist` and :mod:`.folder_csv`; pixels are decoded
by :class:`medveil.data.imagefiles.ImageFiles` through :mod:`medveil.data.dicom`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medveil.data.dataset import ImageDataset, Split, Task
from medveil.data.dicom import dicom_header, modality_name
from medveil.data.imagefiles import PIL_EXTENSIONS, ImageFiles
from medveil.errors import DataError


def read_dicom(path: Path, size: tuple[int, int] | None = None,
               window: tuple[float, float] | None = None) -> ImageDataset:
    """One ``.dcm`` file or a folder of them (searched recursively), unlabelled."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() == ".dcm")
        if not files:
            raise DataError(f"{path}: no .dcm files in this folder")
        ids = np.array([str(p.relative_to(path).with_suffix("")) for p in files])
    else:
        files, ids = [path], np.array([path.stem])
    headers = [dicom_header(p) for p in files]
    store = ImageFiles(files, size=size, window=window, shapes=[h.shape for h in headers])
    patients = np.array([h.patient_id for h in headers])
    split = Split(labels=np.zeros(len(files), dtype=np.int64), load_images=store.decode,
                  ids=ids, patient_ids=patients if all(patients) else None,
                  load_subset=store.decode)
    return ImageDataset(
        name=path.stem if path.is_file() else path.name, task=Task.MULTICLASS,
        class_names=["unlabelled"], modality=modality_name(headers), splits={"train": split},
        source=path, image_shape=store.target(), source_kind="DICOM",
    )


def read_plain_images(path: Path, size: tuple[int, int] | None = None) -> ImageDataset:
    """A folder of plain image files (searched recursively) without labels."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in PIL_EXTENSIONS)
    if not files:
        raise DataError(f"{path}: no CSV of labels, no .dcm and no image files ({', '.join(PIL_EXTENSIONS)}) "
                        f"in this folder")
    ids = np.array([str(p.relative_to(path).with_suffix("")) for p in files])
    store = ImageFiles(files, where=[str(p) for p in files], size=size)
    split = Split(labels=np.zeros(len(files), dtype=np.int64), load_images=store.decode, ids=ids,
                  load_subset=store.decode)
    return ImageDataset(name=path.name, task=Task.MULTICLASS, class_names=["unlabelled"], modality="unknown",
                        splits={"train": split}, source=path, image_shape=store.target(),
                        source_kind="image folder without labels")
