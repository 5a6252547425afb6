"""User-facing errors: one line that says what is wrong and where.

Raise :class:`MedVeilError` (or a subclass) for any problem caused by the user's input
(missing files, corrupt images, bad labels, bad configs, k > N ...). The CLI prints
``medveil: error: <message>`` and exits with code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations


class MedVeilError(Exception):
    """A problem with the user's input or environment, reported as one line (exit code 2)."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        # Keep it one line whatever the caller passes in.
        super().__init__(" ".join(str(message).split()))


class DataError(MedVeilError):
    """Bad or missing data: files, images, labels, splits."""


class ConfigError(MedVeilError):
    """A config file or option that cannot be honoured."""


class UpdateRejected(MedVeilError):
    """A client update that must not be aggregated (NaN/Inf, wrong shapes, wrong keys)."""


class SiteRefused(MedVeilError):
    """A site declines a stage's work on its own terms (e.g. its privacy budget): the server
    records it absent from that stage with this reason."""


def at(where: str) -> str:
    """``"where: "`` to start an error message with its place, or nothing when it has none."""
    return f"{where}: " if where else ""
