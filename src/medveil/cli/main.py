"""Entry point of the ``medveil`` command.

Each command group lives in its own module exposing ``register(subparsers)``; the
registered handler is stored as ``func`` on the parsed namespace and returns an exit code.
User errors (:class:`medveil.errors.MedVeilError`) print one line and exit 2; ``--debug``
re-raises them with the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings
from collections.abc import Sequence

from medveil import __version__
from medveil.errors import MedVeilError

# Modules under medveil.cli that contribute commands, in the order --help lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "data_cmd",
    "demo_cmd",
    "model_cmd",
    "anonymize_cmd",
    "federate_cmd",
    "predict_cmd",
    "adapt_cmd",
    "export_cmd",
    "report_cmd",
    "site_cmd",
    "gan_cmd",
    "release_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medveil",
        description=(
            "MedVeil: federated universal medical-imaging models and k-anonymous "
            "synthetic image release."
        ),
    )
    parser.add_argument("--version", action="version", version=f"medveil {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show full tracebacks instead of one-line errors"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"medveil.cli.{name}")
        module.register(subparsers)
    return parser


def _format_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                    line: str | None = None) -> str:
    return f"medveil: warning: {message}\n"


def _setup_messages(debug: bool) -> None:
    """Warnings and log records as ``medveil: warning: ...`` lines (full form with --debug)."""
    if not debug:
        warnings.formatwarning = _format_warning
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="medveil: %(levelname)s: %(message)s" if not debug
                        else "%(asctime)s %(name)s %(levelname)s: %(message)s")
    logging.addLevelName(logging.WARNING, "warning")
    logging.addLevelName(logging.INFO, "info")
    logging.addLevelName(logging.ERROR, "error")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_messages(args.debug)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except MedVeilError as err:
        if args.debug:
            raise
        print(f"medveil: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("medveil: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `medveil data info X | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
