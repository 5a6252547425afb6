"""Which recipe `demo.toml` should carry, chosen on the shipped samples' VALIDATION splits.

`medveil demo` federates the six samples shipped in the package (300 train images per site, 240
after the server's pool share; 60 val images each). Each variant is demo.toml plus its overrides
with [data] eval_split = "val" (the test splits are never loaded); reported per variant: the
universal model's mean val accuracy / balanced accuracy over six sites and seeds, and the wall
seconds of one federation (what a user waits for), beside the small CNN alone on the same images.

    python benchmarks/demo_recipe.py                      # every variant, 3 seeds (about 15 min)
    python benchmarks/demo_recipe.py --variants previous,shipped_recipe --seeds 2

Writes benchmarks/results/demo_recipe.json; finished runs are kept under --root (a rerun reuses them).
"""

from __future__ import annotations

import argparse
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from medveil.evaluate.site_alone import SiteAloneRecipe, train_site_alone
from medveil.federated.config import config_from_dict
from medveil.federated.sites import build_sites
from medveil.federated.training import derive_seed
from medveil.io import write_json_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))
from federated_validation import cached_federation  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "src" / "medveil" / "configs" / "demo.toml"
# Every variant overrides demo.toml as it ships now (since 2026-12-05: medmnist6.toml's recipe at
# width 96, "shipped_recipe"); "previous" restores the demo.toml shipped before (a patch-7 ViT of
# depth 4, three stages of 2 local epochs, 5 pool passes, no pool balance).
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "previous": {"model": {"patch_size": 7, "depth": 4, "stem": "patch", "global_pool": "token"},
                 "local": {"epochs": 2}, "curation": {"epochs": 5.0, "pool_balance": False}},
    "shipped_arch": {"local": {"epochs": 2}, "curation": {"epochs": 5.0}},  # with the previous stages
    "shipped_arch_long": {"local": {"epochs": 5}, "curation": {"epochs": 10.0}},
    "shipped_recipe": {},  # medmnist6.toml's stage lengths too (15 local epochs, 20 pool passes)
}
VERSION = 1


def variant_raw(variant: str, seed: int) -> dict[str, Any]:
    raw = tomllib.loads(DEMO.read_text())
    raw["seed"] = seed
    raw["data"]["eval_split"] = "val"
    for section, values in VARIANTS[variant].items():
        raw.setdefault(section, {}).update(values)
    return raw


def run_one(variant: str, seed: int, root: Path) -> dict[str, Any]:
    return cached_federation(variant_raw(variant, seed), DEMO.parent, root / f"{variant}-seed{seed}", VERSION)


def alone(seed: int) -> dict[str, Any]:
    """The small CNN alone on each site's same train images, scored on the same val images (in the
    shape of a federation's result, so :func:`summary` reads both)."""
    cfg = config_from_dict(variant_raw("shipped_recipe", seed), DEMO.parent)
    clients, _ = build_sites(cfg.clients, cfg.data, cfg.model.img_size, cfg.model.in_chans, cfg.seed)
    t = time.time()
    out = {c.name: train_site_alone("small_cnn", c, SiteAloneRecipe(), derive_seed(seed, "alone")) for c in clients}
    return {"universal": {n: {"acc": m["acc"], "bacc": m["bacc"]} for n, m in out.items()},
            "cpu_s": sum(m["cpu_seconds"] for m in out.values()), "seconds": time.time() - t}


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    sites = list(runs[0]["universal"])
    acc = np.array([[r["universal"][s]["acc"] for s in sites] for r in runs])
    bacc = np.array([[r["universal"][s]["bacc"] for s in sites] for r in runs])
    return {"sites": dict(zip(sites, acc.mean(0).round(3).tolist(), strict=True)),
            "acc": float(acc.mean()), "bacc": float(bacc.mean()), "acc_per_seed": acc.mean(1).round(3).tolist(),
            "seconds": float(np.mean([r["seconds"] for r in runs])), "cpu_s": float(np.mean([r["cpu_s"] for r in runs]))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--root", type=Path, default=Path("/tmp/medveil_demo_recipe"))
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "demo_recipe.json")
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    if unknown := [v for v in variants if v not in VARIANTS]:
        print(f"demo_recipe: unknown variant(s) {', '.join(unknown)} (known: {', '.join(VARIANTS)})", file=sys.stderr)
        return 2
    rows = {}
    for v in variants:
        rows[v] = summary([run_one(v, s, args.root) for s in range(args.seeds)])
        print(f"{v}: {rows[v]['acc']:.3f} / {rows[v]['bacc']:.3f} ({rows[v]['seconds']:.0f} s)", flush=True)
    rows["small CNN alone"] = summary([alone(s) for s in range(args.seeds)])
    sites = list(rows[variants[0]]["sites"])
    lines = [f"demo.toml variants, val acc (mean of {args.seeds} seeds; 60 val images per site)",
             f"{'variant':<18}" + "".join(f"{s[:10]:>11}" for s in sites) + f"{'acc / bacc':>15}{'wall s':>8}"]
    for name, r in rows.items():
        lines.append(f"{name:<18}" + "".join(f"{r['sites'][s]:>11.3f}" for s in sites)
                     + f"{r['acc']:.3f} / {r['bacc']:.3f}".rjust(15) + f"{r['seconds']:>8.0f}")
    text = "\n".join(lines)
    print(text)
    write_json_atomic(args.out, {"command": "python " + " ".join(["benchmarks/demo_recipe.py",
                                                                  *(argv if argv is not None else sys.argv[1:])]),
                                 "seeds": args.seeds, "variants": {v: VARIANTS[v] for v in variants},
                                 "rows": rows, "table": text})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
