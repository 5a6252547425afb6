"""Image files -> one uint8 array ``(N, H, W, C)``, decoded lazily and in parallel.

:class:`ImageFiles` is a list of image files (PNG/JPEG/TIFF/BMP through Pillow, ``.dcm``
through :mod:`medveil.data.dicom`) that share one target size and channel count:

- channels: grey stays 1 channel and colour 3; when a dataset mixes both, every image is
  converted to the majority and a warning says how many were converted.
- size: every image is resized to ``size`` when one is asked for; otherwise to the most common
  size, with a warning that counts the images resized.

The target is decided from file headers of *all* files (no pixel decoding), once per dataset,
so every split and every subset decodes to the same shape. ``header_shape`` reads one header,
which is all ``medveil data info`` needs.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from medveil.errors import DataError, at

log = logging.getLogger(__name__)

PIL_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_EXTENSIONS = (".dcm",)
IMAGE_EXTENSIONS = PIL_EXTENSIONS + DICOM_EXTENSIONS

# Pillow modes that hold one grey channel; every other mode is treated as colour (RGB).
GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def is_dicom(path: Path) -> bool:
    return path.suffix.lower() in DICOM_EXTENSIONS


def header_shape(path: Path, where: str = "") -> tuple[int, int, int]:
    """(H, W, C) of one image from its header only (C = 1 grey, 3 colour)."""
    if is_dicom(path):
        from medveil.data.dicom import dicom_shape

        return dicom_shape(path)
    try:
        with Image.open(path) as img:
            w, h = img.size
            return h, w, 1 if img.mode in GREY_MODES else 3
    except _PIL_ERRORS as err:
        raise DataError(f"{at(where)}{path}: corrupt or truncated image, or not an image "
                        f"({_reason(err)})") from None


def decode_image(path: Path, channels: int, size: tuple[int, int] | None, where: str = "",
                 window: tuple[float, float] | None = None) -> np.ndarray:
    """Decode one file to uint8 (H, W, channels), resized to ``size`` = (H, W) when given.

    window: DICOM only, (center, width) in modality units (e.g. Hounsfield for CT).
    """
    try:
        if is_dicom(path):
            from medveil.data.dicom import dicom_pixels

            img = Image.fromarray(_squeeze(dicom_pixels(path, window, where)))
        else:
            with Image.open(path) as opened:
                opened.load()
                img = _to_8bit(opened)
        mode = "L" if channels == 1 else "RGB"
        if img.mode != mode:
            img = img.convert(mode)
        if size is not None and (img.height, img.width) != size:
            img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
    except DataError:
        raise
    except _PIL_ERRORS as err:
        raise DataError(
            f"{at(where)}{path}: corrupt or truncated image ({_reason(err)})"
        ) from None
    return arr[..., None] if arr.ndim == 2 else arr


@dataclass
class ImageFiles:
    """Files of one dataset with a common target shape; decodes any subset on demand.

    files: image paths; where: per-file context for error messages (e.g. "labels.csv row 7
    (id 'abc')"); size: (H, W) to resize everything to, or None for the most common size;
    window: DICOM (center, width), None for the file's own window or min-max; shapes: the
    files' header shapes when the caller has read them already.
    """

    files: Sequence[Path]
    where: Sequence[str] | None = None
    size: tuple[int, int] | None = None
    window: tuple[float, float] | None = None
    shapes: Sequence[tuple[int, int, int]] | None = None  # per-file (H, W, C) if already known
    workers: int = field(default_factory=lambda: min(8, 2 * (os.cpu_count() or 1)))
    _target: tuple[int, int, int] | None = field(default=None, repr=False)

    def context(self, i: int) -> str:
        return self.where[i] if self.where is not None else ""

    def first_shape(self) -> tuple[int, int, int]:
        """(H, W, C) the images will have, from the first file's header (plus ``size``)."""
        h, w, c = header_shape(self.files[0], self.context(0))
        return (*self.size, c) if self.size is not None else (h, w, c)

    def target(self) -> tuple[int, int, int]:
        """(H, W, C) every image decodes to: majority channels, requested or most common size."""
        if self._target is None:
            shapes = list(self.shapes) if self.shapes is not None else self._map(
                lambda i: header_shape(self.files[i], self.context(i)),
                range(len(self.files)), "reading headers")
            self._target = _majority_shape(shapes, self.size)
        return self._target

    def decode(self, indices: np.ndarray | Sequence[int] | None = None) -> np.ndarray:
        """uint8 (n, H, W, C) for the files at ``indices`` (all files when None)."""
        idx = np.arange(len(self.files)) if indices is None else np.asarray(indices, dtype=np.int64)
        h, w, c = self.target()
        out = np.empty((len(idx), h, w, c), dtype=np.uint8)

        def work(j: int) -> None:
            i = int(idx[j])
            out[j] = decode_image(self.files[i], c, (h, w), self.context(i), self.window)

        self._map(work, range(len(idx)), "decoding images")
        return out

    def _map(self, fn, items, desc: str) -> list:
        items = list(items)
        if len(items) < 64 or self.workers <= 1:
            return [fn(i) for i in items]
        pool = ThreadPoolExecutor(self.workers)
        try:
            return list(tqdm(pool.map(fn, items), total=len(items), desc=desc,
                             leave=False, disable=None))
        finally:  # on the first error, drop the files not started yet
            pool.shutdown(wait=True, cancel_futures=True)


def _majority_shape(
    shapes: list[tuple[int, int, int]], size: tuple[int, int] | None
) -> tuple[int, int, int]:
    n = len(shapes)
    channels = Counter(s[2] for s in shapes)
    c = max(channels, key=lambda k: (channels[k], k))
    if len(channels) > 1:
        log.warning("%d of %d images are %s; converting them to %s (the majority)",
                    n - channels[c], n, "colour" if c == 1 else "grey", "grey" if c == 1 else "RGB")
    if size is not None:
        return size[0], size[1], c
    sizes = Counter(s[:2] for s in shapes)
    hw = max(sizes, key=lambda k: (sizes[k], k))
    if len(sizes) > 1:
        log.warning("%d of %d images are not %dx%d; resizing them to that most common size "
                    "(ask for a size to choose another)", n - sizes[hw], n, hw[1], hw[0])
    return hw[0], hw[1], c


def _to_8bit(img: Image.Image) -> Image.Image:
    """Deep grey modes (16-bit PNG/TIFF, float) -> 8-bit 'L' by min-max; others untouched."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        return Image.fromarray(np.rint(a).astype(np.uint8))
    if img.mode == "P":
        return img.convert("RGBA" if "transparency" in img.info else "RGB")
    return img


def _squeeze(a: np.ndarray) -> np.ndarray:
    return a[..., 0] if a.ndim == 3 and a.shape[2] == 1 else a


def _reason(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.split("\n")[0]
