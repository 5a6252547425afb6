"""Label values from a table (strings) -> class indices 0..K-1, class names and task.

Rules, in order:
- ``classes`` given: a value equal to a class name maps to that name's index; otherwise an
  integer value is taken as the index itself. Anything else is an error naming the row.
- no ``classes``: integer labels 0..max keep their value as index (names "0", "1", ...), so a
  grade 3 stays class 3 even in a subset without grade 2; other labels (strings, or integers
  not starting at 0) are sorted and numbered in that order.
- task: the ``task`` argument; else binary for 2 classes, multi-class otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from medveil.data.dataset import Task
from medveil.errors import ConfigError, DataError

_TASK_ALIASES = {
    "multiclass": Task.MULTICLASS, "multi-class": Task.MULTICLASS, "multi_class": Task.MULTICLASS,
    "binary": Task.BINARY, "ordinal": Task.ORDINAL,
}


def parse_task(task: str | Task | None) -> Task | None:
    """'ordinal' / 'binary' / 'multi-class' (or a Task) -> Task; None stays None."""
    if task is None or isinstance(task, Task):
        return task
    try:
        return _TASK_ALIASES[str(task).strip().lower()]
    except KeyError:
        raise ConfigError(
            f"unknown task {task!r} for an image folder (use multi-class, binary or ordinal)"
        ) from None


def _as_int(value: str) -> int | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return int(number) if number.is_integer() else None


def encode_labels(
    values: Sequence[str],
    where: Callable[[int], str],
    classes: Sequence[str] | None = None,
    task: str | Task | None = None,
) -> tuple[np.ndarray, list[str], Task]:
    """values: one label string per row; where(i): "file row r (id x)" for error messages.

    Returns (labels int64 (N,), class names, task).
    """
    values = [v.strip() for v in values]
    for i, v in enumerate(values):
        if not v:
            raise DataError(f"{where(i)}: empty label")
    ints = [_as_int(v) for v in values]
    all_int = all(n is not None for n in ints)

    if classes is not None:
        names = [str(c) for c in classes]
        if len(set(names)) != len(names):
            raise ConfigError(f"duplicate class names in {names}")
        index = {name: k for k, name in enumerate(names)}
        labels = np.empty(len(values), dtype=np.int64)
        for i, (v, n) in enumerate(zip(values, ints)):
            if v in index:
                labels[i] = index[v]
            elif n is not None and 0 <= n < len(names):
                labels[i] = n
            else:
                raise DataError(f"{where(i)}: label {v!r} is outside the {len(names)} declared "
                                f"classes ({', '.join(names)})")
    elif all_int and min(ints) == 0:
        labels = np.asarray(ints, dtype=np.int64)
        names = [str(k) for k in range(int(labels.max()) + 1)]
    else:
        uniq = sorted(set(ints)) if all_int else sorted(set(values))
        index = {v: k for k, v in enumerate(uniq)}
        labels = np.asarray([index[n] for n in (ints if all_int else values)], dtype=np.int64)
        names = [str(v) for v in uniq]

    resolved = parse_task(task) or (Task.BINARY if len(names) == 2 else Task.MULTICLASS)
    if resolved is Task.BINARY and len(names) != 2:
        raise ConfigError(f"task binary needs 2 classes, the labels give {len(names)}")
    return labels, names, resolved
