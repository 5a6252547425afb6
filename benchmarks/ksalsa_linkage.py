"""Which image features carry the linkage of a k-SALSA release? The linkage attack of
medveil.evaluate.linkage re-run on the releases that benchmarks/ksalsa.py left under --work,
with the attacker's features restricted: the release's own feature net + thumbnail (the
benchmark's attack), the 8 x 8 thumbnail alone, the embedding alone, and a feature net the
release never used (another random seed). Last row: the label-aware chance (an attacker who
knows each real test image's grade and each released image's label, and nothing else).

    python benchmarks/ksalsa_linkage.py [--work runs/bench_ksalsa/full] [--ks 2,5,10]

The first row repeats the benchmark's attack; it differs from ksalsa.json by a few hundredths
because the attack's random negatives follow the order of the groups (here: labels.csv's).
Needs the full benchmark's work folder (APTOS cache + k*/private, k*/test releases with their
audits). Prints a table and writes benchmarks/results/ksalsa_linkage.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from medveil.evaluate.linkage import (
    LinkageAttack,
    image_features,
    label_chance,
    topk_precision,
)
from medveil.evaluate.release_eval import index_groups, read_release
from medveil.io import write_json_atomic
from medveil.models.features import build_feature_net

REPO = Path(__file__).resolve().parents[1]
LABEL_ONLY = "labels only (label-aware chance)"


def load_release(cache: dict[str, np.ndarray], folder: Path, part: str
                 ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], np.ndarray]:
    """(real images, released images, member rows of each released image, released labels)."""
    release = read_release(folder)
    return (cache[f"{part}_images"], release.images,
            index_groups(release, cache[f"{part}_ids"].tolist(), str(folder)), release.labels)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=REPO / "runs" / "bench_ksalsa" / "full")
    p.add_argument("--ks", default="2,5,10")
    p.add_argument("--resolution", type=int, default=64, help="the releases' resolution (64)")
    p.add_argument("--feature-net", default="random-conv:seed=0", help="the release's feature net")
    p.add_argument("--other-net", default="random-conv:seed=1", help="a net the release never used")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ksalsa_linkage.json")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    cache_file = args.work.parent / f"aptos_{args.resolution}px_seed0.npz"
    if not cache_file.is_file():
        print(f"{cache_file} not found (run benchmarks/ksalsa.py first)", file=sys.stderr)
        return 2
    with np.load(cache_file) as f:
        cache = {name: f[name] for name in f.files}
    nets = {"own": build_feature_net(args.feature_net), "other": build_feature_net(args.other_net)}
    attacks = {  # name -> features from (own (emb, thumb), other (emb, thumb))
        "own embedding + thumbnail (benchmark)": lambda o, x: np.hstack(o),
        "thumbnail only": lambda o, x: o[1],
        "own embedding only": lambda o, x: o[0],
        "other net's embedding only": lambda o, x: x[0],
        "other net's embedding + thumbnail": lambda o, x: np.hstack(x),
    }
    results: dict[str, dict[str, dict[str, float]]] = {}
    for k in [int(v) for v in args.ks.split(",")]:
        folder = args.work / f"k{k}"
        if not (folder / "private" / "audit" / "groups.csv").is_file():
            print(f"skipping k={k}: no release under {folder}", file=sys.stderr)
            continue
        (tr_r, tr_s, tr_g, _), (te_r, te_s, te_g, te_y) = (
            load_release(cache, folder / part, part) for part in ("private", "test"))
        with torch.no_grad():
            feats = {n: [image_features(x, net, args.resolution) for x in (tr_r, tr_s, te_r, te_s)]
                     for n, net in nets.items()}
        results[f"k={k}"] = {}
        for name, pick in attacks.items():
            f = [pick(o, x) for o, x in zip(feats["own"], feats["other"], strict=True)]
            attack = LinkageAttack(seed=0).fit(f[0], f[1], tr_g)
            results[f"k={k}"][name] = topk_precision(attack.scores(f[2], f[3]), te_g, k)
        results[f"k={k}"][LABEL_ONLY] = {"topk_precision": label_chance(
            te_g, te_y, cache["test_labels"], k), "k": k}
    print(f"\n{'attacker features':40s} " + " ".join(f"{k:>14s}" for k in results))
    for name in [*attacks, LABEL_ONLY]:
        print(f"{name:40s} " + " ".join(f"{results[k][name]['topk_precision']:>14.3f}" for k in results))
    print(f"{'chance':40s} " + " ".join(f"{next(iter(r.values()))['chance']:>14.3f}" for r in results.values()))
    write_json_atomic(args.out, {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                                 "work": str(args.work), "feature_net": args.feature_net,
                                 "other_net": args.other_net, "release": "k-SALSA",
                                 "results": results})
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
