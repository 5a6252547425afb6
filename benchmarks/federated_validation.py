"""Recipe and architecture choices of the shipped config, tested as a federation on VALIDATION
splits only ([data] eval_split = "val": every site scores on its val split, its test split is
never loaded).

Each variant is `medveil federate` with the shipped config (src/medveil/configs/medmnist6.toml)
plus the variant's overrides, at the sizes of benchmarks/meduniverse.py's FULL setting (600
train images per site, ViT dim 64, patch 4; the shipped depth). Reported
per site: the universal model (own head, calibrated when the config calibrates) on the val split,
and beside it the site alone (small CNN, medveil.evaluate.site_alone) on the same images.

    python benchmarks/federated_validation.py                         # every variant, 3 seeds
    python benchmarks/federated_validation.py --variants shipped,conv --seeds 2
    python benchmarks/federated_validation.py --device cuda --only variants --variants cnn_r2e15  # one of
        # several side by side on a GPU; then --only alone, then the same command without --only for the table

Every variant overrides the shipped config of the day. The config changed on 2026-12-04
(hybrid stem, two long stages): results written before (federated_validation.json, _cnn*.json,
_device.json) list their variants as overrides of the previous config, at FULL's depth 4. It
changed again that evening (three stages, [curation] pool_balance): _device2.json and _pool.json
list theirs as overrides of the two-stage config without pool balance (variant "r2" now).
FULL's pool cap went from 200 to 300 images per set that night (the shipped 1000 of then scaled
with the sites; it stays 300 since the shipped cap became 3000 on 2026-12-05, see
benchmarks/meduniverse_settings.py); every result file records the sizes it ran at.

A variant whose stage 0 (model, data, pretraining) equals that of a variant already run for the
seed starts from that run's stage-0 checkpoint (identical on the CPU; its CPU-min then leave
pretraining out). Each finished (variant, seed) run is kept under RUN_ROOT (default /tmp/medveil_fedval); a killed
benchmark resumes. Writes benchmarks/results/federated_validation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from medveil.evaluate.site_alone import SiteAloneRecipe, train_site_alone
from medveil.federated.config import config_from_dict, dump_toml, load_config
from medveil.federated.engine import run_federation
from medveil.federated.sites import build_sites
from medveil.federated.training import derive_seed
from medveil.io import jsonable, write_json_atomic, write_text_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))
from meduniverse import FULL, REPO  # noqa: E402
from meduniverse_tables import DATASETS  # noqa: E402
from shipped import setting_sizes, shipped_raw  # noqa: E402

SIZES = setting_sizes(FULL)  # FULL's sizes, the shipped depth
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {  # each: overrides of the shipped config
    "shipped": {},
    # the config shipped until 2026-12-04 (at the depth the FULL setting then used)
    "previous": {"model": {"stem": "patch", "depth": 4}, "federation": {"rounds": 5}, "local": {"epochs": 2},
                 "curation": {"epochs": 3.0, "pool_balance": False}},
    # the config shipped from the morning to the evening of 2026-12-04
    "r2": {"federation": {"rounds": 2}, "curation": {"pool_balance": False}},
    "patch": {"model": {"stem": "patch"}},
    "conv": {"model": {"stem": "conv"}},
    "depth4": {"model": {"depth": 4}},
    "auto": {"local": {"augment": "auto"}},
    "r1e30": {"federation": {"rounds": 1}, "local": {"epochs": 30}},
    "r2e30": {"local": {"epochs": 30}},
    "r3e15": {"federation": {"rounds": 3}},  # = shipped since the evening of 2026-12-04
    "c10": {"curation": {"epochs": 10.0}},
    "base_init": {"curation": {"init": "base"}},
    # the previous shipped config's pool (1000 images per set; breast and retina give far fewer)
    "pool1000": {"data": {"max_pool": 1000}},
    # up to 3000 pool images per set, shipped since 2026-12-05 (organ-a gives 3000, blood 2392; the others hold fewer than 1000)
    "pool3000": {"data": {"max_pool": 3000}},
    # federated_validation_pool.json (its names: pool1000, pool1000_auto, pool1000_bal)
    "r2_pool1000": {"data": {"max_pool": 1000}, "federation": {"rounds": 2}, "curation": {"pool_balance": False}},
    "r2_pool1000_auto": {"data": {"max_pool": 1000}, "federation": {"rounds": 2},
                         "curation": {"pool_balance": False}, "local": {"augment": "auto"}},
    "r2_pool1000_bal": {"data": {"max_pool": 1000}, "federation": {"rounds": 2}},
    # heads read [cls, mean of the patch tokens] in every phase (local training, distillation, calibration)
    "token_avg": {"model": {"global_pool": "token+avg"}},
    # pool3000, and each teacher's KD weighs the pool images of its own dataset 5x (half its batch
    # weight, with 6 balanced sources)
    "pool3000_own5": {"data": {"max_pool": 3000}, "curation": {"own_source_weight": 5.0}},
    # pool3000, and the teachers label 3 augmented views of each pool image besides the image
    # (the same number of distillation steps: each view drawn 5 times in 20 passes, on average)
    "pool3000_views4": {"data": {"max_pool": 3000}, "curation": {"views": 4}},
}
VERSION = 1


def variant_config(variant: str, data_dir: Path, seed: int, device: str = "cpu") -> dict[str, Any]:
    raw = shipped_raw()
    raw["seed"], raw["device"] = seed, device
    raw["model"].update(SIZES["model"])
    raw["data"].update(SIZES["data"], eval_split="val")
    raw["clients"] = [{"name": n, "path": str(data_dir / f"{n}.npz")} for n in DATASETS]
    for section, values in VARIANTS[variant].items():
        raw[section].update(values)
    return raw


STAGE0_SECTIONS = ("seed", "device", "init_checkpoint", "model", "data", "clients", "pretrain")  # all stage 0 reads


def run_folder(root: Path, variant: str, seed: int, device: str) -> Path:
    return root / (f"{variant}-seed{seed}" + ("" if device == "cpu" else f"-{device}"))


def stage0_view(cfg: Any) -> dict[str, Any]:
    """The parts of a config that stage 0 (MIM pretraining on the pool) reads."""
    return {k: v for k, v in cfg.to_dict().items() if k in STAGE0_SECTIONS}


def share_stage0(variant: str, cfg: Any, run: Path, root: Path, seed: int) -> None:
    """Start ``run`` (on the CPU) from another variant's stage-0 checkpoint of the same seed when
    everything stage 0 reads is equal (MIM pretraining is deterministic on the CPU, so this is the
    checkpoint the run would write itself); the run resumes at stage 1. Saves a pretraining per variant."""
    want = stage0_view(cfg)
    for other in VARIANTS:
        src = run_folder(root, other, seed, "cpu") / "run"
        ckpt = src / "checkpoints" / "stage_000.pt"
        if other == variant or not ckpt.is_file() or not (src / "config.toml").is_file():
            continue
        if stage0_view(load_config(src / "config.toml")) == want:  # what that run was made with
            (run / "checkpoints").mkdir(parents=True)
            part = run / "checkpoints" / "stage_000.pt.part"  # a killed copy never looks like a checkpoint
            shutil.copy(ckpt, part)
            os.replace(part, run / "checkpoints" / "stage_000.pt")
            write_text_atomic(run / "config.toml", dump_toml(cfg))
            print(f"{variant} seed {seed}: stage 0 from {other}'s run (the same pretraining)", flush=True)
            return


def cached_federation(raw: dict[str, Any], base_dir: Path, folder: Path, version: int,
                      prepare: Callable[[Any, Path], None] | None = None) -> dict[str, Any]:
    """The federation of config ``raw`` in ``folder``/run, its result kept in ``folder``/result.json
    (reused while config and ``version`` are the same; a killed run resumes): the universal model's
    acc / bacc per site, CPU and wall seconds. ``prepare(cfg, run)`` runs before a fresh start."""
    key = jsonable({"version": version, "config": raw})
    path = folder / "result.json"
    if path.is_file() and json.loads(path.read_text()).get("key") == key:
        return json.loads(path.read_text())["result"]
    cfg = config_from_dict(raw, base_dir)
    t, c = time.time(), time.process_time()
    run = folder / "run"  # resumed only with the same config (run_federation checks it)
    if not run.exists() and prepare is not None:
        prepare(cfg, run)
    metrics = run_federation(cfg, run, resume=run.exists(), progress=False)
    result = {"universal": {n: {"acc": m["acc"], "bacc": m["bacc"]} for n, m in metrics["final"].items()},
              "cpu_s": time.process_time() - c, "seconds": time.time() - t}
    write_json_atomic(path, {"key": key, "result": result})
    return result


def run_one(variant: str, data_dir: Path, root: Path, seed: int, device: str = "cpu") -> dict[str, Any]:
    def from_shared_stage0(cfg: Any, run: Path) -> None:
        share_stage0(variant, cfg, run, root, seed)

    return cached_federation(variant_config(variant, data_dir, seed, device), data_dir,
                             run_folder(root, variant, seed, device), VERSION,
                             from_shared_stage0 if device == "cpu" else None)


def alone(data_dir: Path, root: Path, seed: int) -> dict[str, Any]:
    """The small CNN alone on each site's same train images, scored on the same val images."""
    raw = variant_config("shipped", data_dir, seed)
    key = jsonable({"version": VERSION, "alone": raw["data"], "seed": seed, "recipe": asdict(SiteAloneRecipe())})
    path = root / f"alone-seed{seed}.json"
    if path.is_file() and json.loads(path.read_text()).get("key") == key:
        return json.loads(path.read_text())["result"]
    cfg = config_from_dict(raw, data_dir)
    clients, _ = build_sites(cfg.clients, cfg.data, cfg.model.img_size, cfg.model.in_chans, cfg.seed)
    result = {c.name: train_site_alone("small_cnn", c, SiteAloneRecipe(), derive_seed(seed, "alone")) for c in clients}
    write_json_atomic(path, {"key": key, "result": result})
    return result


def table(results: dict[str, list[dict[str, Any]]], alone_runs: list[dict[str, Any]]) -> str:
    short = {d: d.replace("mnist", "")[:9] for d in DATASETS}
    lines = [f"val acc / bacc (mean over {len(alone_runs)} seeds), FULL sizes of benchmarks/meduniverse.py, "
             f"shipped recipe + the variant",
             f"{'variant':<10}" + "".join(f"{short[d]:>13}" for d in DATASETS) + f"{'mean':>13}{'CPU-min':>9}"]

    def row(name: str, runs: list[dict[str, Any]], cpu: float | None) -> str:
        acc = np.array([[r[d]["acc"] for d in DATASETS] for r in runs]).mean(0)
        bacc = np.array([[r[d]["bacc"] for d in DATASETS] for r in runs]).mean(0)
        cells = "".join(f"{a:.3f}/{b:.3f}".rjust(13) for a, b in zip(acc, bacc, strict=True))
        return (f"{name:<10}{cells}" + f"{acc.mean():.3f}/{bacc.mean():.3f}".rjust(13)
                + (f"{cpu:>9.1f}" if cpu is not None else f"{'':>9}"))

    for variant, runs in results.items():
        lines.append(row(variant, [r["universal"] for r in runs], np.mean([r["cpu_s"] for r in runs]) / 60))
    lines.append(row("CNN alone", alone_runs, np.mean([sum(m["cpu_seconds"] for m in r.values())
                                                       for r in alone_runs]) / 60))
    lines.append("variants: " + "; ".join(f"{k}: {v or 'as shipped'}" for k, v in VARIANTS.items() if k in results))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--device", default="cpu", help="torch device of the federations (the site alone trains on CPU)")
    p.add_argument("--only", choices=("variants", "alone"), help="run only the variants, or only the site alone "
                                                                  "(to run them side by side; a last call without "
                                                                  "--only reuses both and writes the table)")
    p.add_argument("--root", type=Path, default=Path("/tmp/medveil_fedval"))
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "medmnist")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "federated_validation.json")
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        print(f"federated_validation: unknown variant(s) {', '.join(unknown)} (known: {', '.join(VARIANTS)})",
              file=sys.stderr)
        return 2
    os.environ.setdefault("MEDVEIL_DATA_ROOT", str(args.data_dir.parent))
    t = time.time()
    results: dict[str, list[dict[str, Any]]] = {}
    for seed in range(args.seeds) if args.only != "alone" else ():
        for v in variants:
            results.setdefault(v, []).append(run_one(v, args.data_dir, args.root, seed, args.device))
            print(f"{v} seed {seed}: mean val acc "
                  f"{np.mean([m['acc'] for m in results[v][-1]['universal'].values()]):.3f}", flush=True)
    alone_runs = [alone(args.data_dir, args.root, s) for s in range(args.seeds)] if args.only != "variants" else []
    if args.only:
        return 0
    text = table(results, alone_runs)
    print(text)
    write_json_atomic(args.out, {"command": "python " + " ".join(["benchmarks/federated_validation.py",
                                                                  *(argv if argv is not None else sys.argv[1:])]),
                                 "seeds": args.seeds, "device": args.device, "variants": {v: VARIANTS[v] for v in variants},
                                 "sizes": SIZES, "elapsed_s": time.time() - t,
                                 "results": results, "alone": alone_runs, "table": text})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
