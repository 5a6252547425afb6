"""Small MedMNIST subsets shipped inside the package (``medveil/samples/*.npz``), so the demo
and tests run on a fresh machine. Built by ``scripts/build_samples.py``; licences in
``medveil/samples/ATTRIBUTION.md`` (MedMNIST v2: CC BY 4.0; HAM10000: CC BY-NC 4.0)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from medveil.errors import DataError

SAMPLE_NAMES: tuple[str, ...] = (
    "bloodmnist", "organamnist", "retinamnist", "breastmnist", "pneumoniamnist", "ham10000",
)


def samples_dir() -> Path:
    return Path(str(files("medveil") / "samples"))


def sample_path(name: str) -> Path:
    """Path of the shipped sample ``name`` (one of :data:`SAMPLE_NAMES`; '.npz' optional)."""
    key = name.removesuffix(".npz")
    if key not in SAMPLE_NAMES:
        raise DataError(f"no shipped sample {name!r} (samples: {', '.join(SAMPLE_NAMES)})")
    path = samples_dir() / f"{key}.npz"
    if not path.is_file():
        raise DataError(f"{path}: shipped sample missing (rebuild with scripts/build_samples.py)")
    return path
