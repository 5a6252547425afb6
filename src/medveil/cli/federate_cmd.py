"""``medveil federate`` (run / resume a federated universal model) and ``medveil evaluate``."""

from __future__ import annotations

import argparse
from pathlib import Path

from medveil.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    fed = subparsers.add_parser(
        "federate",
        help="train a federated universal model (server MIM pretraining, then stages of "
             "client fine-tuning and server curation) in-process",
        description="Run the federation described by a TOML config into RUN_DIR (config.toml, "
                    "checkpoints/, metrics.json, model.pt, accuracy_by_stage.png, 'complete' "
                    "marker). Example configs: src/medveil/configs/*.toml.",
    )
    fed.add_argument("--config", type=Path, help="TOML config (optional with --resume: "
                                                 "RUN_DIR/config.toml is used)")
    fed.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
                     help="change one value of the config (repeatable; VALUE as in TOML), e.g. the full-data "
                          "run of the shipped config: --set data.max_train=0 --set data.max_test=0")
    fed.add_argument("--out", type=Path, required=True, metavar="RUN_DIR", help="run folder")
    fed.add_argument("--resume", action="store_true",
                     help="continue an interrupted run from its last stage checkpoint")
    fed.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    fed.add_argument("--threads", type=int, metavar="N",
                     help="CPU threads for torch (default: torch's; 1 is faster on a busy machine)")
    fed.set_defaults(func=run_federate)

    ev = subparsers.add_parser(
        "evaluate",
        help="evaluate a finished federated run: universal model per client, fine-tuned and "
             "linear-probed backbone vs the MIM-only baseline",
    )
    ev.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    ev.add_argument("--no-finetune", action="store_true", help="linear probes only (faster)")
    ev.add_argument("--site-alone", default="small_cnn", metavar="ARCHS",
                    help="the CNNs each site trains alone on its own train images, for comparison: "
                         "small_cnn (the default, about a CPU-minute per 2000 images), resnet18 "
                         "(~10x that), small_cnn,resnet18, or none")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch (default: torch's)")
    ev.set_defaults(func=run_evaluate)

    au = subparsers.add_parser(
        "audit",
        help="membership-inference audit of a finished run where its data is: loss and calibrated "
             "attacks on each site's last update, on the universal model and on its backbone alone (AUC, TPR at "
             "low FPR)",
        description="Members: each site's train images; non-members: half of its test images (or "
                    "--nonmembers val; the other half trains the attacker's reference model). Writes "
                    "RUN_DIR/audit.json and RUN_DIR/audit_roc.png. Compare a run with [privacy] dp = true "
                    "and one without.",
    )
    au.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    au.add_argument("--nonmembers", choices=("test", "val", "unused-train"),
                    help="the split the non-members come from (default: the run's eval split, test); val "
                         "where the test split comes from another source than train (OrganAMNIST, "
                         "PneumoniaMNIST): the attack would otherwise find members by that shift alone; "
                         "unused-train: train images no one used, the members' own population (needs "
                         "[data] max_train)")
    au.add_argument("--max-nonmembers", type=int, default=0, metavar="N",
                    help="held-out images per site, both halves (default 0: the run's [data] max_test); "
                         "more narrow the chance bands")
    au.add_argument("--reference-split", choices=("random", "grouped"), default="random",
                    help="how the non-members are halved between the reference model and scoring: a random draw "
                         "(default) or whole look-alike groups (held-out images that come many per patient, "
                         "e.g. CT slices: a random draw lets the reference model see the scored patients); "
                         "grouping clusters all held-out images at once: memory grows with their count squared")
    au.add_argument("--quiet", action="store_true", help="no progress")
    au.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch (default: torch's)")
    au.set_defaults(func=run_audit)


def _set_threads(n: int | None) -> None:
    if n is not None:
        if n < 1:
            raise ConfigError(f"--threads must be >= 1, got {n}")
        import torch

        torch.set_num_threads(n)


def run_federate(args: argparse.Namespace) -> int:
    from medveil.federated.config import load_config
    from medveil.federated.engine import run_federation, summary_table

    _set_threads(args.threads)
    config = args.config
    if config is None:
        if not args.resume:
            raise ConfigError("--config is required (or --resume an existing RUN_DIR)")
        config = args.out / "config.toml"
    cfg = load_config(config, overrides=args.overrides)
    metrics = run_federation(cfg, args.out, resume=args.resume, progress=not args.quiet)
    if not args.quiet:
        print(summary_table(metrics))
        print(f"run folder: {args.out}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from medveil.evaluate.federated_run import evaluate_run, format_table

    _set_threads(args.threads)
    archs = tuple(a for a in args.site_alone.split(",") if a and a != "none")
    result = evaluate_run(args.run_dir, finetune=not args.no_finetune, progress=not args.quiet,
                          site_alone_archs=archs)
    print(format_table(result))
    print(f"written: {args.run_dir / 'evaluation.json'}")
    return 0


def run_audit(args: argparse.Namespace) -> int:
    from medveil.evaluate.audit import audit_run, format_table

    _set_threads(args.threads)
    result = audit_run(args.run_dir, progress=not args.quiet, nonmembers=args.nonmembers,
                       reference_split=args.reference_split, max_nonmembers=args.max_nonmembers)
    print(format_table(result))
    print(f"written: {args.run_dir / 'audit.json'}, {args.run_dir / 'audit_roc.png'}")
    return 0
