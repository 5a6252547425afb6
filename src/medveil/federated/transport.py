"""How the engine reaches its clients: the one seam between the stage logic (engine.run_stage:
join, screening, curation, evaluation, checkpoints) and the wire.

- :class:`LocalTransport`: clients are in-process ``ClientData`` objects; calls
  ``client.local_fit`` / ``client.local_evaluate`` directly (the default engine).
- ``medveil.federated.flower.transport.FlowerTransport``: the same calls as Flower messages to
  SuperNodes (one per hospital), with a stage timeout.

A round returns an :class:`Exchange`: the replies that came back, the clients that did not reply
(``absent``: disconnected, killed, timed out, or their ClientApp failed: they miss this stage and
may come back next stage) and malformed replies (``rejected``, never aggregated).

A training job may ask the client to evaluate the model it received before training on it
(``FitJob.evaluate``: the previous stage's universal model, see :mod:`.stage_evaluation`); its
report comes back in ``Exchange.evaluations``, in the same round.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from medveil.federated.calibration import local_calibrate
from medveil.federated.client import join_request, local_evaluate, local_fit
from medveil.federated.messages import (
    ClientUpdate,
    EvalReport,
    FitInstructions,
    JoinRequest,
)
from medveil.federated.sites import ClientData
from medveil.federated.training import TrainRecipe
from medveil.federated.updates import Rejection

T = TypeVar("T")


@dataclass
class FitJob:
    """What one client trains from, with its seed (derived from (seed, stage, client))."""

    instructions: FitInstructions
    seed: int
    evaluate: bool = False  # first report the received model's test metrics (same message)
    calibrate: bool = False  # refit only the head on the received backbone (:mod:`.calibration`)


@dataclass
class Exchange(Generic[T]):
    replies: dict[str, T] = field(default_factory=dict)
    absent: dict[str, str] = field(default_factory=dict)          # client -> why no reply
    rejected: list[Rejection] = field(default_factory=list)       # malformed replies
    wire_bytes: dict[str, dict[str, int]] = field(default_factory=dict)  # transport's own count
    evaluations: dict[str, EvalReport] = field(default_factory=dict)    # FitJob.evaluate reports


class Transport(Protocol):
    def available(self, stage: int) -> list[str]:
        """Names of the clients reachable now (a subset of the configured ones, config order)."""

    def join_request(self, name: str) -> JoinRequest:
        """The client's join request (name, class count, task, class names)."""

    def fit(self, jobs: list[FitJob], recipe: TrainRecipe, stage: int) -> Exchange[ClientUpdate]:
        """Local fine-tuning on every job's client (concurrently where the transport can), after
        evaluating the received model where the job asks for it."""

    def evaluate(self, instructions: list[FitInstructions], stage: int) -> Exchange[EvalReport]:
        """Each client's metrics of the universal model on its own test split."""


class LocalTransport:
    """Clients held in this process (the in-process engine)."""

    def __init__(self, clients: list[ClientData], client_fit=local_fit, device: str = "cpu") -> None:
        self.by_name = {c.name: c for c in clients}
        self.client_fit = client_fit
        self.device = device

    def available(self, stage: int) -> list[str]:
        return list(self.by_name)

    def join_request(self, name: str) -> JoinRequest:
        return join_request(self.by_name[name])

    def fit(self, jobs: list[FitJob], recipe: TrainRecipe, stage: int) -> Exchange[ClientUpdate]:
        out: Exchange[ClientUpdate] = Exchange()
        for job in jobs:
            name = job.instructions.client_name
            if job.evaluate:
                out.evaluations[name] = local_evaluate(self.by_name[name], job.instructions, device=self.device)
            fit = local_calibrate if job.calibrate else self.client_fit
            out.replies[name] = fit(self.by_name[name], job.instructions, recipe, job.seed, device=self.device)
        return out

    def evaluate(self, instructions: list[FitInstructions], stage: int) -> Exchange[EvalReport]:
        return Exchange(replies={ins.client_name: local_evaluate(self.by_name[ins.client_name], ins,
                                                                 device=self.device)
                                 for ins in instructions})
