"""Privacy-utility benchmark: the six-site federation (MedUniverse, the setting of
benchmarks/meduniverse.py) at epsilon in {1, 3, 8, inf}: the universal model's accuracy per site
(mean over seeds) and the membership-inference audit (medveil.evaluate.audit) per site: AUC and
TPR at 1 % FPR, the strongest of the two attacks on the two targets (the site's last update and
the universal model).

    python benchmarks/privacy.py --quick    # QUICK setting of meduniverse.py, 1 seed (< 10 min on 2 cores)
    python benchmarks/privacy.py            # FULL setting, 3 seeds

epsilon = inf is the same run without DP. Under DP every site trains all parameters that have
per-example gradients (``trainable = "all"``), delta = 1 / (10 n), RDP accountant, clipping norm 1;
the noise multiplier is the smallest that fits the planned stages in the target. Head calibration
and class weighting are off for every run, epsilon = inf included (DP skips the one and refuses
the other), so the rows differ only by DP.
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
from medveil.federated.engine import run_federation
from medveil.federated.training import derive_seed
from medveil.io import jsonable, write_json_atomic, write_text_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))
from meduniverse import FULL, QUICK, REPO  # noqa: E402
from meduniverse_tables import DATASETS  # noqa: E402

EPSILONS = (1.0, 3.0, 8.0, float("inf"))
JOB_VERSION = 3  # 2: members matched to the audit's non-members; 3: site secrets from the seed


def job_config(setting: dict[str, Any], data_dir: Path, seed: int, epsilon: float):
    raw: dict[str, Any] = {"seed": seed, "clients": [{"name": n, "path": str(data_dir / f"{n}.npz")} for n in DATASETS]}
    for section in ("model", "data", "pretrain", "federation", "local", "curation", "evaluation"):
        raw[section] = dict(setting[section])
    raw["federation"].update(strategy="distill", calibrate_heads=False)
    raw["local"]["class_weighting"] = "none"  # balanced weights read every private label: refused under DP
    if np.isfinite(epsilon):
        raw["privacy"] = {"dp": True, "target_epsilon": epsilon}
    return config_from_dict(raw, data_dir)


def run_job(setting: dict[str, Any], data_dir: Path, seed: int, epsilon: float, cache: Path) -> dict[str, Any]:
    key = jsonable({"setting": setting, "seed": seed, "epsilon": str(epsilon), "version": JOB_VERSION})
    path = cache / f"eps{epsilon:g}-seed{seed}.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return stored["result"]
    t0, c0 = time.time(), time.process_time()
    with tempfile.TemporaryDirectory(prefix="medveil-privacy-") as tmp:
        cfg = job_config(setting, data_dir, seed, epsilon)
        fit = local_fit
        if cfg.privacy.dp:  # the sites' secrets from the seed: a benchmark must be reproducible
            for name in DATASETS:
                write_text_atomic(Path(tmp) / "sites" / name / "secret", f"{derive_seed(seed, name, 'dp-secret')}\n")
            fit = DPSites(cfg.privacy, Path(tmp) / "sites", cfg.federation.rounds)
        metrics = run_federation(cfg, Path(tmp) / "run", progress=False, client_fit=fit)
        audit = strip_curves(audit_run(Path(tmp) / "run", progress=False))
    result = {"final": metrics["final"], "privacy": metrics.get("privacy", {}), "audit": audit["sites"],
              "seconds": time.time() - t0, "cpu_seconds": time.process_time() - c0}
    write_json_atomic(path, {"key": key, "result": result})
    return result


def strongest(site_audit: dict[str, Any]) -> tuple[float, float]:
    """(max AUC, max TPR at 1 % FPR) over targets and attacks of one site."""
    ms = [m for target in site_audit.values() if isinstance(target, dict) for m in target.values()]
    return max(m["auc"] for m in ms), max(m["tpr_at_1pct_fpr"] for m in ms)


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    short = {d: d.replace("mnist", "")[:8] for d in DATASETS}
    lines = ["universal model accuracy (mean over seeds) and membership inference per site "
             "(strongest attack: AUC / TPR@1%FPR; chance 0.50 / 0.01)",
             f"{'epsilon':<9}{'mean acc':>9}" + "".join(f"{short[d]:>18}" for d in DATASETS) + f"{'max AUC':>9}"]
    for eps, runs in results.items():
        accs = {d: np.mean([r["final"][d]["acc"] for r in runs]) for d in DATASETS}
        cells, aucs = [], []
        for d in DATASETS:
            auc, tpr = np.mean([strongest(r["audit"][d]) for r in runs], axis=0)
            aucs.append(auc)
            cells.append(f"{accs[d]:.3f} {auc:.2f}/{tpr:.3f}")
        spent = [r["privacy"][d]["epsilon"] for r in runs for d in DATASETS if d in r["privacy"]]
        label = eps if eps == "inf" else f"{float(eps):g} ({max(spent):.2f})" if spent else eps
        lines.append(f"{label:<9}{np.mean(list(accs.values())):>9.3f}" + "".join(f"{c:>18}" for c in cells)
                     + f"{max(aucs):>9.2f}")
    lines.append("each cell: accuracy, then AUC / TPR@1%FPR; in brackets: the largest epsilon any site spent")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="QUICK setting, one seed (< 10 min on 2 cores)")
    p.add_argument("--seeds", type=int, help="seeds (default: 1 quick, 3 full)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get(
        "MEDVEIL_SHARED_DATA", REPO.parent / "shared" / "data")) / "medmnist")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    setting = QUICK if args.quick else FULL
    seeds = args.seeds or (1 if args.quick else 3)
    name = "privacy_quick" if args.quick else "privacy"
    cache = REPO / "benchmarks" / "results" / "jobs" / name
    out = args.out or REPO / "benchmarks" / "results" / f"{name}.json"
    t0 = time.time()
    results: dict[str, list[dict[str, Any]]] = {}
    for eps in EPSILONS:
        for seed in range(seeds):
            r = run_job(setting, args.data_dir, seed, eps, cache)
            results.setdefault("inf" if not np.isfinite(eps) else f"{eps:g}", []).append(r)
            print(f"epsilon {eps:g} seed {seed}: mean acc {np.mean([m['acc'] for m in r['final'].values()]):.3f}, "
                  f"{r['seconds']:.0f} s", flush=True)
    text = table(results)
    print(text)
    write_json_atomic(out, {"mode": "quick" if args.quick else "full", "seeds": seeds, "setting": setting,
                            "epsilons": [str(e) for e in EPSILONS], "elapsed_s": time.time() - t0,
                            "threads": args.threads, "machine": platform.platform(),
                            "command": " ".join(sys.argv), "results": results, "table": text})
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
