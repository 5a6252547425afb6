"""DICOM files: pixels -> uint8 with windowing, Modality and PatientID from the header.

pydicom is an optional extra (``pip install medveil[dicom]``), imported only when a DICOM
file is actually read. Pixel conversion for one-channel images: the modality LUT
(RescaleSlope/Intercept, e.g. CT Hounsfield units), then the window (the caller's
``(center, width)``, else the file's WindowCenter/WindowWidth, else the image's min-max)
mapped linearly to 0..255; MONOCHROME1 is inverted so that bright means dense everywhere.
Colour images (SamplesPerPixel 3) come out RGB. Of a multi-frame file the middle frame is used.

This module is the decoder, below :class:`medveil.data.imagefiles.ImageFiles`; the readers above
it are :func:`medveil.data.dicom_folder.read_dicom` (one ``.dcm`` file or a folder of them, no
labels) and :func:`medveil.data.folder_csv.read_image_folder` (``.dcm`` files with a CSV of
labels), both decoding through here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from medveil.errors import DataError, at

INSTALL_HINT = "pip install medveil[dicom]"


@dataclass(frozen=True)
class DicomHeader:
    modality: str
    patient_id: str
    shape: tuple[int, int, int]  # (H, W, C)


def _pydicom() -> ModuleType:
    try:
        import pydicom
    except ImportError:
        raise DataError(f"reading DICOM files needs pydicom: {INSTALL_HINT}") from None
    return pydicom


def _modality_lut(arr: np.ndarray, ds) -> np.ndarray:
    try:
        from pydicom.pixels import apply_modality_lut  # pydicom >= 3
    except ImportError:  # pragma: no cover - pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_modality_lut
    return apply_modality_lut(arr, ds)


def dicom_header(path: Path, where: str = "") -> DicomHeader:
    """Modality, PatientID and (H, W, C) without reading the pixel data."""
    pydicom = _pydicom()
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        shape = (int(ds.Rows), int(ds.Columns), 3 if int(ds.get("SamplesPerPixel", 1)) == 3 else 1)
    except Exception as err:  # pydicom raises many types for a bad file
        raise DataError(f"{at(where)}{path}: not a readable DICOM image "
                        f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    return DicomHeader(str(ds.get("Modality", "") or "unknown"), str(ds.get("PatientID", "") or ""),
                       shape)


def dicom_shape(path: Path, where: str = "") -> tuple[int, int, int]:
    return dicom_header(path, where).shape


def dicom_pixels(path: Path, window: tuple[float, float] | None = None, where: str = "") -> np.ndarray:
    """uint8 (H, W) grey or (H, W, 3) RGB pixels of one DICOM file."""
    pydicom = _pydicom()
    try:
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array
        samples = int(ds.get("SamplesPerPixel", 1))
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except Exception as err:  # pydicom raises many types for a bad or truncated file
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{at(where)}{path}: corrupt or unreadable DICOM pixel data "
                        f"({reason})") from None
    if frames > 1:
        arr = arr[frames // 2]
    if samples == 3:
        return arr if arr.dtype == np.uint8 else _minmax(arr.astype(np.float64))
    values = _modality_lut(arr, ds).astype(np.float64)
    window = window or _window_from_tags(ds)
    out = _apply_window(values, *window) if window else _minmax(values)
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        out = 255 - out
    return out


def _window_from_tags(ds) -> tuple[float, float] | None:
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    first = lambda v: float(v[0]) if isinstance(v, Sequence) and not isinstance(v, str) else float(v)
    c, w = first(center), first(width)
    return (c, w) if w > 0 else None


def _apply_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    lo = center - width / 2.0
    return np.rint(np.clip((values - lo) / width, 0.0, 1.0) * 255.0).astype(np.uint8)


def _minmax(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - lo) / (hi - lo) * 255.0).astype(np.uint8)


def modality_name(headers: Sequence[DicomHeader]) -> str:
    """'CT', or 'CT/MR' for a folder that mixes modalities (most common first)."""
    counts = Counter(h.modality for h in headers)
    return "/".join(m for m, _ in counts.most_common())
