"""``medveil adapt``: a new site fits its own task on the universal backbone."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "adapt",
        help="add a new site's task to a universal model: a probe on the frozen backbone, or a fine-tune",
        description="Fits on DATA's train split, chooses on its val split (else a seeded tenth of train), "
                    "reports its test split next to the same recipe on the run's MIM-only start, and "
                    "writes a universal model with the task added. `medveil predict NEW_MODEL ... --task "
                    "NAME` then serves it.",
    )
    p.add_argument("model", type=Path, metavar="MODEL", help="a universal model (RUN/model.pt or an export)")
    p.add_argument("data", metavar="DATA", help="the new site's labelled images (a path or a name under the "
                   "data root)")
    p.add_argument("--name", required=True, help="the new task's name")
    p.add_argument("--mode", choices=("probe", "finetune"), default="probe",
                   help="probe (default): frozen backbone, logistic head, other tasks kept; finetune: "
                        "backbone + head trained, the written model holds the new task only")
    p.add_argument("--head-start", choices=("probe", "random"),
                   help="--mode finetune only: start from the probe's head (the default: linear probe, then "
                        "fine-tune, LP-FT) or a random head")
    p.add_argument("--out", type=Path, required=True, metavar="NEW_MODEL.pt")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=run_adapt)


def run_adapt(args: argparse.Namespace) -> int:
    from medveil.errors import ConfigError
    from medveil.evaluate.adapt import adapt, format_summary

    if args.head_start is not None and args.mode != "finetune":
        raise ConfigError("--head-start applies to --mode finetune only")
    s = adapt(args.model, args.data, args.name, args.mode, args.out, args.overwrite, args.head_start or "probe")
    if s["converted"]:
        print(f"medveil: warning: converted {s['converted']} images to the model's size and channels")
    print(format_summary(s))
    return 0
