"""``medveil report``: one self-contained HTML page for a run or a release folder."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="write one self-contained HTML page (figures embedded) for a federated run or a release folder",
        description="A federated run folder (metrics.json; evaluation.json of `medveil evaluate` when "
                    "present) or a k-anonymous release folder (report.json + release/; the JSON of "
                    "`medveil evaluate-release --json` via --evaluation, or OUT/evaluation.json). The "
                    "page needs no server and no network.",
    )
    p.add_argument("folder", type=Path, metavar="RUN", help="a run folder or a release folder")
    p.add_argument("--out", type=Path, required=True, metavar="report.html")
    p.add_argument("--evaluation", type=Path, metavar="FILE",
                   help="evaluation JSON to include (default: FOLDER/evaluation.json when present)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    from medveil.report.run_report import build_report

    kind = build_report(args.folder, args.out, args.evaluation, args.overwrite)
    print(f"medveil: {kind} report of {args.folder} -> {args.out}")
    return 0
