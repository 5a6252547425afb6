"""The stages of a federation: stage 0 (server MIM pretraining), then ``rounds`` stages of
join -> local fine-tuning -> screening -> curation -> evaluation (with ``[federation]
calibrate_heads``, the last stage adds a round in which the clients refit their heads on the
final backbone: :func:`calibration_round`). A stage's evaluation happens in the next stage's
training round (the clients evaluate the model they receive before training on it;
:mod:`.stage_evaluation`), the last stage's in a round of its own.

Clients and server only exchange the messages of :mod:`medveil.federated.messages`, through a
:class:`~medveil.federated.transport.Transport`: in-process calls by default, Flower messages to
remote sites with ``medveil.federated.flower`` (same stage logic, same seeds). Each stage's
randomness comes from seeds derived from (seed, stage, client), so a run killed after stage s and
resumed from its checkpoint gives the same numbers as an uninterrupted run. The run folder
around the stages (checkpoints, resume, final model) is :mod:`medveil.federated.engine`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medveil.errors import MedVeilError
from medveil.federated import stage_evaluation
from medveil.federated.client import CALIBRATE, EVALUATE, FIT, ClientJob, LocalFit, local_fit
from medveil.federated.config import FederationConfig
from medveil.federated.curation import Curator, make_curator
from medveil.federated.feature_basis import pool_feature_basis
from medveil.federated.messages import ClientUpdate, EvalReport, FitInstructions, message_nbytes
from medveil.federated.records import StageRecord
from medveil.federated.server import Server
from medveil.federated.sites import ClientData, build_sites, load_pool, pool_groups
from medveil.federated.training import derive_seed
from medveil.federated.transport import Exchange, LocalTransport, Transport
from medveil.federated.updates import Rejection, screen_updates
from medveil.progress import timed
from medveil.progress import bar as progress_bar

log = logging.getLogger("medveil.federated")


@dataclass
class Federation:
    """Everything one run works on: config, clients' private data (in-process only; empty when
    the clients are remote), the server, the curator, and the transport to the clients."""

    cfg: FederationConfig
    clients: list[ClientData]
    server: Server
    curator: Curator
    client_fit: LocalFit = local_fit
    transport: Transport | None = None
    # the accepted updates of the stage being run (what the server saw; kept for `medveil audit`)
    received: dict[str, ClientUpdate] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.transport is None:
            self.transport = LocalTransport(self.clients, self.client_fit, self.cfg.device)

    @property
    def schedule(self) -> str:
        return self.cfg.federation.resolved_schedule()

    @property
    def client_names(self) -> list[str]:
        """The configured clients, in config order."""
        return [spec.name for spec in self.cfg.clients]


def remote_pool(cfg: FederationConfig) -> torch.Tensor:
    """The server pool when the clients are remote: only ``[data] pool_path`` (the server's own
    unlabelled images), never a client's dataset; empty without it."""
    if cfg.data.pool_path:
        return load_pool(Path(cfg.data.pool_path), cfg.model.img_size, cfg.model.in_chans,
                         cfg.data.max_pool, cfg.seed)
    return torch.empty(0, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size)


def prepare(cfg: FederationConfig, client_fit: LocalFit = local_fit,
            transport: Transport | None = None) -> Federation:
    """Build the server and the curator. In-process (``transport=None``): load the clients' data
    and the server pool; with a remote transport the server opens only its own pool."""
    curator = make_curator(cfg.federation.strategy, cfg.curation)
    if transport is None:
        clients, pool = build_sites(cfg.clients, cfg.data, cfg.model.img_size, cfg.model.in_chans, cfg.seed)
    else:
        clients, pool = [], remote_pool(cfg)
    device = torch.device(cfg.device)
    server = Server(cfg.model, pool.to(device) if device.type != "cpu" else pool,
                    seed=derive_seed(cfg.seed, "init"))
    server.pool_groups = pool_groups(clients, pool)
    server.pool_sources = [c.name for c in clients] if server.pool_groups is not None else []
    by_source = [k for k, on in (("pool_balance", cfg.curation.pool_balance),
                                 ("own_source_weight", cfg.curation.own_source_weight != 1.0)) if on]
    if by_source and server.pool_groups is None:  # said once per run, not per stage
        log.warning(f"[curation] {' and '.join(by_source)}: the pool's sources are unknown (a pool_path "
                    f"pool), so every image weighs the same")
    server.model.to(device)
    return Federation(cfg, clients, server, curator, client_fit, transport)


def run_pretraining(fed: Federation, progress: bool = True) -> StageRecord:
    """Stage 0: optional MAE/MedMAE checkpoint, then MIM pretraining on the pool."""
    t0, c0 = time.time(), time.process_time()
    record = StageRecord.pretraining(len(fed.server.pool))
    if fed.cfg.init_checkpoint:
        from medveil.models.checkpoint import load_vit_checkpoint

        report = load_vit_checkpoint(fed.cfg.init_checkpoint, fed.server.model)
        record.init_checkpoint = {"path": report.path, "notes": report.notes}
    result = fed.server.pretrain(fed.cfg.pretrain, derive_seed(fed.cfg.seed, 0, "pretrain"), progress)
    record.mim_loss = list(result["mim_loss"])
    record.seconds, record.cpu_seconds = time.time() - t0, time.process_time() - c0
    return record


def sample_participants(fed: Federation, stage: int, present: list[str] | None = None) -> list[str]:
    """ceil(fraction * K) of the K present clients (at least one; all configured clients by
    default), seeded by (seed, stage), in config order."""
    present_set = set(fed.client_names if present is None else present)
    names = [n for n in fed.client_names if n in present_set]
    k = len(names)
    if k == 0:
        return []
    m = max(1, min(k, math.ceil(fed.cfg.federation.client_fraction * k - 1e-9)))
    rng = np.random.default_rng(derive_seed(fed.cfg.seed, stage, "sample"))
    chosen = set(rng.choice(k, size=m, replace=False).tolist())
    return [n for i, n in enumerate(names) if i in chosen]


def _merge_wire(record: StageRecord, wire: dict[str, dict[str, int]], prefix: str = "") -> None:
    for name, counts in wire.items():
        record.site(name).wire_bytes.update({f"{prefix}{k}": v for k, v in counts.items()})


def _instructions(fed: Federation, record: StageRecord, name: str) -> FitInstructions:
    """Join (first time: the client's class count in, a fresh head out) or the current model."""
    server, stage = fed.server, record.stage
    if name in server.registry:
        return server.instructions(name, stage)
    request = fed.transport.join_request(name)
    record.site(name).bytes["join_up"] = message_nbytes(request)
    record.site(name).joined_now = True
    return server.join(request, stage, derive_seed(fed.cfg.seed, stage, name, "head"))


def _evaluate_owed_alone(fed: Federation, record: StageRecord, previous: StageRecord, owed: list[str],
                         fused: set[str], present: list[str]) -> None:
    """The previous stage's evaluation for the clients that owe it but do not train first in this
    stage: an evaluation-only round (absent ones recorded absent in the previous stage)."""
    alone = [fed.server.instructions(n, previous.stage) for n in owed if n not in fused and n in present]
    with timed(record.phase_seconds, "evaluate"):
        reports = fed.transport.exchange([ClientJob(i, EVALUATE) for i in alone], previous.stage) \
            if alone else Exchange()
    _merge_wire(previous, reports.wire_bytes)
    stage_evaluation.record_reports(previous, alone, _reports(reports),
                                    {**{n: "not connected" for n in owed if n not in present},
                                     **reports.absent})


def _reports(exchange: Exchange) -> dict[str, EvalReport]:
    return {n: r.report for n, r in exchange.replies.items() if r.report is not None}


def _train_group(fed: Federation, record: StageRecord, gi: int, group: list[str],
                 previous: StageRecord | None, fused: set[str], progress: bool) -> None:
    """One curation of a stage: the group's clients train (those in ``fused`` first report the
    previous stage's model), their updates are screened and curated into the universal model."""
    server, stage, seed = fed.server, record.stage, fed.cfg.seed
    jobs = []
    for name in group:
        info = record.site(name)
        try:
            ins = _instructions(fed, record, name)
        except MedVeilError as err:  # e.g. a known client rejoining with another class count
            log.warning("join refused: %s", err)
            record.rejected.append(Rejection(name, stage, str(err)))
            continue
        info.bytes["fit_down"] = message_nbytes(ins)
        jobs.append(ClientJob(ins, FIT, derive_seed(seed, stage, name, "fit"), fed.cfg.local,
                              evaluate_first=gi == 0 and name in fused))
    with timed(record.phase_seconds, "fit"):
        result = fed.transport.exchange(jobs, stage)
    if previous is not None and fused and gi == 0:
        asked = [j.instructions for j in jobs if j.evaluate_first]
        reports = _reports(result)
        stage_evaluation.record_reports(
            previous, asked, reports,
            {i.client_name: result.absent.get(i.client_name, "no evaluation in its reply")
             for i in asked if i.client_name not in reports}, fused=True)
    updates = [result.replies[j.client_name].update for j in jobs if j.client_name in result.replies]
    for update in updates:
        info = record.site(update.client_name)
        info.bytes["fit_up"] = message_nbytes(update)
        info.fit = {**update.metrics, "n_samples": update.n_samples}
    _merge_wire(record, result.wire_bytes)
    record.absent.update(result.absent)
    record.rejected += result.rejected
    accepted, rejections = screen_updates(updates, server.backbone_spec(), server.head_specs())
    record.rejected += rejections
    with timed(record.phase_seconds, "curate"):
        curated = fed.curator.curate(server, accepted, derive_seed(seed, stage, gi, "curate"), progress)
    record.curation.append({"clients": [u.client_name for u in accepted], **curated})
    fed.received.update({u.client_name: u for u in accepted})


def calibration_round(fed: Federation, record: StageRecord, names: list[str]) -> None:
    """Ask ``names`` to report on and then recalibrate their heads on the current universal model
    (:mod:`.calibration`); set the accepted heads (screened like any update: unknown client, wrong
    shape, NaN/Inf rejected, the previous head kept). Fills ``record.calibration`` (calibrated,
    rejected, absent) and the clients' ``test_before_calibration``."""
    server, stage, privacy = fed.server, record.stage, fed.cfg.privacy
    jobs = [ClientJob(server.instructions(n, stage), CALIBRATE, derive_seed(fed.cfg.seed, stage, n, "calibrate"),
                      fed.cfg.local, evaluate_first=True) for n in names]
    basis: dict = {}
    if privacy.dp:  # DP-SGD refits the heads in the pool's public feature basis
        basis = pool_feature_basis(server.model, server.pool, privacy.calibration_dims, fed.cfg.seed)
        for job in jobs:
            job.instructions.features = basis
    for job in jobs:
        record.site(job.client_name).bytes["calibrate_down"] = message_nbytes(job.instructions)
    result = fed.transport.exchange(jobs, stage)
    _merge_wire(record, result.wire_bytes, prefix="calibrate_")
    for name, report in _reports(result).items():
        record.site(name).test_before_calibration = report.metrics
    updates = [result.replies[n].update for n in names if n in result.replies]  # in config order
    for u in updates:
        record.site(u.client_name).bytes["calibrate_up"] = message_nbytes(u)
    accepted, rejections = screen_updates(updates, {}, server.head_specs())  # head only: no backbone keys
    for u in accepted:
        server.set_head(u.client_name, u.head)
    record.calibration = {"calibrated": [u.client_name for u in accepted],
                          "rejected": [r.to_dict() for r in [*result.rejected, *rejections]],
                          "absent": [{"client": n, "reason": r} for n, r in result.absent.items()]}
    if privacy.dp:  # the public parameters of each head refit's release (its site's ledger), and its basis
        record.calibration["dp"] = {u.client_name: dict(u.metrics) for u in updates if "epsilon" in u.metrics}
        record.calibration["basis_dims"] = int(basis["basis"].shape[1]) if basis else 0
    record.rejected += [*result.rejected, *rejections]  # counted with the stage's rejections


def _evaluate_own_round(fed: Federation, record: StageRecord, names: list[str]) -> None:
    """The run's last stage: its clients evaluate the final universal model in a round of its own."""
    eval_ins = [fed.server.instructions(n, record.stage) for n in names]
    with timed(record.phase_seconds, "evaluate"):
        reports = fed.transport.exchange([ClientJob(i, EVALUATE) for i in eval_ins], record.stage)
    _merge_wire(record, reports.wire_bytes)
    stage_evaluation.record_reports(record, eval_ins, _reports(reports), reports.absent)
    stage_evaluation.finish(record, stage_evaluation.OWN_ROUND)


def run_stage(fed: Federation, stage: int, progress: bool = True, previous: StageRecord | None = None,
              last: bool = True) -> StageRecord:
    """One federated stage; returns its record (:mod:`.records`).

    Clients that do not answer (``absent``: disconnected, timed out) miss this stage only;
    malformed, non-finite or wrongly shaped updates are ``rejected``; neither is aggregated.
    ``previous``: the record of the stage before, whose evaluation is still owed: done in this
    stage's first training round (:mod:`.stage_evaluation`). ``last``: the run's final stage,
    evaluated in a round of its own; any other stage leaves its evaluation to the next one.
    """
    t0, c0 = time.time(), time.process_time()
    fed.received = {}
    present = fed.transport.available(stage)
    names = sample_participants(fed, stage, present)
    record = StageRecord.federated(stage, fed.curator.name, fed.schedule, names)
    record.absent.update({n: "not connected" for n in fed.client_names if n not in present})
    groups = [names] if fed.schedule == "parallel" else [[n] for n in names]
    owed = stage_evaluation.due(previous) if previous is not None else []
    fused = set(owed) & set(groups[0] if groups else [])
    if previous is not None and owed:
        _evaluate_owed_alone(fed, record, previous, owed, fused, present)
    bar = progress_bar(total=len(names), desc=f"stage {stage}: clients", leave=False, disable=not progress)
    for gi, group in enumerate(groups):
        _train_group(fed, record, gi, group, previous, fused, progress)
        bar.update(len(group))
    bar.close()
    if previous is not None and previous.evaluation == stage_evaluation.PENDING:
        stage_evaluation.finish(previous, stage_evaluation.NEXT_STAGE)
    for name, reason in record.absent.items():
        log.warning("client %r absent from stage %d: %s", name, stage, reason)
    # every joined client that is here evaluates the new universal model: now, or next stage
    evaluated = [n for n in fed.client_names
                 if n in fed.server.registry and n in present and n not in record.absent]
    calibrate = fed.cfg.federation.calibrate_heads
    if last and calibrate and fed.cfg.privacy.dp and not fed.cfg.privacy.plans_refit(calibrate):
        record.calibration = {"skipped": "[privacy] dp with calibration_epochs = 0: a head refit on private labels "
                                         "outside DP-SGD would not be covered by the sites' privacy budget"}
    elif last and calibrate:  # clients refit their heads on the final backbone (under DP: by DP-SGD)
        with timed(record.phase_seconds, "calibrate"):
            calibration_round(fed, record, evaluated)
    if last:
        _evaluate_own_round(fed, record, evaluated)
    else:
        stage_evaluation.mark_pending(record, evaluated)
    record.seconds, record.cpu_seconds = time.time() - t0, time.process_time() - c0
    return record


def run_stages(fed: Federation, start: int, end: int, progress: bool = True,
               stages: list[StageRecord] | None = None,
               after_stage: Callable[[int], None] | None = None) -> list[StageRecord]:
    """Stages start..end-1 (stage 0 = pretraining); appends each stage's record to ``stages``."""
    stages = [] if stages is None else stages
    total = fed.cfg.federation.rounds + 1
    for stage in progress_bar(range(start, end), desc="federate", initial=start, total=total,
                              disable=not progress):
        if stage == 0:
            stages.append(run_pretraining(fed, progress))
        else:
            owed = stages[-1] if stages and stages[-1].evaluation == stage_evaluation.PENDING else None
            stages.append(run_stage(fed, stage, progress, previous=owed, last=stage == total - 1))
        if after_stage is not None:
            after_stage(stage)
    return stages
