"""A federation's run folder: config, stage checkpoints, resume, final model and metrics around
the stages of :mod:`medveil.federated.stages` (in-process by default; the Flower ServerApp passes
its transport and nothing else changes).

Run folder (RUN_DIR):
    config.toml            the resolved config (written first)
    checkpoints/stage_NNN.pt   after every stage (atomic); stage_000 (MIM-only) and the latest kept
    checkpoints/updates.pt     the last stage's accepted client updates, as the server received
                           them (the target of `medveil audit`)
    metrics.json           per stage, per client: accuracy etc., bytes, rejected updates, absent
                           clients (remote transports); per stage: wall seconds in all and per
                           phase (fit / curate / evaluate) (at the end; :mod:`.records`)
    model.pt               the universal model: backbone + heads + task registry (at the end)
    accuracy_by_stage.png  per-client test accuracy across stages (at the end)
    complete               written last: a run folder without it is unfinished
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from medveil.errors import ConfigError, MedVeilError
from medveil.federated.client import LocalFit, local_fit
from medveil.federated.config import FederationConfig, dump_toml, load_config
from medveil.federated.records import StageRecord, stages_from_json, stages_to_json
from medveil.federated.universal import TaskEntry
from medveil.federated.stages import Federation, prepare, run_stages
from medveil.federated.transport import Transport
from medveil.io import jsonable, save_torch_atomic, write_json_atomic, write_text_atomic
from medveil.models.checkpoint import save_checkpoint

log = logging.getLogger("medveil.federated")

COMPLETE = "complete"


# ---- run folder ------------------------------------------------------------------------------
def check_run_folder(out: Path, resume: bool) -> None:
    """A new run needs an empty (or missing) folder; continuing one needs ``resume``."""
    if out.exists() and any(out.iterdir()) and not resume:
        raise ConfigError(f"{out}: not empty; pass --resume to continue that run or choose another --out")


def require_complete(run: Path) -> None:
    """MedVeilError unless ``run`` is a finished federation (its ``complete`` marker), for the
    commands that read a run (evaluate, audit)."""
    if not (run / COMPLETE).is_file():
        raise MedVeilError(f"{run}: not a complete federated run (no '{COMPLETE}' marker; "
                           f"finish it with `medveil federate --out {run} --resume`)")


UPDATES = "updates.pt"  # checkpoints/updates.pt: the last stage's accepted client updates


def _checkpoint_path(out: Path, stage: int) -> Path:
    return out / "checkpoints" / f"stage_{stage:03d}.pt"


def save_stage(fed: Federation, out: Path, stage: int, stages: list[StageRecord]) -> None:
    state = fed.server.state_dict()
    extra = {"stage": stage, "heads": state["heads"], "registry": state["registry"],
             "metrics": jsonable(stages_to_json(stages)), "config": fed.cfg.to_dict(), "torch_rng": torch.get_rng_state()}
    save_checkpoint(_checkpoint_path(out, stage), fed.server.model, fed.cfg.model, extra=extra)
    if fed.received and stage == fed.cfg.federation.rounds:  # the last stage's updates: what `medveil audit` attacks
        save_torch_atomic(out / "checkpoints" / UPDATES, {
            n: {"stage": u.stage, "backbone": u.backbone, "head": u.head} for n, u in fed.received.items()})
    for old in (out / "checkpoints").glob("stage_*.pt"):  # keep stage 0 (MIM-only) and the latest
        if old.name not in ("stage_000.pt", f"stage_{stage:03d}.pt"):
            old.unlink(missing_ok=True)


def load_stage(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise MedVeilError(f"{path}: unreadable checkpoint ({type(err).__name__}); delete it to "
                           f"resume from the previous one") from None


def mim_only_state(run: Path) -> dict[str, torch.Tensor]:
    """The encoder of a run's stage 0 (MIM pretraining only): ``checkpoints/stage_000.pt``
    without the MAE decoder."""
    from medveil.models.mae import DECODER_PREFIXES

    model = load_stage(run / "checkpoints" / "stage_000.pt")["model"]
    return {k: v for k, v in model.items() if not k.startswith(DECODER_PREFIXES)}


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
    progress: bool = True, client_fit: LocalFit = local_fit, transport: Transport | None = None,
) -> dict[str, Any]:
    """Run (or resume) a federation into ``out_dir``; returns the metrics dict.

    transport: how to reach the clients (default: in-process, loading their data from the config);
    the Flower ServerApp passes its ``FlowerTransport`` here and nothing else changes.

    max_stages: stop after that many stages (stage 0 counts) without finishing the run, as if
    killed; ``resume=True`` continues it. Returns the final metrics once the run is complete.
    """
    out = Path(out_dir)
    if resume and (out / "config.toml").is_file():
        saved = load_config(out / "config.toml", remote_clients=transport is not None)
        if saved.resume_identity() != cfg.resume_identity():
            raise ConfigError(f"{out}: was started with a different config (see {out / 'config.toml'})")
    if (out / COMPLETE).exists():
        if not resume:
            raise ConfigError(f"{out}: already holds a complete run (choose another --out)")
        return json.loads((out / "metrics.json").read_text())
    ckpt_path = latest_checkpoint(out) if out.exists() else None
    check_run_folder(out, resume)
    if cfg.privacy.dp and transport is None:  # in-process: the sites' DP-SGD and ledgers under RUN/sites
        from medveil.federated.dp_site import DPSites

        if client_fit is local_fit:
            client_fit = DPSites(cfg.privacy, out / "sites", cfg.federation.rounds,
                                 planned_calibration=cfg.federation.calibrate_heads)
        elif not isinstance(client_fit, DPSites):
            raise ConfigError("[privacy] dp = true: this run's client training is not DP-SGD (a custom client_fit)")
        elif client_fit.planned_calibration != cfg.privacy.plans_refit(cfg.federation.calibrate_heads):
            raise ConfigError("[privacy] the sites' DP training does not plan the run's head refit "
                              "(DPSites(..., planned_calibration=) must follow [federation] calibrate_heads)")
    fed = prepare(cfg, client_fit, transport)
    sources: dict[str, str] = {}
    for c in fed.clients if cfg.privacy.dp else ():  # a site would refuse every stage: say it before anything is written
        if cfg.privacy.delta * len(c.x_train) > 1:
            raise ConfigError(f"[privacy] delta {cfg.privacy.delta:g} is above 1/n for client {c.name!r} "
                              f"({len(c.x_train)} training images); leave it 0 for 1 / (10 n)")
        twin = sources.setdefault(str(Path(c.source).resolve()), c.name)
        if twin != c.name:
            raise ConfigError(f"[privacy] clients {twin!r} and {c.name!r} hold the same dataset ({c.source}): "
                              f"under DP one dataset spends one budget; give each client its own data")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "config.toml").exists():
        write_text_atomic(out / "config.toml", dump_toml(cfg))
    stages: list[StageRecord] = []
    start = 0
    if ckpt_path is not None:
        ckpt = load_stage(ckpt_path)
        restore(fed, ckpt)
        stages = stages_from_json(ckpt["extra"]["metrics"])
        start = int(ckpt["extra"]["stage"]) + 1
        log.info("resuming %s after stage %d", out, start - 1)
    total = cfg.federation.rounds + 1
    end = total if max_stages is None else min(total, max_stages)
    run_stages(fed, start, end, progress, stages, after_stage=lambda s: save_stage(fed, out, s, stages))
    if end < total:
        return {"stages": jsonable(stages_to_json(stages)), "complete": False}
    return finish_run(fed, out, stages)


def finish_run(fed: Federation, out: Path, stages: list[StageRecord]) -> dict[str, Any]:
    """Final model, metrics and figure; the ``complete`` marker last."""
    from medveil.report.plots import plot_stage_curves

    registry: dict[str, TaskEntry] = fed.server.registry
    final = {n: info.test for n, info in stages[-1].clients.items() if info.test}
    stage_json = stages_to_json(stages)
    metrics = {
        "config": fed.cfg.to_dict(),
        "strategy": fed.cfg.federation.strategy,
        "schedule": fed.schedule,
        "stages": stage_json,
        "final": final,
        "registry": {n: {"task": e.task, "class_names": e.class_names} for n, e in registry.items()},
        "bytes_total": communication_totals(stage_json),
    }
    if fed.cfg.privacy.dp:
        metrics["privacy"] = privacy_spent(stage_json)
    fed.server.save_universal(out / "model.pt")
    plot_stage_curves(stage_json, out / "accuracy_by_stage.png", split=fed.cfg.data.eval_split)
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


def privacy_spent(stages: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per client under DP: the (epsilon, delta) its ledger reported after its last release (a
    stage's training, or the calibration round's head refit)."""
    spent: dict[str, dict[str, float]] = {}
    for s in stages:
        released = {name: info.get("fit", {}) for name, info in s.get("clients", {}).items()}
        for name, fit in [*released.items(), *((s.get("calibration") or {}).get("dp", {})).items()]:
            if "epsilon" in fit:
                spent[name] = {"epsilon": fit["epsilon"], "delta": fit["delta"]}
    return spent


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
    cpu = [s.get("cpu_seconds") for s in metrics["stages"]]
    if all(c is not None for c in cpu):
        lines.append(f"CPU time of this process (in-process: server and all sites): {sum(cpu) / 60:.1f} min")
    for name, p in metrics.get("privacy", {}).items():
        lines.append(f"{name}: differential privacy spent epsilon {p['epsilon']:.2f} at delta {p['delta']:.1e}")
    rejected = sum(len(s.get("rejected", [])) for s in metrics["stages"])
    if rejected:
        lines.append(f"{rejected} client update(s) rejected (see metrics.json)")
    return "\n".join(lines)
