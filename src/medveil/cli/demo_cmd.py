"""``medveil demo``: the main job on the shipped samples, as a list of steps.

Each :class:`Step` gets the parsed arguments and the output folder and returns a JSON-ready
result; results go to ``<out>/demo.json`` (written atomically when every step has run).
Steps: the shipped samples, a short federation of the six samples (MedUniverse), a tiny
StyleGAN2 on the RetinaMNIST sample, and a k = 5 release of that sample (k-SALSA) checked by
``verify-release``. Every step writes its own sub-folder of ``--out`` and resumes or reuses what
an earlier, interrupted demo left there.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medveil.errors import ConfigError
from medveil.io import write_json_atomic


@dataclass(frozen=True)
class Step:
    name: str
    help: str
    run: Callable[[argparse.Namespace, Path], Any]


def samples_step(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Load every shipped sample and print its summary."""
    from medveil.data.loading import load_dataset
    from medveil.data.samples import SAMPLE_NAMES, sample_path
    from medveil.data.summary import describe, summary_dict

    results = {}
    for name in SAMPLE_NAMES:
        dataset = load_dataset(sample_path(name))
        print(describe(dataset), end="\n\n")
        results[name] = summary_dict(dataset)
    return results


def federate_step(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Six sites, six modalities: MIM pretraining, then stages of fine-tuning and curation."""
    from medveil.federated.demo import run

    return run(out / "federated")


def gan_step(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """A tiny 32 px StyleGAN2 on the RetinaMNIST sample's train split; writes a sample grid."""
    from medveil.generative.demo import train_tiny

    summary = train_tiny(None, out / "gan", steps=args.gan_steps, resume=True)
    print(f"sample grid: {summary['grid']}")
    return {key: summary[key] for key in ("grid", "dataset", "step", "wall_s") if key in summary}


def release_step(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """k = 5 synthetic release of the RetinaMNIST sample with the tiny generator, then verified."""
    from medveil.anonymize.demo import run

    return run(out / "k-anonymous", gan_dir=out / "gan", gan_steps=args.gan_steps)


def predict_step(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The universal model's blood task on the BloodMNIST sample's test split -> a CSV."""
    from medveil.data.samples import sample_path
    from medveil.evaluate.predict import predict

    if not (out / "federated" / "model.pt").is_file():
        federate_step(args, out)
    csv = out / "predictions_blood.csv"
    s = predict(out / "federated" / "model.pt", sample_path("bloodmnist"), "blood", csv, overwrite=True,
                progress=False)
    print(f"predicted {s['images']} images -> {csv}; accuracy {s['metrics']['acc']:.3f}")
    return {"csv": str(csv), "images": s["images"], "acc": s["metrics"]["acc"]}


def report_step(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """One HTML page per result: the federated run and the release (open them in a browser)."""
    from medveil.report.run_report import build_report

    pages = {}
    for name in ("federated", "k-anonymous"):
        if (out / name).is_dir():
            page = out / f"report_{name}.html"
            build_report(out / name, page, overwrite=True)
            pages[name] = str(page)
            print(f"report: {page}")
    return pages


STEPS: list[Step] = [
    Step("samples", "load the shipped sample datasets", samples_step),
    Step("federate", "federate the six samples into one universal ViT", federate_step),
    Step("gan", "train a tiny StyleGAN2 on the RetinaMNIST sample", gan_step),
    Step("release", "k = 5 anonymous synthetic release of that sample, verified", release_step),
    Step("predict", "apply the universal model's blood task to new images (a CSV)", predict_step),
    Step("report", "an HTML page for the federated run and one for the release", report_step),
]


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo", help="run the main job on the shipped samples",
        description="Run MedVeil end to end on the small samples shipped with it. Steps: "
                    + "; ".join(f"{s.name}: {s.help}" for s in STEPS) + ".",
    )
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), metavar="DIR",
                      help="output folder (default: runs/demo)")
    demo.add_argument("--only", metavar="STEP[,STEP]",
                      help="run only these steps (" + ", ".join(s.name for s in STEPS) + "); "
                           "a step that needs an earlier one's output runs it too")
    demo.add_argument("--gan-steps", type=int, default=300, metavar="N",
                      help="training steps of the tiny demo generator (default: 300)")
    demo.set_defaults(func=run_demo)


def select_steps(only: str | None) -> list[Step]:
    """The steps named in ``only`` (comma-separated), in demo order; all when None."""
    if not only:
        return list(STEPS)
    names = {n.strip() for n in only.split(",") if n.strip()}
    unknown = names - {s.name for s in STEPS}
    if unknown:
        raise ConfigError(f"--only: unknown step(s) {', '.join(sorted(unknown))}; "
                          f"choose from {', '.join(s.name for s in STEPS)}")
    return [s for s in STEPS if s.name in names]


def run_demo(args: argparse.Namespace) -> int:
    steps = select_steps(args.only)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for number, step in enumerate(steps, start=1):
        print(f"== step {number}/{len(steps)}: {step.name} - {step.help}", flush=True)
        results[step.name] = step.run(args, out)
    write_json_atomic(out / "demo.json", results)
    print(f"results: {out / 'demo.json'}")
    return 0
