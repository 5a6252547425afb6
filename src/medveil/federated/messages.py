"""What crosses between clients and the server: plain dataclasses of tensors, ints and strings,
free of any transport (the in-process engine passes them directly; a Flower app converts
``to_payload`` dicts of numpy arrays into its own records).

- :class:`JoinRequest`  client -> server: its name, number of classes (and, optionally, task
  type and class names for the task registry). Nothing about its images.
- :class:`FitInstructions` server -> client: the current base backbone plus that client's head
  (a fresh random head on joining: the join reply); for a head refit under DP also the public
  feature basis of the server's pool (:mod:`.feature_basis`).
- :class:`ClientUpdate` client -> server: fine-tuned backbone + head, sample count, metrics.
- :class:`EvalReport` client -> server: metrics of the universal model on its own test split.

``message_nbytes`` is the serialized size (``torch.save`` of the payload), which the engine
records as bytes sent / received per client per stage.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class JoinRequest:
    client_name: str
    num_classes: int
    task: str = "multi-class"
    class_names: tuple[str, ...] | None = None


@dataclass
class FitInstructions:
    """The join reply and every later stage's instructions: base backbone + this client's head
    (+ ``features``: the pool's feature basis for a head refit under DP, else empty)."""

    client_name: str
    stage: int
    model_config: dict[str, Any]
    backbone: StateDict
    head: StateDict
    features: StateDict = field(default_factory=dict)


JoinReply = FitInstructions


@dataclass
class ClientUpdate:
    client_name: str
    stage: int
    backbone: StateDict
    head: StateDict
    n_samples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class EvalReport:
    client_name: str
    stage: int
    n_samples: int
    metrics: dict[str, float] = field(default_factory=dict)


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def to_payload(message: Any) -> dict[str, Any]:
    """A message as a plain dict: tensors become numpy arrays, tuples become lists (an empty
    ``features`` basis is left out: instructions without one are what they were before it existed)."""
    return {f.name: _plain(getattr(message, f.name)) for f in fields(message)
            if not (f.name == "features" and not getattr(message, f.name))}


def message_nbytes(message: Any) -> int:
    """Serialized size in bytes of one message's payload."""
    buf = io.BytesIO()
    torch.save(to_payload(message), buf, pickle_protocol=4)  # protocol 2 bloats numpy bytes ~1.5x
    return buf.getbuffer().nbytes


def state_from_numpy(state: dict[str, np.ndarray]) -> StateDict:
    """Inverse of the payload conversion for a state dict."""
    return {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}
