"""``medveil demo``: the main job on the shipped samples, as a list of steps.

Each :class:`Step` gets the parsed arguments and the output folder and returns a JSON-ready
result; results go to ``<out>/demo.json`` (written atomically when every step has run).
Later steps (federated training, GAN, anonymisation) are appended to :data:`STEPS`.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medveil.data.loading import load_dataset
from medveil.data.samples import SAMPLE_NAMES, sample_path
from medveil.data.summary import describe, summary_dict


@dataclass(frozen=True)
class Step:
    name: str
    help: str
    run: Callable[[argparse.Namespace, Path], Any]


def samples_step(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Load every shipped sample and print its summary."""
    results = {}
    for name in SAMPLE_NAMES:
        dataset = load_dataset(sample_path(name))
        print(describe(dataset), end="\n\n")
        results[name] = summary_dict(dataset)
    return results


STEPS: list[Step] = [
    Step("samples", "load the shipped sample datasets", samples_step),
]


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo", help="run the main job on the shipped samples",
        description="Run MedVeil end to end on the small samples shipped with it. Steps: "
                    + "; ".join(f"{s.name}: {s.help}" for s in STEPS) + ".",
    )
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), metavar="DIR",
                      help="output folder (default: runs/demo)")
    demo.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for number, step in enumerate(STEPS, start=1):
        print(f"== step {number}/{len(STEPS)}: {step.name} - {step.help}", flush=True)
        results[step.name] = step.run(args, out)
    tmp = out / "demo.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out / "demo.json")
    print(f"results: {out / 'demo.json'}")
    return 0
