"""Does the calibrated attack find members, or patients its reference model has seen?

`medveil audit` halves a site's held-out images: the reference model trains on one half (R), the
other (E) is scored. OrganAMNIST's held-out images are CT slices, many per patient (its val split:
a few patients' volumes), so a random halving puts one patient's slices on both sides. Under DP at
epsilon 8 the calibrated attack then scores 0.57-0.58 on organ-a while the loss attack is at chance.
This runs the audit of one DP run (epsilon 8, heads refit with DP-SGD for 20 epochs: the
library's default until this benchmark chose 10, below)
and the same run without DP (heads refit exactly), with the held-out
images halved at random (the default) and by look-alike groups (``--reference-split grouped``):
if grouping removes organ-a's excess at epsilon 8 and keeps what the run without DP leaks, the
excess was the confound, not membership. A third variant, ``unused-train``, takes the
non-members (R and E) from train images that neither the site nor the pool used: the members'
own population, so a target that learned nothing about its members scores 0.5 in expectation
(``medveil audit --nonmembers unused-train``); ``unused-train-2000`` holds out up to 2000 of them
per site (``--max-nonmembers 2000``) instead of the run's 500, for narrower chance bands.

    python benchmarks/audit_grouped.py   # benchmarks/privacy.py's job: shipped recipe, FULL sizes, seed 0,
                                         # val split; the two runs are kept in runs/bench/ (made when absent)
    python benchmarks/audit_grouped.py --variants unused-train   # only these rows; the others kept
    python benchmarks/audit_grouped.py --variants unused-train-2000 --epsilons 8 --seeds 3
        # the same audit of seeds 1 and 2's runs too (made when absent: 13 min each at epsilon 8),
        # and a row with the mean over the seeds
    python benchmarks/audit_grouped.py --variants unused-train-2000 --epsilons 8 --seeds 3 --refit 10
        # the DP runs with a 10-epoch head refit ([privacy] calibration_epochs = 10) instead of 20:
        # rows "epsilon 8 (refit 10), ..."

Rows of seed 0 are named "<run>, <variant>", those of another seed "<run>, <variant>, seed <s>",
their mean "<run>, <variant>, mean of <n> seeds" (the mean of each figure). Beside the audits, the
JSON's "accuracy" holds each audited run's val accuracy per site and its mean (the utility the
refit length trades against).

Writes benchmarks/results/audit_grouped.json and prints the table (AUC per site: loss / calibrated
attack, the stronger of the two targets).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from medveil.evaluate.audit import audit_run, strip_curves
from medveil.io import write_json_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))
from meduniverse import FULL, REPO  # noqa: E402
from privacy import kept_run, study_args  # noqa: E402

# name: (non-members, reference split, held-out images per site: 0 = the run's max_test, 500)
VARIANTS = {"random": ("val", "random", 0), "grouped": ("val", "grouped", 0), "unused-train": ("unused-train", "random", 0),
            "unused-train-2000": ("unused-train", "random", 2000)}


def strongest(site: dict[str, Any], attack: str, figure: str = "auc") -> float:
    """The stronger target's figure; nan for a site not audited (no unused train image)."""
    return max((site[t][attack][figure] for t in ("update", "universal") if t in site), default=float("nan"))


# the kept runs' DP head-refit epochs unless --refit says otherwise (rows carry no "(refit N)"): 20, the
# library's default when these rows were made; kept so that a rerun reproduces them (the default is now 10)
REFIT = 20


def seeded(name: str, seed: int) -> str:
    return name + (f", seed {seed}" if seed else "")


def row_key(run: str, variant: str, seed: int) -> str:
    return seeded(f"{run}, {variant}", seed)


def val_accuracy(run: Path) -> dict[str, float]:
    """The run's final val accuracy per site, and their mean."""
    final = json.loads((run / "metrics.json").read_text())["final"]
    acc = {site: round(m["acc"], 4) for site, m in final.items()}
    return {**acc, "mean": round(float(np.mean(list(acc.values()))), 4)}


def mean_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure of each (site, target, attack) averaged over the runs' audits. The chance
    bands are averaged too: the mean of the seeds' bands, wider than a band for the mean itself
    (about sqrt(N) times), so "inside its band" on a mean row is the lenient reading. A site not
    audited in some run is reported so; a target absent from some run (an update refused under
    DP) is left out."""
    def mean(values: list[Any]) -> Any:
        if isinstance(values[0], dict):
            return {k: mean([v[k] for v in values]) for k in values[0]}
        return float(np.mean(values))

    out: dict[str, Any] = {}
    for site, first in runs[0].items():
        per = [r.get(site, {"unavailable": "not audited in every run"}) for r in runs]
        gone = next((p for p in per if "unavailable" in p), None)
        if gone is not None:
            out[site] = gone
            continue
        out[site] = {t: mean([p[t] for p in per]) for t in first if all(isinstance(p.get(t), dict) for p in per)}
    return out


def main(argv: list[str] | None = None) -> int:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated of {', '.join(VARIANTS)}")
    extra.add_argument("--epsilons", default="8,inf", help="the runs audited: 8 (DP), inf (no DP) or both")
    extra.add_argument("--seeds", type=int, default=1, help="the runs of seeds 0 .. N-1 (made when absent)")
    extra.add_argument("--refit", type=int, default=REFIT, help="epochs of the DP head refit of the epsilon-8 runs "
                                                               f"([privacy] calibration_epochs, >= 1; default {REFIT})")
    known, rest = extra.parse_known_args(argv)
    unknown = [v for v in known.variants.split(",") if v not in VARIANTS]
    if unknown:  # before hours of work, not after
        extra.error(f"unknown variant {unknown[0]!r} (choose from {', '.join(VARIANTS)})")
    epsilons = [float(e) for e in known.epsilons.split(",")]
    if not set(epsilons) <= {8.0, float("inf")} or known.seeds < 1 or known.refit < 1:
        extra.error("--epsilons takes 8 and / or inf, --seeds a count >= 1, --refit epochs >= 1")
    args = study_args(__doc__, rest)
    out = REPO / "benchmarks" / "results" / "audit_grouped.json"
    stored = json.loads(out.read_text()) if out.is_file() else {}
    results: dict[str, dict[str, Any]] = stored.get("results", {})
    accuracy: dict[str, dict[str, float]] = stored.get("accuracy", {})
    for eps in epsilons:
        refit = known.refit if eps != float("inf") else REFIT  # without DP the refit is exact: no epochs
        label = "no DP" if eps == float("inf") else f"epsilon {eps:g}" + (f" (refit {refit})" if refit != REFIT else "")
        for seed in range(known.seeds):
            run = kept_run(FULL, args.data_dir, seed, eps, "val", calibration=refit)
            accuracy[seeded(label, seed)] = val_accuracy(run)
            for variant in known.variants.split(","):
                nonmembers, split, held = VARIANTS[variant]
                audit = strip_curves(audit_run(run, progress=False, nonmembers=nonmembers, reference_split=split,
                                               max_nonmembers=held))
                results[row_key(label, variant, seed)] = audit["sites"]
        for variant in known.variants.split(",") if known.seeds > 1 else ():
            runs = [results[row_key(label, variant, s)] for s in range(known.seeds)]
            results[f"{label}, {variant}, mean of {known.seeds} seeds"] = mean_of(runs)
    order = list(VARIANTS)

    def row_order(key: str) -> tuple[bool, str, int, bool, int]:  # per run and variant: seed 0, 1, ..., the mean
        parts = key.split(", ")
        seed = int(parts[2].split()[1]) if len(parts) > 2 and parts[2].startswith("seed ") else 0
        return key.startswith("no DP"), parts[0], order.index(parts[1]), "mean" in key, seed

    results = dict(sorted(results.items(), key=lambda kv: row_order(kv[0])))
    sites = list(next(iter(results.values())))
    lines = [f"{'AUC (loss / calibrated), non-members':<40}" + "".join(f"{s[:12]:>14}" for s in sites)]
    for key, row in results.items():
        lines.append(f"{key:<40}" + "".join(f"{strongest(row[s], 'loss'):>7.3f}/{strongest(row[s], 'calibrated'):.3f}"
                                             for s in sites))
    lines.append(f"{'TPR@1%FPR (stronger attack and target)':<40}" + "".join(f"{s[:12]:>14}" for s in sites))
    for key, row in results.items():
        lines.append(f"{key:<40}" + "".join(
            f"{max(strongest(row[s], a, 'tpr_at_1pct_fpr') for a in ('loss', 'calibrated')):>14.3f}" for s in sites))
    print("\n".join(lines))
    write_json_atomic(out, {"command": "python benchmarks/audit_grouped.py",
                            "setting": "privacy.py --shipped job, seed 0 unless the row says, eval split val, --dp-calibration 20 "
                                       "unless the row says (refit N); "
                                       "random / grouped: val non-members; unused-train: unused train images",
                            "results": results, "accuracy": accuracy, "table": "\n".join(lines)})
    print(f"written: {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
