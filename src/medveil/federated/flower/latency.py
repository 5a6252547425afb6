"""Waits that flwr (1.41, 1.42) hard-codes for slow wide-area links, shortened for MedVeil's
processes.

- An idle SuperNode asks the SuperLink for work every 3 s, and checks for its ClientApp's reply
  every 0.5 s (``start_client_internal``): :func:`fast_supernode_poll` makes these
  ``POLL_SECONDS`` and ``REPLY_POLL_SECONDS`` (used by ``site_node``).
- A process that pulls a message's objects (the ClientApp from its SuperNode, the SuperNode from
  the SuperLink, the ServerApp for replies) may find a message whose objects are still on their
  way (the task exists before its payload arrives) and then backs off 1 s, 2 s, 4 s ... up to 10 s
  (``inflatable_utils``). Once a ClientApp starts in a fraction of a second instead of ~4 s, it
  always lands in that gap. :func:`fast_object_pulls` retries after 0.05 s, doubling up to 0.2 s,
  still giving up only after Flower's own 2 h limit.

Both change module-level defaults of the pinned flwr version (``flwr==1.42.0``; the same knobs
as 1.41) in the calling process only; if flwr's internals move, they do nothing (the waits stay
Flower's).
"""

from __future__ import annotations

import time
from collections.abc import Callable

POLL_SECONDS = 0.25                # SuperNode idle poll of the SuperLink (flwr: 3 s)
REPLY_POLL_SECONDS = 0.05          # SuperNode waiting for its ClientApp's reply, a local check (0.5 s)
PULL_BACKOFF = (0.05, 0.2)         # first retry, cap (flwr: 1 s, 10 s)


def fast_object_pulls() -> bool:
    """Shorter retry back-off for object pulls in this process; False if flwr has no such knob."""
    try:
        from flwr.supercore.inflatable import inflatable_utils as objects
    except ImportError:
        return False
    changed = False
    for fn in (getattr(objects, "pull_objects", None), getattr(objects, "pull_and_inflate_object_from_tree", None)):
        defaults = getattr(fn, "__kwdefaults__", None)
        if defaults and {"initial_backoff", "backoff_cap", "max_tries_per_object"} <= set(defaults):
            defaults.update(initial_backoff=PULL_BACKOFF[0], backoff_cap=PULL_BACKOFF[1],
                            max_tries_per_object=None)  # max_time (2 h) stays the limit
            changed = True
    return changed


class Clock:
    """``time`` as one Flower module sees it (``module.time = Clock(sleep)``), ``sleep`` replaced."""

    def __init__(self, sleep: Callable[[float], None]) -> None:
        self.sleep = sleep

    def __getattr__(self, name: str):
        return getattr(time, name)


def _supernode_sleep(seconds: float) -> None:
    time.sleep(POLL_SECONDS if seconds >= 1.0 else min(seconds, REPLY_POLL_SECONDS))


def fast_supernode_poll() -> bool:
    """The SuperNode loop's waits in this process: its 3 s idle poll -> POLL_SECONDS, its 0.5 s
    local checks -> REPLY_POLL_SECONDS."""
    try:
        import flwr.supernode.start_client_internal as node_loop
    except ImportError:
        return False
    if getattr(node_loop, "time", None) is not time:
        return False
    node_loop.time = Clock(_supernode_sleep)
    return True
