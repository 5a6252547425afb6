"""Run the demo config's federation and three variants of it into OUT (demo: distill + head
calibration; relay; fedavg with the coordinate-wise median; fedavg with the trimmed mean, no
calibration), about a minute on 2 cores. With scripts/compare_runs.py: the bit-for-bit check of
a refactor (run it at both commits).

    python scripts/federation_variants.py OUT
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from medveil.federated.config import load_config
from medveil.federated.demo import demo_config_path
from medveil.federated.engine import run_federation


def main(out: Path) -> int:
    base = load_config(demo_config_path())
    run_federation(base, out / "demo", progress=False)
    for name, fed, cur in [("relay", {"strategy": "relay", "rounds": 2}, {}),
                           ("median", {"strategy": "fedavg", "rounds": 2}, {"aggregation": "median"}),
                           ("trimmed", {"strategy": "fedavg", "rounds": 1, "calibrate_heads": False},
                            {"aggregation": "trimmed_mean"})]:
        cfg = dataclasses.replace(base, federation=dataclasses.replace(base.federation, **fed),
                                  curation=dataclasses.replace(base.curation, **cur),
                                  pretrain=dataclasses.replace(base.pretrain, epochs=5))
        run_federation(cfg, out / name, progress=False)
        print(f"{name}: {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
