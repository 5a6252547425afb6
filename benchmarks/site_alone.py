"""Each site alone, on the shipped config's data: what a hospital reaches with a CNN trained from
scratch on exactly the train images it holds in `medveil federate --config CONFIG` (same seed,
same splits, same test images), next to the published MedMNIST v2 ResNet-18 figures.

    python benchmarks/site_alone.py                                   # medmnist6.toml, both CNNs
    python benchmarks/site_alone.py --archs small_cnn --threads 2

Prints a table (accuracy, balanced accuracy, CPU-minutes per site) and writes
benchmarks/results/site_alone.json. Needs the real data (MEDVEIL_DATA_ROOT or ../shared/data).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path


from medveil.evaluate.site_alone import PUBLISHED_NOTE, SiteAloneRecipe, published_row, train_site_alone
from medveil.federated.training import derive_seed
from medveil.io import write_json_atomic
from medveil.models.cnn import CNN_ARCHS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shipped import MEDMNIST6, REPO, shipped_sites  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=MEDMNIST6)
    p.add_argument("--archs", default=",".join(CNN_ARCHS))
    p.add_argument("--epochs", type=int, default=SiteAloneRecipe.epochs)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "site_alone.json")
    args = p.parse_args(argv)
    cfg, clients = shipped_sites(args.config, args.threads)
    recipe = SiteAloneRecipe(epochs=args.epochs)
    results: dict[str, dict[str, dict]] = {}
    t0 = time.time()
    for arch in args.archs.split(","):
        for c in clients:
            m = train_site_alone(arch, c, recipe, derive_seed(cfg.seed, "site-alone"))
            results.setdefault(arch, {})[c.name] = m
            print(f"{arch:<10} {c.name:<16} n_train {m['n_train']:>5}  acc {m['acc']:.3f}  bacc {m['bacc']:.3f}  "
                  f"{m['cpu_seconds'] / 60:.1f} CPU-min", flush=True)
    names = [c.name for c in clients]
    lines = [f"each site alone on the data of {args.config.name} (seed {cfg.seed}); acc / bacc / CPU-min",
             f"{'site':<16}" + "".join(f"{a:>26}" for a in results) + f"{'published':>11}"]
    for n, c in zip(names, clients, strict=True):
        pub = published_row(c)
        lines.append(f"{n:<16}" + "".join(
            f"{r[n]['acc']:.3f} / {r[n]['bacc']:.3f} / {r[n]['cpu_seconds'] / 60:>4.1f}".rjust(26) for r in results.values())
            + (f"{pub:>11.3f}" if pub is not None else f"{'-':>11}"))
    lines.append(f"{'mean':<16}" + "".join(
        f"{sum(r[n]['acc'] for n in names) / len(names):.3f} / {sum(r[n]['bacc'] for n in names) / len(names):.3f} / "
        f"{sum(r[n]['cpu_seconds'] for n in names) / 60:>4.1f}".rjust(26) for r in results.values()))
    lines.append(f"published: {PUBLISHED_NOTE}")
    text = "\n".join(lines)
    print(text)
    write_json_atomic(args.out, {"config": str(args.config.relative_to(REPO)) if args.config.is_relative_to(REPO)
                                 else str(args.config), "seed": cfg.seed, "recipe": recipe.__dict__,
                                 "threads": args.threads, "machine": platform.platform(),
                                 "command": " ".join(sys.argv), "elapsed_s": time.time() - t0,
                                 "results": results, "published": {c.name: published_row(c) for c in clients},
                                 "table": text})
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
