"""When the clients evaluate a stage's universal model: in the next stage's training round.

After stage s's curation the universal model is what stage s+1 sends out for training, so a
client evaluates it on its test split right before training on it (``ClientJob.evaluate_first``:
same message, same round) instead of in a round of its own: one message round per stage instead of
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

from medveil.federated.messages import EvalReport, FitInstructions, message_nbytes
from medveil.federated.records import StageRecord

log = logging.getLogger("medveil.federated")
PENDING, NEXT_STAGE, OWN_ROUND = "pending", "next stage", "own round"


def due(record: StageRecord) -> list[str]:
    """Clients that still owe this stage record their evaluation."""
    return list(record.evaluate_next or []) if record.evaluation == PENDING else []


def mark_pending(record: StageRecord, clients: list[str]) -> None:
    record.evaluation = PENDING
    record.evaluate_next = list(clients)


def record_reports(record: StageRecord, sent: list[FitInstructions], reports: dict[str, EvalReport],
                   missing: dict[str, str], fused: bool = False) -> None:
    """Fill ``record``'s clients' ``test`` metrics and bytes from ``reports`` (answers to ``sent``);
    a due client without a report is added to the record's absent clients with its reason."""
    for ins in sent:
        info = record.site(ins.client_name)
        if not fused:  # a fused evaluation came with the training message: nothing more sent down
            info.bytes["eval_down"] = message_nbytes(ins)
        report = reports.get(ins.client_name)
        if report is not None:
            info.bytes["eval_up"] = message_nbytes(report)
            info.test = report.metrics
    for name, reason in missing.items():
        log.warning("client %r did not evaluate stage %d: %s", name, record.stage, reason)
        record.absent.setdefault(name, f"{reason} (evaluation)")


def finish(record: StageRecord, how: str) -> None:
    record.evaluation = how
    record.evaluate_next = None
