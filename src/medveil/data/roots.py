"""Where a dataset named on the command line lives.

A path that exists is used as it is. A bare name (``bloodmnist``, ``medmnist/bloodmnist.npz``,
``aptos2019``) is looked up under the data root: ``--data-root`` (the ``data_root`` argument)
or else the environment variable ``MEDVEIL_DATA_ROOT``; there it may sit directly or one
folder down, with or without ``.npz``. ``sample:NAME`` names a sample shipped with MedVeil.
"""

from __future__ import annotations

import os
from pathlib import Path

from medveil.errors import DataError

ENV_VAR = "MEDVEIL_DATA_ROOT"
SAMPLE_PREFIX = "sample:"


def data_root(explicit: str | Path | None = None) -> Path | None:
    """The data root in force: ``explicit``, else ``$MEDVEIL_DATA_ROOT``, else None."""
    root = explicit if explicit not in (None, "") else os.environ.get(ENV_VAR) or None
    if root is None:
        return None
    path = Path(root).expanduser()
    if not path.is_dir():
        origin = "--data-root" if explicit not in (None, "") else f"${ENV_VAR}"
        raise DataError(f"{path}: data root ({origin}) is not a folder")
    return path


def resolve_path(name: str | Path, data_root_dir: str | Path | None = None) -> Path:
    """A path to an existing dataset file or folder for ``name`` (see module doc)."""
    text = str(name)
    if text.startswith(SAMPLE_PREFIX):
        from medveil.data.samples import sample_path

        return sample_path(text[len(SAMPLE_PREFIX):])
    path = Path(text).expanduser()
    if path.exists():
        return path
    if path.is_absolute() or text.startswith(("./", "../")):
        raise DataError(f"{path}: no such file or folder")
    root = data_root(data_root_dir)
    if root is None:
        raise DataError(f"{text}: no such file or folder; to look names up in a data folder set "
                        f"{ENV_VAR} or pass --data-root")
    candidates = _candidates(root, text)
    found = next((c for c in candidates if c.exists()), None)
    if found is None:
        raise DataError(f"{text}: not found in data root {root} (nor one folder down, with or "
                        "without .npz)")
    return found


def _candidates(root: Path, name: str) -> list[Path]:
    names = [name] if name.endswith(".npz") else [name, f"{name}.npz"]
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    return [folder / n for folder in [root, *subdirs] for n in names]
