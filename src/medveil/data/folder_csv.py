"""Reader for a folder of images plus a CSV of labels (APTOS-style, and most hospital exports).

The CSV has one row per image: an id column (file name with or without extension, or a path
relative to the CSV's folder), a label column, and optionally a patient/subject id column and a
split column. Column names are auto-detected (see ``ID_COLUMNS`` ...) or given explicitly.
Images are found in the CSV's folder or one of its sub-folders (``train_images/`` ...), as
``<id>`` or ``<id>.<ext>`` with ext in .png .jpg .jpeg .tif .tiff .bmp .dcm.

Nothing is decoded at load time: labels, ids and patients are read from the CSV and images
are decoded on first use (in parallel, see :class:`medveil.data.imagefiles.ImageFiles`).
Row numbers in messages count the header as row 1, as a spreadsheet shows them.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medveil.data.catalog import folder_info
from medveil.data.dataset import ImageDataset, Split, Task
from medveil.data.imagefiles import IMAGE_EXTENSIONS, ImageFiles, is_dicom
from medveil.data.labels import encode_labels
from medveil.errors import ConfigError, DataError

log = logging.getLogger(__name__)

ID_COLUMNS = ("id_code", "id", "image_id", "image", "file", "filename", "file_name", "path",
              "image_path", "isic_id")
LABEL_COLUMNS = ("diagnosis", "label", "grade", "class", "target", "level", "dx")
PATIENT_COLUMNS = ("patient", "patient_id", "patientid", "subject", "subject_id", "subjectid")
SPLIT_COLUMNS = ("split", "fold", "subset", "partition")
_SPLIT_ALIASES = {"training": "train", "valid": "val", "validation": "val", "dev": "val",
                  "testing": "test"}


@dataclass(frozen=True)
class Columns:
    id: str
    label: str
    patient: str | None
    split: str | None


def read_image_folder(
    path: Path,
    *,
    csv_path: Path | None = None,
    image_dir: str | Path | None = None,
    id_column: str | None = None,
    label_column: str | None = None,
    patient_column: str | None = None,
    split_column: str | None = None,
    classes: Sequence[str] | None = None,
    task: str | Task | None = None,
    modality: str | None = None,
    size: int | tuple[int, int] | None = None,
    window: tuple[float, float] | None = None,
) -> ImageDataset:
    """Read ``path`` (a folder holding one CSV, or the CSV file itself) into an ImageDataset.

    size: resize every image to size x size (or (H, W)); None keeps the most common size.
    window: DICOM (center, width) when the images are ``.dcm`` files.
    """
    table = csv_path or (path if path.is_file() else find_csv(path))
    base = table.parent
    header, rows, lines = read_csv(table)
    cols = Columns(
        id=_column(table, header, id_column, ID_COLUMNS, "id", "--id-column"),
        label=_column(table, header, label_column, LABEL_COLUMNS, "label", "--label-column"),
        patient=_column(table, header, patient_column, PATIENT_COLUMNS, None, "--patient-column"),
        split=_column(table, header, split_column, SPLIT_COLUMNS, None, "--split-column"),
    )
    ids = [row[cols.id].strip() for row in rows]
    where = [f"{table} row {line} (id {i!r})" for line, i in zip(lines, ids)]
    for k, i in enumerate(ids):
        if not i:
            raise DataError(f"{table} row {lines[k]}: empty id in column {cols.id!r}")
    if len(set(ids)) != len(ids):
        log.warning("%s: %d ids appear on more than one row", table, len(ids) - len(set(ids)))

    folder = find_image_dir(table, base, ids, image_dir)
    files = _resolve_files(folder, ids, where)

    info = folder_info(base.name) if classes is None and task is None else None
    labels, class_names, resolved_task = encode_labels(
        [row[cols.label] for row in rows], lambda k: where[k],
        classes=info.class_names if info else classes, task=info.task if info else task,
    )
    dicom_headers = _dicom_headers(files, where) if any(is_dicom(f) for f in files) else None
    all_dicom = dicom_headers is not None and len(dicom_headers) == len(files)
    store = ImageFiles(files, where=where, size=_size(size), window=window,
                       shapes=[h.shape for h in dicom_headers] if all_dicom else None)
    patients = _patients(rows, cols.patient, dicom_headers)
    split_of = _split_names(rows, cols.split, where)
    id_array = np.asarray(ids)

    splits: dict[str, Split] = {}
    for name in _ordered(split_of):
        idx = np.flatnonzero(split_of == name)
        splits[name] = Split(
            labels=labels[idx],
            load_images=lambda idx=idx: store.decode(idx),
            ids=id_array[idx],
            patient_ids=None if patients is None else patients[idx],
            load_subset=lambda j, idx=idx: store.decode(idx[j]),
        )

    if modality is None:
        if dicom_headers is not None:
            from medveil.data.dicom import modality_name

            modality = modality_name(dicom_headers)
        else:
            modality = info.modality if info else "unknown"
    return ImageDataset(
        name=base.name if path.is_dir() else table.stem,
        task=resolved_task, class_names=class_names, modality=modality, splits=splits,
        source=path, image_shape=store.first_shape(), source_kind="image folder + CSV",
    )


def find_csv(folder: Path) -> Path:
    tables = sorted(p for p in folder.glob("*.csv") if p.is_file())
    if not tables:
        raise DataError(f"{folder}: no CSV of labels in this folder (expected e.g. labels.csv "
                        "with an id and a label column)")
    if len(tables) > 1:
        names = ", ".join(p.name for p in tables)
        raise DataError(f"{folder}: several CSV files ({names}); pass the one to use as the path")
    return tables[0]


def read_csv(table: Path) -> tuple[list[str], list[dict[str, str]], list[int]]:
    """Header, rows (dicts) and each row's line number (header = 1); errors name the file."""
    try:
        with table.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            reader.fieldnames = header
            rows, lines = [], []
            for row in reader:
                if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                    continue  # blank line
                if None in row or any(v is None for v in row.values()):
                    raise DataError(f"{table} row {reader.line_num}: has "
                                    f"{len(row) - 1 + len(row.get(None, []))} cells, the header "
                                    f"has {len(header)}")
                rows.append(row)
                lines.append(reader.line_num)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{table}: not a readable CSV file ({err})") from None
    if not header:
        raise DataError(f"{table}: empty file (no header row)")
    if not rows:
        raise DataError(f"{table}: no data rows (only a header): the dataset is empty")
    return header, rows, lines


def _column(table: Path, header: list[str], given: str | None, candidates: Sequence[str],
            role: str | None, option: str) -> str | None:
    """The header name to use: ``given`` (must exist) or the first auto-detected candidate.

    role: "id"/"label" when the column is required; None for optional columns.
    """
    lowered = {h.lower(): h for h in header}
    if given is not None:
        if given in header:
            return given
        if given.lower() in lowered:
            return lowered[given.lower()]
        raise DataError(f"{table}: no column {given!r} (columns: {', '.join(header)})")
    found = next((lowered[c] for c in candidates if c in lowered), None)
    if found is None and role is not None:
        raise DataError(f"{table}: cannot tell which column holds the {role}; name it with "
                        f"{option} (columns: {', '.join(header)})")
    return found


class _FileIndex:
    """File names of one folder, looked up by full name or by stem with an image extension."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        with os.scandir(folder) as entries:
            names = sorted(e.name for e in entries if e.is_file())
        self.names = set(names)
        self.stems: dict[str, str] = {}
        for ext in IMAGE_EXTENSIONS:  # earlier extensions win when a stem has several
            for name in names:
                stem, suffix = os.path.splitext(name)
                if suffix.lower() == ext:
                    self.stems.setdefault(stem, name)

    def find(self, image_id: str) -> Path | None:
        if "/" in image_id or os.sep in image_id:
            return _find_relative(self.folder, image_id)
        if image_id in self.names:
            return self.folder / image_id
        name = self.stems.get(image_id)
        return self.folder / name if name else None


def _find_relative(folder: Path, image_id: str) -> Path | None:
    candidate = folder / image_id
    if candidate.is_file():
        return candidate
    for ext in IMAGE_EXTENSIONS:
        for suffix in (ext, ext.upper()):
            with_ext = candidate.with_name(candidate.name + suffix)
            if with_ext.is_file():
                return with_ext
    return None


def find_image_dir(
    table: Path, base: Path, ids: Sequence[str], image_dir: str | Path | None
) -> _FileIndex:
    """The folder whose files match the ids: ``image_dir`` or the CSV's folder or a sub-folder."""
    probe = list(ids[:20])
    if image_dir is not None:
        folder = Path(image_dir) if Path(image_dir).is_absolute() else base / image_dir
        if not folder.is_dir():
            raise DataError(f"{folder}: image folder not found")
        return _FileIndex(folder)
    candidates = [base] + sorted(
        d for d in base.iterdir() if d.is_dir() and not d.name.startswith((".", "_"))
    )
    best, best_hits = None, 0
    for folder in candidates:
        index = _FileIndex(folder)
        hits = sum(index.find(i) is not None for i in probe)
        if hits > best_hits:
            best, best_hits = index, hits
        if hits == len(probe):
            break
    if best is None:
        shown = ", ".join(repr(i) for i in probe[:3])
        raise DataError(f"{table}: no image file for ids {shown} ... in {base} or its sub-folders "
                        "(name the image folder with --image-dir)")
    return best


def _resolve_files(index: _FileIndex, ids: Sequence[str], where: Sequence[str]) -> list[Path]:
    files = [index.find(i) for i in ids]
    missing = [k for k, f in enumerate(files) if f is None]
    if missing:
        k = missing[0]
        more = f" ({len(missing)} rows in all have no image)" if len(missing) > 1 else ""
        raise DataError(f"{where[k]}: image not found in {index.folder} (looked for "
                        f"{ids[k]} and {ids[k]}.png/.jpg/.jpeg/.tif/.bmp/.dcm){more}")
    return files  # type: ignore[return-value]


def _dicom_headers(files: Sequence[Path], where: Sequence[str]) -> list:
    from medveil.data.dicom import dicom_header

    return [dicom_header(f, w) for f, w in zip(files, where) if is_dicom(f)]


def _patients(
    rows: list[dict[str, str]], column: str | None, dicom_headers: list | None
) -> np.ndarray | None:
    if column is not None:
        return np.asarray([row[column].strip() for row in rows])
    if dicom_headers is not None and len(dicom_headers) == len(rows):
        ids = [h.patient_id for h in dicom_headers]
        return np.asarray(ids) if all(ids) else None
    return None


def _split_names(rows: list[dict[str, str]], column: str | None, where: Sequence[str]) -> np.ndarray:
    if column is None:
        return np.full(len(rows), "train")
    names = []
    for k, row in enumerate(rows):
        value = row[column].strip().lower()
        if not value:
            raise DataError(f"{where[k]}: empty split in column {column!r}")
        names.append(_SPLIT_ALIASES.get(value, value))
    return np.asarray(names)


def _ordered(split_of: np.ndarray) -> list[str]:
    seen = list(dict.fromkeys(split_of.tolist()))
    standard = [s for s in ("train", "val", "test") if s in seen]
    return standard + [s for s in seen if s not in standard]


def _size(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if h <= 0 or w <= 0:
        raise ConfigError(f"image size must be positive, got {size}")
    return h, w

