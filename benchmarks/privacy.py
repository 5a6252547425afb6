"""Privacy-utility benchmark: the six-site federation (MedUniverse, the setting of
benchmarks/meduniverse.py) at epsilon in {1, 3, 8, inf}: the universal model's accuracy per site
(mean over seeds) and the membership-inference audit (medveil.evaluate.audit) per site: AUC and
TPR at 1 % FPR, the strongest of the two attacks on the two targets (the site's last update and
the universal model).

    python benchmarks/privacy.py --quick    # QUICK setting of meduniverse.py (200 train images per site)
    python benchmarks/privacy.py            # FULL_DP: QUICK's model, FULL_PREVIOUS' data sizes, 3 seeds
    python benchmarks/privacy.py --shipped --epsilons 8,inf --seeds 3
        # the shipped recipe (meduniverse.py's FULL: hybrid ViT, 3 stages x 15 local epochs, 20 pool
        # passes, pool balance; 600 train images per site, 300 pool images per set): what DP costs the
        # model users get; 13 min per DP job, 8.5 without (FULL_DP: about 1 min), so not all four
        # epsilons by default (results/privacy_shipped.json)

Why FULL_DP and not meduniverse.py's FULL (FULL_PREVIOUS, the full setting when this benchmark
was written; FULL now runs the shipped recipe, not measured under DP): DP-SGD computes a gradient
per example, and that setting's patch-4 model (49 tokens against 16, 4 stages against 3) would cost an estimated 4-5x per run
(not measured): about an hour for the twelve runs. FULL_DP keeps FULL_PREVIOUS' data (600 train images
per site, 500 test, 200 pool images per set: what DP's noise is averaged over) with QUICK's
patch-7 model; its twelve runs take 13 min on 2 cores, so it can be rerun whenever the recipe
changes. The training recipe is the shipped config's [local] augmentation and schedule on every row.

epsilon = inf is the same run without DP. Under DP every site trains all parameters that have
per-example gradients (``trainable = "all"``) at 4x the [local] learning rate (``lr_scale``): the
library's defaults, both chosen on validation splits (``--eval-split val --trainable ...`` and
``--dp-lr-scale ...``: results/privacy_trainable_validation.json, privacy_lr_validation.json;
``--dp-batch ...`` compares [privacy] batch_size, privacy_batch_validation.json; ``--stages 2x3,1x6``
compares fewer, longer stages, with and without DP, privacy_stages_validation.json);
delta = 1 / (10 n), RDP accountant, clipping norm 1;
the noise multiplier is the smallest that fits the planned stages in the target. Class weighting
is off for every run, epsilon = inf included (refused under DP), and so is head calibration unless
``--dp-calibration E`` asks for it: then the last round refits every head, under DP by E epochs of
DP-SGD in the pool's feature basis ([privacy] calibration_epochs, planned in the budget), without
DP by the exact fit ("refit exact"); ``--dp-calibration 0,10,20`` shows them all (results/privacy_shipped.json).
Either way the rows differ only by DP.
The sites' DP secrets are derived from the seed (a real site draws its own), so a rerun gives
the same numbers. Each finished (epsilon, seed) job is kept under benchmarks/results/jobs/privacy[_quick]/.
Writes benchmarks/results/privacy[_quick].json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medveil.evaluate.audit import audit_run, strip_curves
from medveil.federated.config import config_from_dict
from medveil.federated.client import local_fit
from medveil.federated.dp_site import DPSites
from medveil.federated.privacy import PrivacyOptions
from medveil.federated.engine import run_federation
from medveil.federated.training import derive_seed
from medveil.io import jsonable, write_json_atomic, write_text_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))
from meduniverse import FULL, FULL_PREVIOUS, QUICK, REPO  # noqa: E402
from meduniverse_tables import DATASETS  # noqa: E402
from shipped import MEDMNIST6 as SHIPPED, shipped_raw  # noqa: E402

EPSILONS = (1.0, 3.0, 8.0, float("inf"))
FULL_DP: dict[str, Any] = {**FULL_PREVIOUS, "model": QUICK["model"], "pretrain": QUICK["pretrain"],
                           "federation": QUICK["federation"]}
# 2: members matched to the audit's non-members; 3: site secrets from the seed; 4: the shipped
# config's training recipe (flips, warm-up + cosine), [data] eval_split and [privacy] trainable;
# 5: [privacy] lr_scale = 4 by default (jobs of version 4 ran DP-SGD at the [local] rate)
JOB_VERSION = 5
RECIPE_KEYS = ("augment", "schedule", "warmup_epochs")  # the shipped [local] recipe, on the setting's sizes


def shipped_recipe() -> dict[str, Any]:
    shipped = shipped_raw()["local"]
    return {k: shipped[k] for k in RECIPE_KEYS if k in shipped}


def job_config(setting: dict[str, Any], data_dir: Path, seed: int, epsilon: float, eval_split: str = "test",
               trainable: str = "all", dp_lr_scale: float = PrivacyOptions().lr_scale, dp_batch: int = 0,
               calibration: int = 0):
    """The run's config; ``calibration`` > 0: the last round refits the heads (under DP by DP-SGD
    for that many epochs, [privacy] calibration_epochs; without DP by the exact fit)."""
    raw: dict[str, Any] = {"seed": seed, "clients": [{"name": n, "path": str(data_dir / f"{n}.npz")} for n in DATASETS]}
    for section in ("model", "data", "pretrain", "federation", "local", "curation", "evaluation"):
        raw[section] = dict(setting[section])
    raw["local"].update(shipped_recipe())
    raw["data"]["eval_split"] = eval_split
    raw["federation"].update(strategy="distill", calibrate_heads=calibration > 0)
    raw["local"]["class_weighting"] = "none"  # balanced weights read every private label: refused under DP
    if np.isfinite(epsilon):
        raw["privacy"] = {"dp": True, "target_epsilon": epsilon, "trainable": trainable, "lr_scale": dp_lr_scale,
                          "batch_size": dp_batch}
        if calibration:  # else the default stays: without calibrate_heads it plans and runs nothing
            raw["privacy"]["calibration_epochs"] = calibration
    return config_from_dict(raw, data_dir)


MEDMNIST = Path(os.environ.get("MEDVEIL_SHARED_DATA", REPO.parent / "shared" / "data")) / "medmnist"


def study_args(doc: str, argv: list[str] | None) -> argparse.Namespace:
    """The options of a benchmark that studies a kept run (--data-dir, --threads; threads set)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=MEDMNIST)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args


def kept_run(setting: dict[str, Any], data_dir: Path, seed: int, epsilon: float, eval_split: str = "val",
             calibration: int = 0) -> Path:
    """A finished run of the job (``calibration`` as for :func:`job_config`), kept under runs/bench/
    (not committed) for the benchmarks that study a run afterwards (dp_head_refit.py,
    audit_grouped.py); made when absent, resumed when killed. A kept run made with another config
    (the setting changed since, or another --data-dir path: the clients' paths are part of it) is
    refused with a one-line error, never studied as if current."""
    name = {id(FULL): "shipped", id(QUICK): "quick", id(FULL_DP): "full_dp"}.get(id(setting), "other")
    refit = f"-refit{calibration}" if calibration else ""
    folder = REPO / "runs" / "bench" / f"privacy-{name}-eps{epsilon:g}-seed{seed}-{eval_split}{refit}"
    run = folder / "run"
    cfg = job_config(setting, data_dir, seed, epsilon, eval_split, calibration=calibration)
    # resume=True on a complete run only checks its config.toml against cfg and returns (no sites)
    fit = local_fit if (run / "complete").is_file() else job_fit(cfg, folder / "sites", seed)
    run_federation(cfg, run, progress=True, client_fit=fit, resume=run.is_dir())
    return run


def job_fit(cfg, sites: Path, seed: int):
    """The sites' training for a job: plain, or DP-SGD with the sites' secrets derived from the
    seed (a benchmark must be reproducible; a real site draws its own)."""
    if not cfg.privacy.dp:
        return local_fit
    for name in DATASETS:
        write_text_atomic(sites / name / "secret", f"{derive_seed(seed, name, 'dp-secret')}\n")
    return DPSites(cfg.privacy, sites, cfg.federation.rounds, planned_calibration=cfg.federation.calibrate_heads)


def with_stages(setting: dict[str, Any], stages: str) -> dict[str, Any]:
    """The setting with "RxE": R stages of E local epochs each."""
    rounds, epochs = (int(v) for v in stages.lower().split("x"))
    return {**setting, "federation": {**setting["federation"], "rounds": rounds},
            "local": {**setting["local"], "epochs": epochs}}


def run_job(setting: dict[str, Any], data_dir: Path, seed: int, epsilon: float, cache: Path,
            eval_split: str = "test", trainable: str = "all",
            dp_lr_scale: float = PrivacyOptions().lr_scale, dp_batch: int = 0, stages: str = "",
            nonmembers: str = "", calibration: int = 0) -> dict[str, Any]:
    variant: dict[str, Any] = {"eval_split": eval_split, "trainable": trainable}
    if calibration:
        variant["calibration"] = f"cal{calibration}" if np.isfinite(epsilon) else "calexact"
    if nonmembers:
        variant["nonmembers"] = nonmembers
    if stages:
        variant["stages"] = stages
        setting = with_stages(setting, stages)
    if dp_lr_scale != PrivacyOptions().lr_scale:
        variant["dp_lr_scale"] = dp_lr_scale
    if dp_batch:
        variant["dp_batch"] = dp_batch
    key = jsonable({"setting": setting, "seed": seed, "epsilon": str(epsilon), "version": JOB_VERSION, **variant,
                    "recipe": shipped_recipe(), "lr_scale": dp_lr_scale})  # what the job ran with, all of it
    tag = "" if variant == {"eval_split": "test", "trainable": "all"} else \
        "-" + "-".join(f"{v:g}" if isinstance(v, float) else str(v) for v in variant.values())
    path = cache / f"eps{epsilon:g}-seed{seed}{tag}.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return stored["result"]
    t0, c0 = time.time(), time.process_time()
    with tempfile.TemporaryDirectory(prefix="medveil-privacy-") as tmp:
        cfg = job_config(setting, data_dir, seed, epsilon, eval_split, trainable, dp_lr_scale, dp_batch, calibration)
        fit = job_fit(cfg, Path(tmp) / "sites", seed)
        metrics = run_federation(cfg, Path(tmp) / "run", progress=False, client_fit=fit)
        audit = strip_curves(audit_run(Path(tmp) / "run", progress=False, nonmembers=nonmembers or None))
    result = {"final": metrics["final"], "privacy": metrics.get("privacy", {}), "audit": audit["sites"],
              "seconds": time.time() - t0, "cpu_seconds": time.process_time() - c0}
    write_json_atomic(path, {"key": key, "result": result})
    return result


def released(site_audit: dict[str, Any]) -> list[dict[str, Any]]:
    return [site_audit[t] for t in ("update", "universal") if isinstance(site_audit.get(t), dict)]


def strongest(site_audit: dict[str, Any]) -> tuple[float, float, float]:
    """(max AUC, max TPR at 1 % FPR, how many of those figures lie above their chance band) over
    the released targets (``update``, ``universal``; not the audit's ``backbone`` diagnostic) and
    attacks of one site."""
    ms = [m for target in released(site_audit) for m in target.values()]
    if not ms:  # not audited (--audit-nonmembers unused-train and a site that uses every train image)
        return float("nan"), float("nan"), 0.0
    above = sum(m[k] > m["chance_95"][k] for m in ms for k in ("auc", "tpr_at_1pct_fpr"))
    return max(m["auc"] for m in ms), max(m["tpr_at_1pct_fpr"] for m in ms), float(above)


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    short = {d: d.replace("mnist", "")[:8] for d in DATASETS}
    lines = ["universal model accuracy (mean over seeds) and membership inference per site "
             "(strongest attack: AUC / TPR@1%FPR; chance 0.50 / 0.01)",
             f"{'epsilon':<22}{'mean acc':>9}" + "".join(f"{short[d]:>18}" for d in DATASETS) + f"{'max AUC':>9}"
             + f"{'> chance':>10}"]
    for eps, runs in results.items():
        accs = {d: np.mean([r["final"][d]["acc"] for r in runs]) for d in DATASETS}
        cells, aucs = [], []
        above = 0
        for d in DATASETS:
            auc, tpr, n_above = np.mean([strongest(r["audit"][d]) for r in runs], axis=0)
            above += n_above * len(runs)
            aucs.append(auc)
            cells.append(f"{accs[d]:.3f} {auc:.2f}/{tpr:.3f}")
        spent = [r["privacy"][d]["epsilon"] for r in runs for d in DATASETS if d in r["privacy"]]
        label = eps if eps == "inf" or not spent else f"{eps} ({max(spent):.2f})"
        n_figures = sum(2 * len([m for t in released(r["audit"][d]) for m in t.values()])
                        for r in runs for d in DATASETS)
        lines.append(f"{label:<22}{np.mean(list(accs.values())):>9.3f}" + "".join(f"{c:>18}" for c in cells)
                     + f"{max(aucs):>9.2f}{f'{above:.0f}/{n_figures}':>10}")
    lines.append("each cell: accuracy, then AUC / TPR@1%FPR of the strongest attack and target (mean over seeds); "
                 "in brackets: the largest epsilon any site spent; last column: how many audit figures (AUC and "
                 "TPR@1%FPR of every attack on every target, site and seed) lie above the 95th percentile an "
                 "attacker without signal reaches (about 5 % would by chance)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="QUICK setting (< 10 min on 2 cores)")
    p.add_argument("--shipped", action="store_true", help="the shipped recipe at meduniverse.py's FULL sizes "
                                                          "instead of FULL_DP (writes privacy_shipped.json)")
    p.add_argument("--seeds", type=int, help="seeds (default: 1 quick, 3 full)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir", type=Path, default=MEDMNIST)
    p.add_argument("--epsilons", help="comma-separated, e.g. 8,inf (default: 1,3,8,inf)")
    p.add_argument("--eval-split", choices=("test", "val"), default="test",
                   help="val: accuracy and audit non-members from the val splits, to choose settings "
                        "without the test images")
    p.add_argument("--trainable", default="all", help="[privacy] trainable under DP, or a comma-separated list "
                                                        "to compare (default: all)")
    p.add_argument("--dp-lr-scale", default="", help="[privacy] lr_scale (the [local] learning rate times this "
                                                       "under DP), or a comma-separated list to compare "
                                                       "(default: the library's default)")
    p.add_argument("--dp-batch", default="", help="[privacy] batch_size (expected DP-SGD batch; 0: the [local] "
                                                    "one), or a comma-separated list to compare (default: 0)")
    p.add_argument("--stages", default="", help="RxE: R stages of E local epochs each (default: the setting's), or "
                                                  "a comma-separated list to compare; the no-DP row runs each too")
    p.add_argument("--dp-calibration", default="", help="heads refit in a last round: under DP by DP-SGD on the head "
                                                         "for this many epochs ([privacy] calibration_epochs), without "
                                                         "DP by the exact fit; a comma-separated list to compare; 0: "
                                                         "no refit (default)")
    p.add_argument("--audit-nonmembers", choices=("test", "val", "unused-train"), default="",
                   help="the split the audit's non-members come from (default: the eval split); val with test "
                        "accuracy separates membership from a train / test shift of the data")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick and args.shipped:
        p.error("--quick and --shipped are two settings: choose one")
    setting = QUICK if args.quick else FULL if args.shipped else FULL_DP
    seeds = args.seeds or (1 if args.quick else 3)
    name = "privacy_quick" if args.quick else "privacy_shipped" if args.shipped else "privacy"
    cache = REPO / "benchmarks" / "results" / "jobs" / name
    out = args.out or REPO / "benchmarks" / "results" / f"{name}.json"
    t0 = time.time()
    results: dict[str, list[dict[str, Any]]] = {}
    epsilons = tuple(float(e) for e in args.epsilons.split(",")) if args.epsilons else EPSILONS
    trainables = args.trainable.split(",")
    scales = [float(x) for x in args.dp_lr_scale.split(",")] if args.dp_lr_scale else [PrivacyOptions().lr_scale]
    batches = [int(b) for b in args.dp_batch.split(",")] if args.dp_batch else [0]
    stage_list = args.stages.split(",") if args.stages else [""]
    calibrations = [int(c) for c in args.dp_calibration.split(",")] if args.dp_calibration else [0]
    variants = [(t, x, b, st, c) for t in trainables for x in scales for b in batches for st in stage_list
                for c in calibrations]
    for eps in epsilons:  # no DP: only the stages vary, and whether heads are refit (exactly)
        no_dp = [("all", PrivacyOptions().lr_scale, 0, st, c) for st in stage_list
                 for c in sorted({min(c, 1) for c in calibrations})]
        for trainable, scale, batch, st, cal in variants if np.isfinite(eps) else no_dp:
            key = "inf" if not np.isfinite(eps) else f"{eps:g}"
            if len(variants) > 1 and key != "inf":
                key += ((f" {trainable}" if len(trainables) > 1 else "") + (f" lr x{scale:g}" if len(scales) > 1 else "")
                        + (f" batch {batch or setting['local']['batch_size']}" if len(batches) > 1 else ""))
            key += f" {st}" if len(stage_list) > 1 else ""
            if len(calibrations) > 1 or calibrations[0]:
                key += (" no refit" if not cal else f" refit {cal} ep" if np.isfinite(eps) else " refit exact")
            for seed in range(seeds):
                r = run_job(setting, args.data_dir, seed, eps, cache, args.eval_split, trainable, scale, batch, st,
                            args.audit_nonmembers, cal)
                results.setdefault(key, []).append(r)
                print(f"epsilon {key} seed {seed}: mean acc {np.mean([m['acc'] for m in r['final'].values()]):.3f}, "
                      f"{r['seconds']:.0f} s", flush=True)
    text = table(results)
    print(text)
    write_json_atomic(out, {"mode": "quick" if args.quick else "shipped" if args.shipped else "full", "seeds": seeds, "setting": setting,
                            "epsilons": [str(e) for e in epsilons], "eval_split": args.eval_split,
                            "trainable": args.trainable, "dp_lr_scale": args.dp_lr_scale, "dp_batch": args.dp_batch,
                            "stages": args.stages, "audit_nonmembers": args.audit_nonmembers or args.eval_split,
                            "dp_calibration": args.dp_calibration,
                            "recipe_from": str(SHIPPED.relative_to(REPO)),
                            "elapsed_s": time.time() - t0,  # this invocation (finished jobs are reused)
                            "sum_job_s": sum(r["seconds"] for runs in results.values() for r in runs),
                            "threads": args.threads, "machine": platform.platform(),
                            "command": " ".join(sys.argv), "results": results, "table": text})
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
