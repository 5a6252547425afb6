"""What a head should read, on validation splits only: on finished runs' final backbones (trained
with the default heads on the cls token), each site's calibration head is refit (balanced class
weights, C = 1: the shipped calibration round) on three features of its own train images and
scored on its dataset's val split ([data] eval_split = "val", the run's own caps and seed):

- ``token``: the cls token after the final norm (the default, timm's global_pool = "token");
- ``avg``: the mean of the patch tokens after the final norm;
- ``token+avg``: both, concatenated ([model] global_pool = "token+avg").

    python benchmarks/head_pooling.py RUN_DIR [RUN_DIR ...] [--out JSON]

Post-hoc evidence only (the backbones were trained for cls heads); the federations with
global_pool = "token+avg" in every phase are benchmarks/federated_validation.py's variant
token_avg. Writes benchmarks/results/head_pooling.json by default.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from medveil.federated.config import load_config
from medveil.federated.engine import latest_checkpoint, load_stage
from medveil.federated.rebuild import build_backbone
from medveil.federated.sites import build_sites
from medveil.federated.training import extract_features
from medveil.io import write_json_atomic
from medveil.models.mae import DECODER_PREFIXES

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calibration_weighting import refit_and_score  # noqa: E402
from shipped import REPO  # noqa: E402

POOLS = ("token", "avg", "token+avg")


def score_run(run: Path) -> dict[str, dict[str, dict[str, float]]]:
    cfg = load_config(run / "config.toml")
    cfg.data.eval_split = "val"
    clients, _ = build_sites(cfg.clients, cfg.data, cfg.model.img_size, cfg.model.in_chans, cfg.seed)
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise SystemExit(f"head_pooling: {run}: no checkpoints/stage_*.pt")
    state = load_stage(ckpt)["model"]
    # the run's backbone read as token+avg: [cls, mean of patch tokens], each pool a slice of it
    backbone = build_backbone({**cfg.model.to_dict(), "global_pool": "token+avg"},
                              {k: v for k, v in state.items() if not k.startswith(DECODER_PREFIXES)})
    d = cfg.model.embed_dim
    cols = {"token": slice(0, d), "avg": slice(d, 2 * d), "token+avg": slice(0, 2 * d)}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for c in clients:
        train, val = extract_features(backbone, c.x_train), extract_features(backbone, c.x_test)
        for pool in POOLS:
            out.setdefault(c.name, {})[pool] = refit_and_score(train[:, cols[pool]], val[:, cols[pool]], c, "balanced")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "head_pooling.json")
    args = p.parse_args(argv)
    os.environ.setdefault("MEDVEIL_DATA_ROOT", str(REPO.parent / "shared" / "data"))
    results, means = {}, {}
    print(f"{'run':40s} " + " ".join(f"{pool:>15s}" for pool in POOLS) + "   (mean val acc / bacc of the sites)")
    for run in args.runs:
        res = results[str(run)] = score_run(run)
        means[str(run)] = {pool: {k: float(np.mean([r[pool][k] for r in res.values()])) for k in ("acc", "bacc")}
                           for pool in POOLS}
        print(f"{str(run)[-40:]:40s} " + " ".join(f"{means[str(run)][pool]['acc']:.3f} / {means[str(run)][pool]['bacc']:.3f}"
                                                  for pool in POOLS), flush=True)
    gain = [means[r]["token+avg"]["acc"] - means[r]["token"]["acc"] for r in means]
    print(f"token+avg - token: {np.mean(gain) * 100:+.1f} points of val acc on average, above on {sum(g > 0 for g in gain)} of {len(gain)} runs")
    write_json_atomic(args.out, {"command": " ".join(["python", *sys.argv]), "results": results, "mean": means})
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
