"""Collect a finished run of a shipped config, as a user runs it, into one benchmark JSON and print
its table (README, "The shipped config, measured").

    MEDVEIL_DATA_ROOT=../shared/data medveil federate --config src/medveil/configs/medmnist6.toml --out RUN
    MEDVEIL_DATA_ROOT=../shared/data medveil evaluate RUN
    python benchmarks/shipped_run.py RUN --federate-wall-s S --evaluate-wall-s S \
        --out benchmarks/results/medmnist6_shipped_run.json

The run folder holds everything but the two commands' wall times (give them as measured, e.g. by
``/usr/bin/time``; without them the federation's time is the sum of its stages' seconds). Rows, on
each site's same test images: the universal model (own head, calibrated), its backbone fine-tuned,
the MIM-only start fine-tuned, the small CNN alone on the site's own train images, and the
published MedMNIST v2 ResNet-18 (28 px, all train images, GPU)."""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path
from typing import Any

from medveil.io import write_json_atomic


def collect(run: Path, what: str, federate_wall_s: float | None, evaluate_wall_s: float | None) -> dict[str, Any]:
    """The run's config, final and pre-calibration test metrics, stage seconds and evaluation."""
    stages = json.loads((run / "metrics.json").read_text())["stages"]
    last = stages[-1]["clients"]
    stage_s = [float(s["seconds"]) for s in stages]
    cpu_s = [float(s.get("cpu_seconds") or 0.0) for s in stages]
    return {
        "what": what,
        "commands": [f"MEDVEIL_DATA_ROOT=../shared/data medveil federate --config "
                     f"src/medveil/configs/medmnist6.toml --out {run}",
                     f"MEDVEIL_DATA_ROOT=../shared/data medveil evaluate {run}"],
        "federate_wall_s": round(federate_wall_s if federate_wall_s else sum(stage_s), 1),
        "federate_cpu_min": round(sum(cpu_s) / 60, 1),
        "evaluate_wall_s": evaluate_wall_s,
        "config": tomllib.loads((run / "config.toml").read_text()),
        "final": {n: c["test"] for n, c in last.items()},
        "before_calibration": {n: c["test_before_calibration"] for n, c in last.items()
                               if "test_before_calibration" in c},
        "stage_seconds": stage_s,
        "evaluation": json.loads((run / "evaluation.json").read_text()),
    }


def table(result: dict[str, Any]) -> str:
    """Markdown: acc / bacc per site and their mean, for each row the README shows."""
    ev = result["evaluation"]
    sites = list(result["final"])
    rows = [("universal (own head)", lambda s: ev["universal"][s]),
            ("universal fine-tuned", lambda s: ev["final"][s]["finetune"]),
            ("MIM-only fine-tuned", lambda s: ev["mim_only"][s]["finetune"]),
            ("small CNN alone", lambda s: ev["site_alone"]["small_cnn"][s])]
    lines = ["| row | " + " | ".join(sites) + " | mean |", "|---" * (len(sites) + 2) + "|"]
    for label, get in rows:
        cells = [(float(get(s)["acc"]), float(get(s)["bacc"])) for s in sites]
        mean = (sum(a for a, _ in cells) / len(cells), sum(b for _, b in cells) / len(cells))
        lines.append(f"| {label} | " + " | ".join(f"{a:.3f} / {b:.3f}" for a, b in cells)
                     + f" | {mean[0]:.3f} / {mean[1]:.3f} |")
    published = [ev["published"].get(s) for s in sites]
    lines.append("| published ResNet-18 (28, all train images, GPU) | "
                 + " | ".join(f"{p:.3f}" if p is not None else "-" for p in published) + " | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished, evaluated run folder")
    parser.add_argument("--out", type=Path, required=True, help="JSON to write")
    parser.add_argument("--what", default="the shipped config run as a user runs it, then medveil evaluate")
    parser.add_argument("--federate-wall-s", type=float, help="wall seconds of `medveil federate`")
    parser.add_argument("--evaluate-wall-s", type=float, help="wall seconds of `medveil evaluate`")
    args = parser.parse_args()
    result = collect(args.run, args.what, args.federate_wall_s, args.evaluate_wall_s)
    write_json_atomic(args.out, result)
    print(table(result))
    print(f"federate {result['federate_wall_s'] / 60:.1f} min ({result['federate_cpu_min']} CPU-min); written: {args.out}")


if __name__ == "__main__":
    main()
