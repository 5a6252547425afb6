"""Data-layer speed on the real data: reading labels, decoding APTOS, finding duplicates.

    python benchmarks/data_loading.py [--quick] [--data-root ../shared/data] [--out FILE]

Prints a table and writes JSON (default benchmarks/results/data_loading.json). --quick decodes
500 APTOS images instead of all 3662. Timings are wall-clock seconds on this machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

from medveil.data import load_dataset
from medveil.data.duplicates import duplicate_groups
from medveil.io import write_json_atomic

REPO = Path(__file__).resolve().parents[1]


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="decode 500 APTOS images, not all")
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" /
                        "data_loading.json")
    args = parser.parse_args()

    rows = []
    blood, t = timed(lambda: load_dataset(args.data_root / "medmnist" / "bloodmnist.npz"))
    rows.append(("bloodmnist.npz: load (labels + headers)", len(blood.split("train")), t))
    _, t = timed(lambda: blood.split("train").images)
    rows.append(("bloodmnist.npz: read train images", len(blood.split("train")), t))

    aptos, t = timed(lambda: load_dataset(args.data_root / "aptos2019"))
    train = aptos.split("train")
    rows.append(("aptos2019: load (CSV + file index, as data info)", len(train), t))
    n = 500 if args.quick else len(train)
    part = train.subset(np.arange(n))
    images, t = timed(lambda: part.images)
    rows.append((f"aptos2019: decode {n} JPEGs 224 px (threads)", n, t))
    groups, t = timed(lambda: duplicate_groups(images))
    rows.append((f"aptos2019: duplicate groups over {n} images", n, t))

    print(f"{'step':52s} {'images':>7s} {'seconds':>8s} {'images/s':>9s}")
    for name, count, seconds in rows:
        print(f"{name:52s} {count:7d} {seconds:8.2f} {count / seconds:9.0f}")
    print(f"duplicate groups: {len(np.unique(groups))} distinct photographs among {n} images")

    result = {
        "quick": args.quick, "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "rows": [{"step": s, "images": c, "seconds": round(t, 3)} for s, c, t in rows],
        "aptos_distinct_photographs": int(len(np.unique(groups))), "aptos_images": n,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
