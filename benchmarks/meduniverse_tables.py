"""The printed tables of ``benchmarks/meduniverse.py``: accuracy / balanced accuracy per method and
dataset (with the site-alone and published rows), paired tests, leave-one-dataset-out, and the
cost of each method in CPU-minutes."""

from __future__ import annotations

from typing import Any

from medveil.evaluate.site_alone import PUBLISHED_NOTE, PUBLISHED_RESNET18_28
from medveil.evaluate.stats import format_mean_std, mean_std, paired_tests

DATASETS = ("bloodmnist", "organamnist", "retinamnist", "breastmnist", "pneumoniamnist", "ham10000")
CALIBRATED = {"meduniverse+cal": "meduniverse", "fedavg+cal": "fedavg"}
FEDERATED = ("meduniverse", "fedavg", "fedprox", "relay")


def cell(results: list[dict[str, Any]], method: str, dataset: str, kind: str, metric: str) -> list[float]:
    out = []
    for r in results:
        m = r.get(method, {}).get(dataset, {}).get(kind)
        out.append(float("nan") if m is None or m.get(metric) is None else float(m[metric]))
    return out


def tables(results: list[dict[str, Any]], lodo: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    lines: list[str] = []
    summary: dict[str, Any] = {"per_dataset": {}, "tests": {}, "lodo": {}}
    rows = [("meduniverse+cal", "universal"), ("fedavg+cal", "universal"),
            ("meduniverse", "universal"), ("fedavg", "universal"), ("fedprox", "universal"),
            ("relay", "universal"), ("local_only", "universal"), ("centralised", "universal"),
            ("alone_small_cnn", "universal"), ("alone_resnet18", "universal"),
            ("mim_only", "probe"), ("meduniverse", "probe"), ("fedavg", "probe"), ("fedprox", "probe"),
            ("relay", "probe"),
            ("mim_only", "finetune"), ("meduniverse", "finetune"), ("fedavg", "finetune")]
    ran = {m for r in results for m in r}  # full mode runs fewer methods than quick mode
    rows = [(m, k) for m, k in rows if m in ran]
    for metric in ("acc", "bacc"):
        lines.append(f"\n{metric} (%), mean ± std over {len(results)} seeds; (i) universal = model + own "
                     f"head, (ii) probe / finetune of the backbone")
        header = f"{'method':<16}{'eval':<11}" + "".join(f"{d[:12]:>15}" for d in DATASETS) + f"{'mean':>9}"
        lines += [header, "-" * len(header)]
        for method, kind in rows:
            cells = [cell(results, method, d, kind, metric) for d in DATASETS]
            means = [mean_std(c)[0] for c in cells]
            overall = sum(means) / len(means)
            summary["per_dataset"].setdefault(metric, {})[f"{method}/{kind}"] = {
                d: dict(zip(("mean", "std"), mean_std(c), strict=True)) for d, c in zip(DATASETS, cells, strict=True)}
            seeds = sum(method in r for r in results)  # full mode: the ResNet-18 alone on seed 0 only
            lines.append(f"{method:<16}{kind:<11}" + "".join(f"{format_mean_std(c):>15}" for c in cells)
                         + f"{overall * 100:>9.1f}" + (f"   ({seeds} seed{'s' * (seeds > 1)})"
                                                       if seeds < len(results) else ""))
        if metric == "acc":
            lines.append(f"{'published':<16}{'(ref)':<11}" + "".join(
                f"{PUBLISHED_RESNET18_28[d] * 100:>15.1f}" if d in PUBLISHED_RESNET18_28 else f"{'-':>15}"
                for d in DATASETS) + f"   {PUBLISHED_NOTE}")
    lines.append("\nPaired tests over (dataset, seed) pairs, two-sided (Wilcoxon signed-rank; paired t-test)")
    comparisons = [(("meduniverse", "universal"), (b, "universal")) for b in
                   ("fedavg", "fedprox", "relay", "local_only", "centralised")]
    comparisons += [(("meduniverse+cal", "universal"), (b, "universal")) for b in
                    ("centralised", "fedavg+cal", "local_only", "meduniverse")]
    comparisons += [(("meduniverse", k), ("mim_only", k)) for k in ("probe", "finetune")]
    comparisons += [(("meduniverse+cal", "universal"), ("alone_small_cnn", "universal")),
                    (("meduniverse", "finetune"), ("alone_small_cnn", "universal"))]
    comparisons = [(a, b) for a, b in comparisons if a[0] in ran and b[0] in ran]
    for metric in ("acc", "bacc"):
        for (ma, ka), (mb, kb) in comparisons:
            a = [x for d in DATASETS for x in cell(results, ma, d, ka, metric)]
            b = [x for d in DATASETS for x in cell(results, mb, d, kb, metric)]
            t = paired_tests(a, b)
            key = f"{metric}: {ma}/{ka} vs {mb}/{kb}"
            summary["tests"][key] = t
            lines.append(f"{key:<58} n={t['n']:>2} diff {t['mean_diff'] * 100:+6.2f} pts  "
                         f"W/L {t['wins']}/{t['losses']}  Wilcoxon p={t['wilcoxon_p']:.4f}  t-test p={t['t_p']:.4f}")
    for cal, plain in CALIBRATED.items():  # the model the clients received = the seed job's universal model
        pairs = [(r[cal][d]["before_calibration"]["acc"], r[plain][d]["universal"]["acc"])
                 for r in results if cal in r for d in DATASETS]
        same = sum(abs(a - b) < 1e-9 for a, b in pairs)
        summary["tests"][f"{cal}: received model == {plain} universal"] = {"same": same, "n": len(pairs)}
        lines.append(f"{cal}: the received (uncalibrated) model's accuracy equals {plain}'s universal one "
                     f"on {same}/{len(pairs)} (dataset, seed) pairs")
    if lodo:
        lines.append("\nLeave-one-dataset-out: backbone federated on the other five, evaluated on the held-out "
                     "dataset (acc %, mean ± std over seeds)")
        held = sorted({row["held"] for row in lodo}, key=DATASETS.index)
        for kind in ("probe", "finetune"):
            for method in ("mim_only", "meduniverse") + (("alone_small_cnn",) if kind == "finetune" else ()):
                vals = {h: [r[method][kind]["acc"] for r in lodo if r["held"] == h and method in r] for h in held}
                summary["lodo"][f"{method}/{kind}"] = {h: mean_std(v) for h, v in vals.items()}
                lines.append(f"{method:<16}{kind:<11}" + "".join(f"{h[:12]:>14} {format_mean_std(v):>13}"
                                                                 for h, v in vals.items()))
            a = [r["meduniverse"][kind]["acc"] for r in lodo]
            b = [r["mim_only"][kind]["acc"] for r in lodo]
            t = paired_tests(a, b)
            summary["tests"][f"lodo acc: meduniverse/{kind} vs mim_only/{kind}"] = t
            lines.append(f"  paired over (held-out, seed), n={t['n']}: diff {t['mean_diff'] * 100:+.2f} pts, "
                         f"Wilcoxon p={t['wilcoxon_p']:.4f}, t-test p={t['t_p']:.4f}")
    lines += cost_lines(results, summary)
    return "\n".join(lines), summary


def cost_lines(results: list[dict[str, Any]], summary: dict[str, Any]) -> list[str]:
    """CPU-minutes per seed of each method's training, all sites together (process CPU time; a
    federated method's includes the shared stage-0 pretraining; evaluation (ii) is not counted)."""
    cost: dict[str, list[float]] = {}
    for r in results:
        c = r.get("_cpu", {})
        for m in FEDERATED:
            if m in c:
                cost.setdefault(m, []).append((c[m] + (c.get("pretrain") or 0.0)) / 60)
        if "local_only" in c:
            cost.setdefault("local_only", []).append(c["local_only"] / 60)
        for arch in ("alone_small_cnn", "alone_resnet18"):
            if arch in r:
                cost.setdefault(arch, []).append(sum(r[arch][d]["universal"]["cpu_seconds"]
                                                     for d in DATASETS if d in r[arch]) / 60)
    summary["cpu_minutes_per_seed"] = {m: mean_std(v) for m, v in cost.items()}
    out = ["\nCost: CPU-minutes per seed of training, all six sites together (federated: with stage-0 "
           "pretraining)"]
    out += [f"{m:<20}{mean_std(v)[0]:>8.1f}" for m, v in cost.items()]
    return out
