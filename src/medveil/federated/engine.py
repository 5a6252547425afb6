"""In-process federation: stage 0 (server MIM pretraining), then ``rounds`` stages of
join -> local fine-tuning -> screening -> curation -> evaluation, on one machine (with
``[federation] calibrate_heads``, the last stage adds a round in which the clients refit their
heads on the final backbone: :mod:`.calibration`). A stage's
evaluation happens in the next stage's training round (the clients evaluate the model they
receive before training on it; :mod:`.stage_evaluation`), the last stage's in a round of its own.

Clients and server only exchange the messages of :mod:`medveil.federated.messages`, through
a :class:`~medveil.federated.transport.Transport`: in-process calls by default, Flower messages
to remote sites with ``medveil.federated.flower`` (same stage logic, same seeds). Each stage's randomness comes from seeds derived from
(seed, stage, client), so a run killed after stage s and resumed from its checkpoint gives the
same numbers as an uninterrupted run.

Run folder (RUN_DIR):
    config.toml            the resolved config (written first)
    checkpoints/stage_NNN.pt   after every stage (atomic); stage_000 (MIM-only) and the latest kept
    metrics.json           per stage, per client: accuracy etc., bytes, rejected updates, absent
                           clients (remote transports); per stage: wall seconds in all and per
                           phase (fit / curate / evaluate) (at the end)
    model.pt               the universal model: backbone + heads + task registry (at the end)
    accuracy_by_stage.png  per-client test accuracy across stages (at the end)
    complete               written last: a run folder without it is unfinished
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from medveil.errors import ConfigError, MedVeilError
from medveil.federated import stage_evaluation
from medveil.federated.calibration import calibration_round
from medveil.federated.client import local_fit
from medveil.federated.config import FederationConfig, dump_toml, load_config
from medveil.federated.curation import Curator, make_curator
from medveil.federated.messages import ClientUpdate, message_nbytes
from medveil.federated.server import Server, TaskEntry
from medveil.federated.sites import ClientData, build_sites, load_pool
from medveil.federated.training import derive_seed
from medveil.federated.transport import Exchange, FitJob, LocalTransport, Transport
from medveil.federated.updates import screen_updates
from medveil.io import jsonable, write_json_atomic, write_text_atomic
from medveil.models.checkpoint import save_checkpoint

log = logging.getLogger("medveil.federated")

ClientFit = Callable[..., ClientUpdate]  # (data, instructions, recipe, seed, device=) -> update
COMPLETE = "complete"


@dataclass
class Federation:
    """Everything one run works on: config, clients' private data (in-process only; empty when
    the clients are remote), the server, the curator, and the transport to the clients."""

    cfg: FederationConfig
    clients: list[ClientData]
    server: Server
    curator: Curator
    client_fit: ClientFit = local_fit
    transport: Transport | None = None

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


def prepare(cfg: FederationConfig, client_fit: ClientFit = local_fit,
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
    server.model.to(device)
    return Federation(cfg, clients, server, curator, client_fit, transport)


def run_pretraining(fed: Federation, progress: bool = True) -> dict[str, Any]:
    """Stage 0: optional MAE/MedMAE checkpoint, then MIM pretraining on the pool."""
    t0 = time.time()
    out: dict[str, Any] = {"stage": 0, "kind": "pretrain", "pool_size": len(fed.server.pool)}
    if fed.cfg.init_checkpoint:
        from medveil.models.checkpoint import load_vit_checkpoint

        report = load_vit_checkpoint(fed.cfg.init_checkpoint, fed.server.model)
        out["init_checkpoint"] = {"path": report.path, "notes": report.notes}
    out.update(fed.server.pretrain(fed.cfg.pretrain, derive_seed(fed.cfg.seed, 0, "pretrain"), progress))
    out["seconds"] = time.time() - t0
    return out


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


def _instructions(fed: Federation, name: str, stage: int, info: dict[str, Any]):
    """Join (first time: the client's class count in, a fresh head out) or the current model."""
    server = fed.server
    if name in server.registry:
        return server.instructions(name, stage)
    request = fed.transport.join_request(name)
    info["bytes"]["join_up"] = message_nbytes(request)
    info["joined_now"] = True
    return server.join(request, stage, derive_seed(fed.cfg.seed, stage, name, "head"))


@contextmanager
def _timed(phase: dict[str, float], key: str) -> Iterator[None]:
    """Add the wall seconds of the block to ``phase[key]``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        phase[key] += time.perf_counter() - t0


def run_stage(fed: Federation, stage: int, progress: bool = True, previous: dict[str, Any] | None = None,
              last: bool = True) -> dict[str, Any]:
    """One federated stage; returns its metrics (see the module docstring).

    Clients that do not answer (``absent``: disconnected, timed out) miss this stage only;
    malformed, non-finite or wrongly shaped updates are ``rejected``; neither is aggregated.
    ``previous``: the record of the stage before, whose evaluation is still owed: done in this
    stage's first training round (:mod:`.stage_evaluation`). ``last``: the run's final stage,
    evaluated in a round of its own; any other stage leaves its evaluation to the next one.
    """
    t0 = time.time()
    server, seed, transport = fed.server, fed.cfg.seed, fed.transport
    present = transport.available(stage)
    names = sample_participants(fed, stage, present)
    groups = [names] if fed.schedule == "parallel" else [[n] for n in names]
    per_client: dict[str, dict[str, Any]] = {}
    rejected: list[dict[str, Any]] = []
    absent: dict[str, str] = {n: "not connected" for n in fed.client_names if n not in present}
    curation: list[dict[str, Any]] = []
    phase = {"fit": 0.0, "curate": 0.0, "evaluate": 0.0}  # wall seconds: where a stage's time goes
    owed = stage_evaluation.due(previous) if previous is not None else []
    fused = set(owed) & set(groups[0] if groups else [])
    if previous is not None and owed:  # owed but not training first here: an evaluation-only round
        alone = [server.instructions(n, previous["stage"]) for n in owed if n not in fused and n in present]
        with _timed(phase, "evaluate"):
            reports = transport.evaluate(alone, previous["stage"]) if alone else Exchange()
        _merge_wire(previous["clients"], reports.wire_bytes)
        stage_evaluation.record_reports(previous, alone, reports.replies,
                                        {**{n: "not connected" for n in owed if n not in present},
                                         **reports.absent})
    bar = tqdm(total=len(names), desc=f"stage {stage}: clients", leave=False,
               disable=None if progress else True)
    for gi, group in enumerate(groups):
        jobs = []
        for name in group:
            info: dict[str, Any] = {"bytes": {}}
            per_client[name] = info
            try:
                ins = _instructions(fed, name, stage, info)
            except MedVeilError as err:  # e.g. a known client rejoining with another class count
                log.warning("join refused: %s", err)
                rejected.append({"client": name, "stage": stage, "reason": str(err)})
                continue
            info["bytes"]["fit_down"] = message_nbytes(ins)
            jobs.append(FitJob(ins, derive_seed(seed, stage, name, "fit"), evaluate=gi == 0 and name in fused))
        with _timed(phase, "fit"):
            result = transport.fit(jobs, fed.cfg.local, stage)
        if gi == 0 and previous is not None and fused:
            asked = [j.instructions for j in jobs if j.evaluate]
            stage_evaluation.record_reports(
                previous, asked, result.evaluations,
                {i.client_name: result.absent.get(i.client_name, "no evaluation in its reply")
                 for i in asked if i.client_name not in result.evaluations}, fused=True)
        updates = [result.replies[j.instructions.client_name] for j in jobs
                   if j.instructions.client_name in result.replies]
        for update in updates:
            info = per_client[update.client_name]
            info["bytes"]["fit_up"] = message_nbytes(update)
            info["fit"] = {**update.metrics, "n_samples": update.n_samples}
        _merge_wire(per_client, result.wire_bytes)
        absent.update(result.absent)
        rejected += [r.to_dict() for r in result.rejected]
        bar.update(len(group))
        accepted, rejections = screen_updates(updates, server.backbone_spec(), server.head_specs())
        rejected += [r.to_dict() for r in rejections]
        with _timed(phase, "curate"):
            result_c = fed.curator.curate(server, accepted, derive_seed(seed, stage, gi, "curate"), progress)
        curation.append({"clients": [u.client_name for u in accepted], **result_c})
    bar.close()
    if previous is not None and previous.get("evaluation") == stage_evaluation.PENDING:
        stage_evaluation.finish(previous, stage_evaluation.NEXT_STAGE)
    for name, reason in absent.items():
        log.warning("client %r absent from stage %d: %s", name, stage, reason)
    record = {"stage": stage, "kind": "federated", "strategy": fed.curator.name,
              "schedule": fed.schedule, "participants": names, "clients": per_client,
              "rejected": rejected, "absent": [{"client": n, "reason": r} for n, r in absent.items()],
              "curation": curation}
    # every joined client that is here evaluates the new universal model: now, or next stage
    evaluated = [n for n in fed.client_names if n in server.registry and n in present and n not in absent]
    if last and fed.cfg.federation.calibrate_heads:  # clients refit their heads on the final backbone
        phase["calibrate"] = 0.0
        with _timed(phase, "calibrate"):
            record["calibration"] = calibration_round(fed, stage, evaluated, per_client)
        record["rejected"] += record["calibration"]["rejected"]  # counted with the stage's rejections
    if last:
        eval_ins = [server.instructions(n, stage) for n in evaluated]
        with _timed(phase, "evaluate"):
            reports = transport.evaluate(eval_ins, stage)
        _merge_wire(per_client, reports.wire_bytes)
        stage_evaluation.record_reports(record, eval_ins, reports.replies, reports.absent)
        stage_evaluation.finish(record, stage_evaluation.OWN_ROUND)
    else:
        stage_evaluation.mark_pending(record, evaluated)
    return {**record, "seconds": time.time() - t0, "phase_seconds": phase}


def _merge_wire(per_client: dict[str, dict[str, Any]], wire: dict[str, dict[str, int]]) -> None:
    for name, counts in wire.items():
        per_client.setdefault(name, {"bytes": {}}).setdefault("wire_bytes", {}).update(counts)


def run_stages(fed: Federation, start: int, end: int, progress: bool = True,
               stages: list[dict[str, Any]] | None = None,
               after_stage: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Stages start..end-1 (stage 0 = pretraining); appends each stage's metrics to ``stages``."""
    stages = [] if stages is None else stages
    total = fed.cfg.federation.rounds + 1
    for stage in tqdm(range(start, end), desc="federate", initial=start, total=total,
                      disable=None if progress else True):
        if stage == 0:
            stages.append(run_pretraining(fed, progress))
        else:
            owed = stages[-1] if stages and stages[-1].get("evaluation") == stage_evaluation.PENDING else None
            stages.append(run_stage(fed, stage, progress, previous=owed, last=stage == total - 1))
        if after_stage is not None:
            after_stage(stage)
    return stages


# ---- run folder ------------------------------------------------------------------------------
def _checkpoint_path(out: Path, stage: int) -> Path:
    return out / "checkpoints" / f"stage_{stage:03d}.pt"


def save_stage(fed: Federation, out: Path, stage: int, stages: list[dict[str, Any]]) -> None:
    state = fed.server.state_dict()
    extra = {"stage": stage, "heads": state["heads"], "registry": state["registry"],
             "metrics": jsonable(stages), "config": fed.cfg.to_dict(), "torch_rng": torch.get_rng_state()}
    save_checkpoint(_checkpoint_path(out, stage), fed.server.model, fed.cfg.model, extra=extra)
    for old in (out / "checkpoints").glob("stage_*.pt"):  # keep stage 0 (MIM-only) and the latest
        if old.name not in ("stage_000.pt", f"stage_{stage:03d}.pt"):
            old.unlink(missing_ok=True)


def load_stage(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise MedVeilError(f"{path}: unreadable checkpoint ({type(err).__name__}); delete it to "
                           f"resume from the previous one") from None


def restore(fed: Federation, ckpt: dict[str, Any]) -> None:
    extra = ckpt["extra"]
    fed.server.load_state_dict({"model": ckpt["model"], "heads": extra["heads"],
                                "registry": extra["registry"]})
    torch.set_rng_state(extra["torch_rng"])


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / "checkpoints").glob("stage_*.pt"))
    return found[-1] if found else None


def run_federation(
    cfg: FederationConfig, out_dir: str | Path, resume: bool = False, max_stages: int | None = None,
    progress: bool = True, client_fit: ClientFit = local_fit, transport: Transport | None = None,
) -> dict[str, Any]:
    """Run (or resume) a federation into ``out_dir``; returns the metrics dict.

    transport: how to reach the clients (default: in-process, loading their data from the config);
    the Flower ServerApp passes its ``FlowerTransport`` here and nothing else changes.

    max_stages: stop after that many stages (stage 0 counts) without finishing the run, as if
    killed; ``resume=True`` continues it. Returns the final metrics once the run is complete.
    """
    out = Path(out_dir)
    if (out / COMPLETE).exists():
        if not resume:
            raise ConfigError(f"{out}: already holds a complete run (choose another --out)")
        return json.loads((out / "metrics.json").read_text())
    ckpt_path = latest_checkpoint(out) if out.exists() else None
    if out.exists() and any(out.iterdir()) and not resume:
        raise ConfigError(f"{out}: not empty; pass --resume to continue that run or choose another --out")
    if resume and (out / "config.toml").is_file():
        saved = load_config(out / "config.toml", remote_clients=transport is not None)
        if saved.to_dict() != cfg.to_dict():
            raise ConfigError(f"{out}: was started with a different config (see {out / 'config.toml'})")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "config.toml").exists():
        write_text_atomic(out / "config.toml", dump_toml(cfg))
    fed = prepare(cfg, client_fit, transport)
    stages: list[dict[str, Any]] = []
    start = 0
    if ckpt_path is not None:
        ckpt = load_stage(ckpt_path)
        restore(fed, ckpt)
        stages = list(ckpt["extra"]["metrics"])
        start = int(ckpt["extra"]["stage"]) + 1
        log.info("resuming %s after stage %d", out, start - 1)
    total = cfg.federation.rounds + 1
    end = total if max_stages is None else min(total, max_stages)
    run_stages(fed, start, end, progress, stages, after_stage=lambda s: save_stage(fed, out, s, stages))
    if end < total:
        return {"stages": jsonable(stages), "complete": False}
    return finish_run(fed, out, stages)


def finish_run(fed: Federation, out: Path, stages: list[dict[str, Any]]) -> dict[str, Any]:
    """Final model, metrics and figure; the ``complete`` marker last."""
    from medveil.evaluate.plots import plot_stage_curves

    registry: dict[str, TaskEntry] = fed.server.registry
    last = stages[-1]
    final = {n: info["test"] for n, info in last.get("clients", {}).items() if "test" in info}
    metrics = {
        "config": fed.cfg.to_dict(),
        "strategy": fed.cfg.federation.strategy,
        "schedule": fed.schedule,
        "stages": stages,
        "final": final,
        "registry": {n: {"task": e.task, "class_names": e.class_names} for n, e in registry.items()},
        "bytes_total": communication_totals(stages),
    }
    fed.server.save_universal(out / "model.pt")
    plot_stage_curves(stages, out / "accuracy_by_stage.png")
    write_json_atomic(out / "metrics.json", metrics)
    write_text_atomic(out / COMPLETE, "ok\n")
    return jsonable(metrics)


def communication_totals(stages: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per client: total bytes received (down) and sent (up) over the run."""
    totals: dict[str, dict[str, int]] = {}
    for s in stages:
        for name, info in s.get("clients", {}).items():
            t = totals.setdefault(name, {"down": 0, "up": 0})
            for key, n in info.get("bytes", {}).items():
                t["down" if key.endswith("_down") else "up"] += int(n)
    return totals


def summary_table(metrics: dict[str, Any]) -> str:
    """Final per-client test metrics and traffic of a run."""
    lines = [f"strategy {metrics['strategy']} ({metrics['schedule']}), "
             f"{len(metrics['stages']) - 1} stages after MIM pretraining",
             f"{'client':<16}{'acc':>8}{'bacc':>8}{'auc':>8}{'MB down':>10}{'MB up':>8}"]
    for name, m in metrics["final"].items():
        b = metrics["bytes_total"].get(name, {"down": 0, "up": 0})
        auc = m.get("auc")
        lines.append(f"{name:<16}{m['acc']:>8.3f}{m['bacc']:>8.3f}"
                     f"{(auc if auc is not None else float('nan')):>8.3f}"
                     f"{b['down'] / 1e6:>10.1f}{b['up'] / 1e6:>8.1f}")
    rejected = sum(len(s.get("rejected", [])) for s in metrics["stages"])
    if rejected:
        lines.append(f"{rejected} client update(s) rejected (see metrics.json)")
    return "\n".join(lines)
