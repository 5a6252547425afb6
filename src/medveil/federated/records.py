"""What a run records of each stage: typed records, one per stage and one per site in it.

``metrics.json`` and every stage checkpoint hold these as JSON (``to_json``; ``from_json`` reads
them back, so a run folder written before these classes existed still resumes). A field that is
``None`` (or an empty optional dict) is left out of the JSON, as the untyped records did.

Stage 0 (``kind = "pretrain"``): ``pool_size``, ``init_checkpoint`` (when one was loaded),
``mim_loss`` (per-epoch mean MAE loss), ``seconds``, ``cpu_seconds``.

Stages 1.. (``kind = "federated"``): ``strategy``, ``schedule``, ``participants`` (sampled, in
config order), ``clients`` (name -> :class:`SiteStageRecord`), ``rejected`` (updates never
aggregated, with the reason), ``absent`` (client -> why it missed the stage), ``curation`` (per
curation: its clients and the curator's own numbers), ``calibration`` (the last stage with
``calibrate_heads``: calibrated / rejected / absent), ``evaluation`` (when its clients evaluated
its universal model: ``pending`` / ``next stage`` / ``own round``, :mod:`.stage_evaluation`),
``evaluate_next`` (while pending: who still owes it), ``seconds``, ``cpu_seconds`` (this
process's CPU time: in-process, the server and every site together) and ``phase_seconds``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from medveil.federated.updates import Rejection

PRETRAIN, FEDERATED = "pretrain", "federated"


@dataclass
class SiteStageRecord:
    """One client in one stage: bytes per message (engine count: the payload's serialized size),
    the transport's own wire count (remote transports), its training metrics (``fit``), the test
    metrics of the stage's universal model (``test``) and, with calibration, of the model it
    received before refitting its head (``test_before_calibration``)."""

    bytes: dict[str, int] = field(default_factory=dict)
    joined_now: bool = False
    fit: dict[str, Any] | None = None
    wire_bytes: dict[str, int] = field(default_factory=dict)
    test: dict[str, Any] | None = None
    test_before_calibration: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"bytes": dict(self.bytes)}
        if self.joined_now:
            out["joined_now"] = True
        for key in ("fit", "wire_bytes", "test_before_calibration", "test"):  # the order they are made in
            value = getattr(self, key)
            if value:
                out[key] = dict(value)
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SiteStageRecord:
        return cls(bytes=dict(d.get("bytes", {})), joined_now=bool(d.get("joined_now", False)),
                   fit=d.get("fit"), wire_bytes=dict(d.get("wire_bytes", {})), test=d.get("test"),
                   test_before_calibration=d.get("test_before_calibration"))


@dataclass
class StageRecord:
    """One stage of a run (see the module docstring for the fields of each kind)."""

    stage: int
    kind: str = FEDERATED
    # stage 0
    pool_size: int | None = None
    init_checkpoint: dict[str, Any] | None = None
    mim_loss: list[float] | None = None
    # federated stages
    strategy: str | None = None
    schedule: str | None = None
    participants: list[str] = field(default_factory=list)
    clients: dict[str, SiteStageRecord] = field(default_factory=dict)
    rejected: list[Rejection] = field(default_factory=list)
    absent: dict[str, str] = field(default_factory=dict)
    curation: list[dict[str, Any]] = field(default_factory=list)
    calibration: dict[str, Any] | None = None
    evaluation: str | None = None
    evaluate_next: list[str] | None = None
    seconds: float | None = None
    cpu_seconds: float | None = None  # this process's CPU time (in-process: server and every site)
    phase_seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def pretraining(cls, pool_size: int) -> StageRecord:
        return cls(stage=0, kind=PRETRAIN, pool_size=pool_size)

    @classmethod
    def federated(cls, stage: int, strategy: str, schedule: str, participants: list[str]) -> StageRecord:
        return cls(stage=stage, kind=FEDERATED, strategy=strategy, schedule=schedule,
                   participants=list(participants),
                   phase_seconds={"fit": 0.0, "curate": 0.0, "evaluate": 0.0})

    def site(self, name: str) -> SiteStageRecord:
        """This stage's record of client ``name`` (created empty on first use)."""
        return self.clients.setdefault(name, SiteStageRecord())

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"stage": self.stage, "kind": self.kind}
        if self.kind == PRETRAIN:
            out["pool_size"] = self.pool_size
            if self.init_checkpoint is not None:
                out["init_checkpoint"] = self.init_checkpoint
            out["mim_loss"] = list(self.mim_loss or [])
            out["seconds"] = self.seconds
            if self.cpu_seconds is not None:
                out["cpu_seconds"] = self.cpu_seconds
            return out
        out.update({"strategy": self.strategy, "schedule": self.schedule,
                    "participants": list(self.participants),
                    "clients": {n: c.to_json() for n, c in self.clients.items()},
                    "rejected": [r.to_dict() for r in self.rejected],
                    "absent": [{"client": n, "reason": r} for n, r in self.absent.items()],
                    "curation": list(self.curation)})
        if self.calibration is not None:
            out["calibration"] = self.calibration
        if self.evaluation is not None:
            out["evaluation"] = self.evaluation
        if self.evaluate_next is not None:
            out["evaluate_next"] = list(self.evaluate_next)
        out["seconds"] = self.seconds
        if self.cpu_seconds is not None:
            out["cpu_seconds"] = self.cpu_seconds
        out["phase_seconds"] = dict(self.phase_seconds)
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StageRecord:
        if d.get("kind") == PRETRAIN:
            return cls(stage=int(d["stage"]), kind=PRETRAIN, pool_size=d.get("pool_size"),
                       init_checkpoint=d.get("init_checkpoint"), mim_loss=list(d.get("mim_loss", [])),
                       seconds=d.get("seconds"), cpu_seconds=d.get("cpu_seconds"))
        return cls(
            stage=int(d["stage"]), kind=str(d.get("kind", FEDERATED)), strategy=d.get("strategy"),
            schedule=d.get("schedule"), participants=list(d.get("participants", [])),
            clients={n: SiteStageRecord.from_json(c) for n, c in d.get("clients", {}).items()},
            rejected=[Rejection(str(r["client"]), int(r["stage"]), str(r["reason"]))
                      for r in d.get("rejected", [])],
            absent={str(a["client"]): str(a["reason"]) for a in d.get("absent", [])},
            curation=list(d.get("curation", [])), calibration=d.get("calibration"),
            evaluation=d.get("evaluation"), evaluate_next=d.get("evaluate_next"), seconds=d.get("seconds"),
            cpu_seconds=d.get("cpu_seconds"), phase_seconds=dict(d.get("phase_seconds", {})))


def stages_to_json(stages: list[StageRecord]) -> list[dict[str, Any]]:
    return [s.to_json() for s in stages]


def stages_from_json(stages: list[dict[str, Any]]) -> list[StageRecord]:
    return [StageRecord.from_json(s) for s in stages]
