"""Screening of client updates before any aggregation.

An update is rejected (:class:`~medveil.errors.UpdateRejected`, logged as a warning, recorded in
the stage metrics, never aggregated) when: the client is unknown, its sample count is not a
positive integer, a backbone/head key is missing or unexpected, a shape or dtype differs from the
server's model, or any value is NaN/Inf.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch

from medveil.errors import UpdateRejected
from medveil.federated.messages import ClientUpdate, StateDict

log = logging.getLogger("medveil.federated")

Spec = dict[str, tuple[tuple[int, ...], torch.dtype]]


@dataclass(frozen=True)
class Rejection:
    client: str
    stage: int
    reason: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def state_spec(state: StateDict) -> Spec:
    """Key -> (shape, dtype) of a state dict: what an update must match."""
    return {k: (tuple(v.shape), v.dtype) for k, v in state.items()}


def _check_state(state: Mapping[str, object], spec: Spec, where: str) -> None:
    if not isinstance(state, Mapping):
        raise UpdateRejected(f"{where}: not a state dict")
    missing = sorted(set(spec) - set(state))
    unexpected = sorted(set(state) - set(spec))
    if missing or unexpected:
        raise UpdateRejected(f"{where}: missing keys {missing[:3]} unexpected keys {unexpected[:3]}")
    for key, (shape, dtype) in spec.items():
        value = state[key]
        if not isinstance(value, torch.Tensor):
            raise UpdateRejected(f"{where}: {key} is {type(value).__name__}, not a tensor")
        if tuple(value.shape) != shape:
            raise UpdateRejected(f"{where}: {key} has shape {tuple(value.shape)}, expected {shape}")
        if value.dtype != dtype:
            raise UpdateRejected(f"{where}: {key} has dtype {value.dtype}, expected {dtype}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise UpdateRejected(f"{where}: {key} contains NaN or Inf")


def check_update(update: ClientUpdate, backbone_spec: Spec, head_spec: Spec | None) -> None:
    """Raise UpdateRejected with a one-line reason if ``update`` must not be aggregated."""
    where = f"client {update.client_name!r} stage {update.stage}"
    if head_spec is None:
        raise UpdateRejected(f"{where}: client has not joined")
    n = update.n_samples
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise UpdateRejected(f"{where}: n_samples must be a positive integer, got {n!r}")
    _check_state(update.backbone, backbone_spec, f"{where} backbone")
    _check_state(update.head, head_spec, f"{where} head")


def screen_updates(
    updates: Sequence[ClientUpdate], backbone_spec: Spec, head_specs: Mapping[str, Spec]
) -> tuple[list[ClientUpdate], list[Rejection]]:
    """Split updates into (accepted, rejections); each rejection is logged as a warning."""
    accepted: list[ClientUpdate] = []
    rejected: list[Rejection] = []
    for update in updates:
        try:
            check_update(update, backbone_spec, head_specs.get(update.client_name))
        except UpdateRejected as err:
            log.warning("update rejected: %s", err)
            rejected.append(Rejection(update.client_name, update.stage, str(err)))
        else:
            accepted.append(update)
    return accepted, rejected
