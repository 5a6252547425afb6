"""``medveil verify-release OUT``: check a k-anonymous release before it is shared.

Exit codes: 0 every check passed, 1 a check failed (listed), 2 bad input (missing files).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path



def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "verify-release",
        help="check a k-anonymous release folder (k per image, no ids, complete) before sharing",
        description=(
            "Check OUT (written by the anonymize step): every released image stands for >= k "
            "distinct people (patients when the audit has patient ids), every member is in one "
            "group, release and audit list the same files, no member or patient id appears in "
            "a file name or labels.csv, and report.json says complete. Exit 0 pass, 1 fail, "
            "2 bad input."
        ),
    )
    p.add_argument("out", type=Path, metavar="OUT",
                   help="output folder holding release/, audit/ and report.json")
    p.add_argument("--k", type=int, default=None,
                   help="required k (default: the k recorded in OUT/report.json)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE",
                   help="also write the verdict as JSON to FILE (keep it outside release/)")
    p.set_defaults(func=_verify)


def _verify(args: argparse.Namespace) -> int:
    from medveil.anonymize.release import AUDIT_NOTE
    from medveil.anonymize.verify import verify_release

    report = verify_release(args.out, k=args.k)
    print(report.table())
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    print(f"note: {AUDIT_NOTE}", file=sys.stderr)
    if report.passed:
        return 0
    for check in report.failed:
        print(f"medveil: check failed: {check.name}: {check.detail}", file=sys.stderr)
    return 1
