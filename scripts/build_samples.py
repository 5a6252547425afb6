"""Build the small MedMNIST samples shipped in src/medveil/samples/ from the full files.

    python scripts/build_samples.py [--source ../shared/data/medmnist] [--out src/medveil/samples]

Per dataset: a stratified subset (seed 0) of about 300 train / 60 val / 200 test images (all
of a split when it is smaller), same npz layout and key names as the source (``*_ids`` kept),
rows kept in source order. The npz is written byte-for-byte reproducibly (fixed zip
timestamps) and atomically. APTOS is never sampled (its terms forbid redistribution).
"""

from __future__ import annotations

import argparse
import io
import os
import zipfile
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

REPO = Path(__file__).resolve().parents[1]
NAMES = ("bloodmnist", "organamnist", "retinamnist", "breastmnist", "pneumoniamnist", "ham10000")
SIZES = {"train": 300, "val": 60, "test": 200}
SEED = 0


def subset_indices(labels: np.ndarray, n: int, seed: int = SEED) -> np.ndarray:
    """Sorted indices of a stratified subset of n rows (all rows when n >= len)."""
    if n >= len(labels):
        return np.arange(len(labels))
    y = labels.reshape(len(labels), -1)[:, 0]
    idx, _ = train_test_split(np.arange(len(y)), train_size=n, stratify=y, random_state=seed)
    return np.sort(idx)


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez_compressed layout, but with fixed timestamps, written atomically."""
    tmp = path.with_suffix(".npz.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buffer.getvalue(), compresslevel=9)
    os.replace(tmp, path)


def build(source: Path, out: Path) -> list[tuple[str, dict[str, int], int]]:
    out.mkdir(parents=True, exist_ok=True)
    report = []
    for name in NAMES:
        with np.load(source / f"{name}.npz", allow_pickle=False) as full:
            arrays: dict[str, np.ndarray] = {}
            counts = {}
            for split, n in SIZES.items():
                idx = subset_indices(full[f"{split}_labels"], n)
                for key in ("images", "labels", "ids"):
                    if f"{split}_{key}" in full.files:
                        arrays[f"{split}_{key}"] = full[f"{split}_{key}"][idx]
                counts[split] = len(idx)
        path = out / f"{name}.npz"
        write_npz(path, arrays)
        report.append((name, counts, path.stat().st_size))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=REPO.parent / "shared" / "data" / "medmnist")
    parser.add_argument("--out", type=Path, default=REPO / "src" / "medveil" / "samples")
    args = parser.parse_args()
    total = 0
    for name, counts, size in build(args.source, args.out):
        total += size
        print(f"{name:15s} train {counts['train']:4d}  val {counts['val']:3d}  "
              f"test {counts['test']:4d}  {size / 1e3:7.1f} kB")
    print(f"{'total':15s} {total / 1e6:.2f} MB in {args.out}")


if __name__ == "__main__":
    main()
