"""Where long work is and where it spends its time: :func:`bar` (progress bars on a terminal,
one line per tenth or per phase in a log file) and :func:`timed` (adds a block's wall seconds to
a named total: a federated stage's phases, an anonymize run's steps)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TextIO


@contextmanager
def timed(totals: dict[str, float], key: str) -> Iterator[None]:
    """Add the wall seconds of the block to ``totals[key]`` (0 when absent), even if it raises."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        totals[key] = totals.get(key, 0.0) + time.perf_counter() - t0


LONG_PHASE = 30.0  # seconds after which an inner phase's bar prints its tenths too


class LogBar:
    """A progress bar for a log file: with no terminal, tqdm would print nothing for minutes, so
    this prints one line ``medveil: DESC: 40% (4/10), 12.3 s`` to stderr after the first step and
    at every 10 % of the work (``leave=False`` bars, the inner phases of a longer job: only when
    they end, or at their tenths once they have run ``LONG_PHASE`` seconds). Supports the
    parts of tqdm's interface MedVeil uses: iteration, ``update``, ``set_postfix``, ``close``,
    context manager."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "",
                 initial: int = 0, leave: bool = True, stream: TextIO | None = None) -> None:
        self.iterable = iterable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.desc, self.n, self.leave = desc, initial, leave
        self.stream = stream if stream is not None else sys.stderr
        self.t0 = time.perf_counter()
        self._shown = -1  # last tenth printed
        self._closed = False
        self.postfix = ""

    def __iter__(self) -> Iterator:
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> LogBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _line(self) -> str:
        done = f"{100 * self.n / self.total:.0f}% ({self.n}/{self.total})" if self.total else f"{self.n}"
        return f"medveil: {self.desc}: {done}, {time.perf_counter() - self.t0:.1f} s{self.postfix}"

    def set_postfix(self, values: dict | None = None, **kw: object) -> None:
        items = {**(values or {}), **kw}
        self.postfix = "".join(f", {k} {v:.4g}" if isinstance(v, float) else f", {k} {v}" for k, v in items.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        # an inner phase (leave=False) speaks at its tenths too once it has run LONG_PHASE seconds
        if self.total and (self.leave or time.perf_counter() - self.t0 >= LONG_PHASE):
            tenth = int(10 * self.n / self.total)
            if tenth > self._shown:
                self._shown = tenth
                print(self._line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.total or self._shown < 10:
            print(self._line() + (" (done)" if not self.total or self.n >= self.total else " (stopped)"),
                  file=self.stream, flush=True)


def bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", initial: int = 0,
        leave: bool = True, disable: bool | None = None, unit: str = "it"):
    """tqdm on a terminal; :class:`LogBar` lines when stderr is not one (a log file, a pipe);
    nothing with ``disable=True``. ``disable=None``: shown (tqdm's meaning of None, "only on a
    terminal", is what left log files silent)."""
    from tqdm.auto import tqdm

    if disable:
        return tqdm(iterable, total=total, desc=desc, initial=initial, leave=leave, disable=True, unit=unit)
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, initial=initial, leave=leave, unit=unit)
    return LogBar(iterable, total=total, desc=desc, initial=initial, leave=leave)
