"""``medveil federate`` (run / resume a federated universal model) and ``medveil evaluate``."""

from __future__ import annotations

import argparse
import logging
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
    fed.add_argument("--out", type=Path, required=True, metavar="RUN_DIR", help="run folder")
    fed.add_argument("--resume", action="store_true",
                     help="continue an interrupted run from its last stage checkpoint")
    fed.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    fed.set_defaults(func=run_federate)

    ev = subparsers.add_parser(
        "evaluate",
        help="evaluate a finished federated run: universal model per client, fine-tuned and "
             "linear-probed backbone vs the MIM-only baseline",
    )
    ev.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    ev.add_argument("--no-finetune", action="store_true", help="linear probes only (faster)")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.set_defaults(func=run_evaluate)


def run_federate(args: argparse.Namespace) -> int:
    from medveil.federated.config import load_config
    from medveil.federated.engine import run_federation

    config = args.config
    if config is None:
        if not args.resume:
            raise ConfigError("--config is required (or --resume an existing RUN_DIR)")
        config = args.out / "config.toml"
    cfg = load_config(config)
    logging.basicConfig(level=logging.WARNING, format="medveil: %(message)s")
    metrics = run_federation(cfg, args.out, resume=args.resume, progress=not args.quiet)
    if not args.quiet:
        print(summary(metrics))
        print(f"run folder: {args.out}")
    return 0


def summary(metrics: dict) -> str:
    """Final per-client test metrics and traffic of a run."""
    lines = [f"strategy {metrics['strategy']} ({metrics['schedule']}), "
             f"{len(metrics['stages']) - 1} stages after MIM pretraining",
             f"{'client':<16}{'acc':>8}{'bacc':>8}{'auc':>8}{'MB down':>10}{'MB up':>8}"]
    for name, m in metrics["final"].items():
        b = metrics["bytes_total"].get(name, {"down": 0, "up": 0})
        auc = m.get("auc")
        lines.append(f"{name:<16}{m['acc']:>8.3f}{m['bacc']:>8.3f}"
                     f"{(auc if auc is not None else float('nan')):>8.3f}"
                     f"{b['down'] / 1e6:>10.1f}{b['up'] / 1e6:>8.1f}")
    rejected = sum(len(s.get("rejected", [])) for s in metrics["stages"])
    if rejected:
        lines.append(f"{rejected} client update(s) rejected (see metrics.json)")
    return "\n".join(lines)


def run_evaluate(args: argparse.Namespace) -> int:
    from medveil.evaluate.federated_run import evaluate_run, format_table

    result = evaluate_run(args.run_dir, finetune=not args.no_finetune, progress=not args.quiet)
    print(format_table(result))
    print(f"written: {args.run_dir / 'evaluation.json'}")
    return 0
