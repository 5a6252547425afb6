"""How the engine reaches its clients: the one seam between the stage logic
(:mod:`medveil.federated.stages`: join, screening, curation, evaluation) and the wire.

- :class:`LocalTransport`: clients are in-process ``ClientData`` objects; every job is
  :func:`medveil.federated.client.serve` called directly (the default engine).
- ``medveil.federated.flower.transport.FlowerTransport``: the same jobs as Flower messages to
  SuperNodes (one per hospital), whose ClientApp calls the same ``serve``, with a stage timeout.

A round returns an :class:`Exchange`: the replies that came back, the clients that did not reply
(``absent``: disconnected, killed, timed out, or their ClientApp failed: they miss this stage and
may come back next stage) and malformed replies (``rejected``, never aggregated).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from medveil.errors import SiteRefused
from medveil.federated.client import ClientJob, ClientReply, LocalFit, join_request, local_fit, serve
from medveil.federated.messages import JoinRequest
from medveil.federated.sites import ClientData
from medveil.federated.updates import Rejection


@dataclass
class Exchange:
    replies: dict[str, ClientReply] = field(default_factory=dict)
    absent: dict[str, str] = field(default_factory=dict)          # client -> why no reply
    rejected: list[Rejection] = field(default_factory=list)       # malformed replies
    wire_bytes: dict[str, dict[str, int]] = field(default_factory=dict)  # transport's own count


class Transport(Protocol):
    def available(self, stage: int) -> list[str]:
        """Names of the clients reachable now (a subset of the configured ones, config order)."""

    def join_request(self, name: str) -> JoinRequest:
        """The client's join request (name, class count, task, class names)."""

    def exchange(self, jobs: list[ClientJob], stage: int) -> Exchange:
        """Every job done by its client (concurrently where the transport can)."""


class LocalTransport:
    """Clients held in this process (the in-process engine)."""

    def __init__(self, clients: list[ClientData], client_fit: LocalFit = local_fit, device: str = "cpu") -> None:
        self.by_name = {c.name: c for c in clients}
        self.client_fit = client_fit
        self.device = device

    def available(self, stage: int) -> list[str]:
        return list(self.by_name)

    def join_request(self, name: str) -> JoinRequest:
        return join_request(self.by_name[name])

    def exchange(self, jobs: list[ClientJob], stage: int) -> Exchange:
        out = Exchange()
        for job in jobs:
            try:
                out.replies[job.client_name] = serve(self.by_name[job.client_name], job, self.device,
                                                     self.client_fit)
            except SiteRefused as err:  # the site's own decision (privacy budget): absent, with why
                out.absent[job.client_name] = f"site refused: {err}"
        return out
