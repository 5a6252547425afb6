"""`medveil adapt` on a site none of the federation held: leave-one-dataset-out over the six
MedMNIST-format sets of ../shared/data/medmnist, with the shipped recipe.

For each held-out dataset H: `medveil federate` on the five others (the shipped config's
[local], [federation], [curation], [pretrain] and [evaluation] sections; smaller model and data,
see SIZES), then `medveil adapt RUN/model.pt H --mode probe`, `--mode finetune --head-start random` and
`--mode finetune` (LP-FT: from the probe's head), each of which also fits the same recipe on the
run's MIM-only start (stage 0), and the hospital alone: a small CNN
from scratch on exactly H's train images (medveil.evaluate.site_alone). H holds as many train
images as each federation site (a seeded subset written to RUN_ROOT/data/H.npz), its own val
split (capped) for adapt's choices, and the same test images for every row.

Why smaller than the shipped config: six federations at its size (2000 images per site, ViT dim
192) take about 4 hours on 2 cores; at SIZES (600 per site, dim 64, the FULL setting of
benchmarks/meduniverse.py, the shipped depth) six folds take about two hours. The recipe is the
shipped one (results/adapt_lodo.json was measured with the config shipped before 2026-12-04:
patch stem, depth 4, five short stages, and FULL's pool cap of then, 200 images per set; it is
300 since (fixed: meduniverse_settings.py), so a rerun runs new folds). A fold of the shipped recipe
at these sizes takes 16-18 min (benchmarks/meduniverse.py's LODO).

    python benchmarks/adapt_lodo.py                 # six folds, seed 0
    python benchmarks/adapt_lodo.py --quick         # two folds, a smaller model (< 10 min)

Each fold's run folder and result are kept under RUN_ROOT (default /tmp/medveil_adapt_lodo[_quick]);
a killed benchmark resumes fold by fold. Writes benchmarks/results/adapt_lodo[_quick].json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medveil.evaluate.adapt import adapt, load_adapt_data
from medveil.evaluate.site_alone import PUBLISHED_RESNET18_28, SiteAloneRecipe, train_site_alone
from medveil.federated.config import config_from_dict
from medveil.federated.engine import COMPLETE, run_federation
from medveil.federated.training import derive_seed
from medveil.io import jsonable, write_json_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))
from meduniverse import FULL, QUICK, REPO  # noqa: E402
from meduniverse_tables import DATASETS  # noqa: E402
from shipped import MEDMNIST6 as SHIPPED, setting_sizes, shipped_raw  # noqa: E402

SIZES = {"full": setting_sizes(FULL), "quick": setting_sizes(QUICK)}  # the shipped depth
HELD = {"full": DATASETS, "quick": ("retinamnist", "breastmnist")}
MAX_VAL = 1000
FOLD_VERSION = 2  # 2: finetune from a random head and from the probe's head (LP-FT); val metrics
ROWS = {"probe": ("probe", "probe"), "finetune": ("finetune", "random"), "lpft": ("finetune", "probe")}


def digest(raw: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(jsonable(raw), sort_keys=True).encode()).hexdigest()[:12]


def fold_config(mode: str, data_dir: Path, seed: int, held: str) -> dict[str, Any]:
    raw = shipped_raw()
    raw["seed"] = seed
    raw["model"].update(SIZES[mode]["model"])
    raw["data"].update(SIZES[mode]["data"])
    raw["clients"] = [{"name": n, "path": str(data_dir / f"{n}.npz")} for n in DATASETS if n != held]
    return raw


def held_out_subset(data_dir: Path, held: str, n_train: int, n_test: int, seed: int, out: Path) -> Path:
    """H's private data as a federation site would hold it: ``n_train`` train images (seeded), its
    val split (<= MAX_VAL) and ``n_test`` test images, written as a MedMNIST-format archive."""
    if out.is_file():
        return out
    src = np.load(data_dir / f"{held}.npz")
    rng = np.random.default_rng(derive_seed(seed, held, "adapt-lodo-subset"))
    arrays = {}
    for split, cap in (("train", n_train), ("val", MAX_VAL), ("test", n_test)):
        n = len(src[f"{split}_labels"])
        idx = np.sort(rng.permutation(n)[:cap]) if cap and cap < n else np.arange(n)
        arrays[f"{split}_images"] = src[f"{split}_images"][idx]
        arrays[f"{split}_labels"] = src[f"{split}_labels"][idx]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(out)
    return out


def cpu() -> float:
    return time.process_time()


def run_fold(mode: str, data_dir: Path, root: Path, seed: int, held: str) -> dict[str, Any]:
    raw = fold_config(mode, data_dir, seed, held)
    key = jsonable({"version": FOLD_VERSION, "config": raw})
    fold = root / held
    result_path = fold / "fold.json"
    if result_path.is_file():
        stored = json.loads(result_path.read_text())
        if stored.get("key") == key:
            return stored["result"]
    cfg = config_from_dict(raw, data_dir)
    run = fold / f"run-{digest(raw)}"  # another config or seed: another run folder
    t0, c0 = time.time(), cpu()
    cost = run.with_name(run.name + "-cpu.json")  # the federation's CPU time, for reruns that reuse the run
    if not (run / COMPLETE).exists():
        resumed = run.exists()
        run_federation(cfg, run, resume=resumed, progress=False)
        if not resumed:
            write_json_atomic(cost, {"cpu_s": cpu() - c0})
    fed_cpu = json.loads(cost.read_text())["cpu_s"] if cost.is_file() else None
    subset = held_out_subset(data_dir, held, cfg.data.max_train, cfg.data.max_test, seed,
                             root / f"data-seed{seed}-{cfg.data.max_train}-{cfg.data.max_test}" / f"{held}.npz")
    result: dict[str, Any] = {"federate_cpu_s": fed_cpu}
    for row, (m, start) in ROWS.items():
        c = cpu()
        s = adapt(run / "model.pt", subset, held, m, fold / f"adapt_{row}.pt", overwrite=True, head_start=start)
        result[row] = {"universal": s["test_metrics"], "mim_only": s["mim_only_test_metrics"],
                       "val": {"universal": s["val_metrics"], "mim_only": s["mim_only_val_metrics"]},
                       "cpu_s": cpu() - c, "n_train": s["train"], "n_val": s["val"], "n_test": s["test"],
                       **({"probe_C": s["probe_C"]} if "probe_C" in s else {})}
    data = load_adapt_data(subset, held, 28, 3, seed).data
    c = cpu()
    result["alone_small_cnn"] = train_site_alone("small_cnn", data, SiteAloneRecipe(), derive_seed(seed, "alone"))
    result["alone_small_cnn"]["cpu_s"] = cpu() - c
    result["published"] = PUBLISHED_RESNET18_28.get(held)
    result["seconds"] = time.time() - t0
    write_json_atomic(result_path, {"key": key, "result": result})
    return result


def table(folds: dict[str, dict[str, Any]], mode: str) -> str:
    rows = [f"Leave-one-dataset-out, `medveil adapt` on the held-out set (test acc / bacc; {mode} sizes: "
            f"{SIZES[mode]['data']['max_train']} train images per site and for the held-out site, "
            f"ViT dim {SIZES[mode]['model']['embed_dim']}); univ: the universal start, MIM: the run's MIM-only start",
            f"{'held-out':14s}" + "".join(f"{r + ' ' + s:>14s}" for r in ROWS for s in ("univ", "MIM"))
            + f"{'alone CNN':>14s} {'published':>9s}"]

    def cell(m: dict[str, Any] | None) -> str:
        return f"{m['acc']:.3f}/{m['bacc']:.3f}" if m else "-"

    for held, r in folds.items():
        pub = r["published"]
        rows.append(f"{held:14s}" + "".join(f"{cell(r[k][s]):>14s}" for k in ROWS for s in ("universal", "mim_only"))
                    + f"{cell(r['alone_small_cnn']):>14s} {(f'{pub:.3f}' if pub else '-'):>9s}")
    n = len(folds)

    def mean(k: str, s: str, key: str = "acc", val: bool = False) -> float:
        return float(np.mean([(r[k]["val"] if val else r[k])[s][key] for r in folds.values()]))

    alone = np.mean([r["alone_small_cnn"]["acc"] for r in folds.values()])
    rows.append(f"{'mean test acc':14s}" + "".join(f"{mean(k, s):14.3f}" for k in ROWS for s in ("universal", "mim_only"))
                + f"{alone:14.3f}")
    rows.append(f"{'mean val acc':14s}" + "".join(f"{mean(k, s, val=True):14.3f}" for k in ROWS
                                                 for s in ("universal", "mim_only")))
    rows.append(f"{'mean val bacc':14s}" + "".join(f"{mean(k, s, 'bacc', True):14.3f}" for k in ROWS
                                                  for s in ("universal", "mim_only")))
    for k in ROWS:
        above = sum(r[k]["universal"]["acc"] > r[k]["mim_only"]["acc"] for r in folds.values())
        vs_alone = sum(r[k]["universal"]["acc"] >= r["alone_small_cnn"]["acc"] for r in folds.values())
        rows.append(f"{k}: universal start above the MIM-only start on {above}/{n}, at least the site alone on "
                    f"{vs_alone}/{n} (test acc)")
    known = [r["federate_cpu_s"] for r in folds.values() if r["federate_cpu_s"] is not None]
    cpu_fed = f"{np.mean(known) / 60:.1f}" if len(known) == n else "- (runs reused)"
    rows.append(f"CPU-min per fold: federate (five sites) {cpu_fed}; adapt "
                + ", ".join(f"{k} {np.mean([r[k]['cpu_s'] for r in folds.values()]) / 60:.2f}" for k in ROWS)
                + f" (each with its MIM-only twin); site alone "
                f"{np.mean([r['alone_small_cnn']['cpu_s'] for r in folds.values()]) / 60:.2f}")
    rows.append("finetune: a fresh head; lpft: the probe's head first, then backbone + head (LP-FT)")
    rows.append("published: MedMNIST v2 ResNet-18 (28), all train images, GPU (Yang et al. 2023)")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--held", help="comma-separated held-out datasets (default: the mode's)")
    p.add_argument("--root", type=Path, help="folder for the fold runs (default /tmp/medveil_adapt_lodo[_quick])")
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "medmnist")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    mode = "quick" if args.quick else "full"
    suffix = "_quick" if args.quick else ""
    root = args.root or Path(f"/tmp/medveil_adapt_lodo{suffix}")
    out = args.out or REPO / "benchmarks" / "results" / f"adapt_lodo{suffix}.json"
    held = tuple(args.held.split(",")) if args.held else HELD[mode]
    if not args.data_dir.is_dir():
        print(f"adapt_lodo: {args.data_dir}: not found (the MedMNIST-format sets of ../shared/data)", file=sys.stderr)
        return 2
    os.environ.setdefault("MEDVEIL_DATA_ROOT", str(args.data_dir.parent))
    t = time.time()
    folds = {}
    for h in held:
        folds[h] = run_fold(mode, args.data_dir, root, args.seed, h)
        print(f"fold {h}: {folds[h]['seconds']:.0f} s", flush=True)
    text = table(folds, mode)
    print(text)
    write_json_atomic(out, {"command": "python " + " ".join(["benchmarks/adapt_lodo.py", *(argv or sys.argv[1:])]),
                            "mode": mode, "seed": args.seed, "sizes": SIZES[mode], "recipe_from": str(SHIPPED.relative_to(REPO)),
                            "elapsed_s": time.time() - t, "machine": platform.processor() or platform.machine(),
                            "torch_threads": torch.get_num_threads(), "folds": folds, "table": text})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
