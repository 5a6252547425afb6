"""When the clients evaluate a stage's universal model: in the next stage's training round.

After stage s's curation the universal model is what stage s+1 sends out for training, so a
client evaluates it on its test split right before training on it (``FitJob.evaluate``: same
message, same round) instead of in a round of its own: one message round per stage instead of
two (over Flower each round costs seconds of fixed latency). Stage s's record is then
``"evaluation": "pending"`` until stage s+1 fills its clients' ``test`` metrics in
(``"evaluation": "next stage"``). Clients due for evaluation but not training first in stage s+1
(not sampled, or later in a sequential schedule) get an evaluation-only round; the run's last
stage is evaluated in its own round (``"evaluation": "own round"``). A run stopped after stage s
(killed, or ``max_stages``) leaves stage s pending in its checkpoint and its resumption evaluates
it exactly as the uninterrupted run does, so both give the same metrics.

Due for evaluation: the clients in the task registry that were present in the stage and did not
miss it. Due clients that are gone by the next stage are recorded absent in the evaluated stage.
"""

from __future__ import annotations

import logging
from typing import Any

from medveil.federated.messages import EvalReport, FitInstructions, message_nbytes

log = logging.getLogger("medveil.federated")
PENDING, NEXT_STAGE, OWN_ROUND = "pending", "next stage", "own round"


def due(record: dict[str, Any]) -> list[str]:
    """Clients that still owe this stage record their evaluation."""
    return list(record.get("evaluate_next", [])) if record.get("evaluation") == PENDING else []


def mark_pending(record: dict[str, Any], clients: list[str]) -> None:
    record["evaluation"] = PENDING
    record["evaluate_next"] = clients


def record_reports(record: dict[str, Any], sent: list[FitInstructions], reports: dict[str, EvalReport],
                   missing: dict[str, str], fused: bool = False) -> None:
    """Fill ``record``'s clients' ``test`` metrics and bytes from ``reports`` (answers to ``sent``);
    a due client without a report is added to the record's absent list with its reason."""
    absent = record.setdefault("absent", [])
    for ins in sent:
        name = ins.client_name
        info = record["clients"].setdefault(name, {"bytes": {}})
        if not fused:  # a fused evaluation came with the training message: nothing more sent down
            info["bytes"]["eval_down"] = message_nbytes(ins)
        report = reports.get(name)
        if report is not None:
            info["bytes"]["eval_up"] = message_nbytes(report)
            info["test"] = report.metrics
    for name, reason in missing.items():
        log.warning("client %r did not evaluate stage %d: %s", name, record["stage"], reason)
        if name not in {a["client"] for a in absent}:
            absent.append({"client": name, "reason": f"{reason} (evaluation)"})


def finish(record: dict[str, Any], how: str) -> None:
    record["evaluation"] = how
    record.pop("evaluate_next", None)
