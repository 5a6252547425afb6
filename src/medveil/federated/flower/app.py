"""The MedVeil Flower app (Message API): ``server_app`` runs on the coordinator's SuperLink,
``client_app`` on every hospital's SuperNode. Both call the in-process engine's functions
(engine.run_federation with a FlowerTransport; a site's one entry point ``client.serve``), so every
strategy (distill, relay, fedavg, FedProx) and every checkpoint / resume rule is the same.

Run config (``[tool.flwr.app.config]``, set by ``medveil server run``):
    config          absolute path of the federation TOML on the coordinator
    out             absolute path of the run folder on the coordinator
    resume          continue the run in ``out`` from its last stage checkpoint
    stage-timeout   seconds a round waits for the sites' replies (then they are absent)
    straggler-timeout  once a majority replied, seconds to wait for the rest (0 = off)
    join-timeout    seconds the first stage waits for ``min-sites`` sites to connect
    min-sites       sites to wait for (0 = all configured)
    max-stages      stop after this many stages, stage 0 included (0 = run to the end)
    threads         torch threads of the server process (0 = torch's default)

Node config of a site (``flower-supernode --node-config``, set by ``medveil site start``):
    name            the site's name (a ``[[clients]]`` name of the coordinator's config)
    data            its private dataset: a path, a name under ``data-root``, or ``sample:NAME``
    data-root       optional folder for names (like ``$MEDVEIL_DATA_ROOT``)
    device          torch device for local training (default "cpu")
    threads         torch threads (0 = torch's default)

Messages: ``query`` (who are you? -> JoinRequest), ``train`` (FitInstructions -> ClientUpdate),
``evaluate`` (FitInstructions -> EvalReport); see :mod:`medveil.federated.flower.codec`.
"""

from __future__ import annotations

import functools
import logging
import sys
import traceback
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from medveil.errors import ConfigError, SiteRefused
from medveil.federated.flower import codec

log = logging.getLogger("medveil.federated")

server_app = ServerApp()
client_app = ClientApp()

RUN_CONFIG_DEFAULTS: dict[str, Any] = {
    "config": "", "out": "", "resume": False, "stage-timeout": 3600.0, "straggler-timeout": 0.0,
    "join-timeout": 300.0, "min-sites": 0, "max-stages": 0, "threads": 0,
}


def _threads(n: Any) -> None:
    if int(n or 0) > 0:
        import torch

        torch.set_num_threads(int(n))


def check_remote_config(cfg) -> None:
    """The Flower server never reads a site's data: a pool must be its own (``pool_path``)."""
    needs_pool = cfg.pretrain.epochs > 0 or cfg.federation.strategy == "distill"
    if needs_pool and not cfg.data.pool_path:
        raise ConfigError("across sites the server never reads a site's data, so [data] pool_fraction "
                          "cannot build its pool: set [data] pool_path to the server's own unlabelled "
                          "images (or use pretrain epochs = 0 with a non-distill strategy)")


def _log_to_stderr() -> None:
    """MedVeil's INFO log in the ServerApp's output (``flwr log RUN_ID`` / the SuperLink log)."""
    logger = logging.getLogger("medveil")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("medveil: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    from medveil.federated.config import load_config
    from medveil.federated.engine import run_federation
    from medveil.federated.flower.latency import fast_object_pulls
    from medveil.federated.flower.transport import FlowerTransport
    from medveil.federated.records import stages_from_json

    _log_to_stderr()
    fast_object_pulls()  # replies: no 1-10 s back-off when a reply's payload is still arriving
    rc = {**RUN_CONFIG_DEFAULTS, **dict(context.run_config)}
    if not rc["config"] or not rc["out"]:
        raise ConfigError("run config needs 'config' and 'out' (absolute paths on the coordinator)")
    _threads(rc["threads"])
    cfg = load_config(Path(str(rc["config"])), remote_clients=True)
    check_remote_config(cfg)
    transport = FlowerTransport(grid, cfg, stage_timeout=float(rc["stage-timeout"]),
                                join_timeout=float(rc["join-timeout"]), min_sites=int(rc["min-sites"]),
                                straggler_timeout=float(rc["straggler-timeout"]))
    metrics = run_federation(cfg, Path(str(rc["out"])), resume=bool(rc["resume"]),
                             max_stages=int(rc["max-stages"]) or None, progress=False, transport=transport)
    for stage in stages_from_json(metrics.get("stages", []))[1:]:
        log.info("stage %d: %d participants, %d absent, %d rejected, %.1f s", stage.stage,
                 len(stage.participants), len(stage.absent), len(stage.rejected), stage.seconds or 0.0)
    log.info("run folder %s (%s)", rc["out"], "complete" if metrics.get("complete", True) else "stopped")


# ---- site side ---------------------------------------------------------------------------
def site_data(context: Context, site: dict[str, Any]):
    """This site's private splits, from its node config and the server's data options."""
    from medveil.federated.sites import load_site

    node = dict(context.node_config)
    name, data = str(node.get("name", "")), str(node.get("data", ""))
    if not name or not data:
        raise ConfigError("this SuperNode has no node config 'name' and 'data' (start it with "
                          "`medveil site start --name NAME --data PATH ...`)")
    _threads(node.get("threads", 0))
    if node.get("data-root"):
        import os

        os.environ["MEDVEIL_DATA_ROOT"] = str(node["data-root"])
    return load_site(name, data, site)


def _device(context: Context) -> str:
    return str(dict(context.node_config).get("device", "cpu"))


def _checked(message: Message, context: Context):
    ins, extra = codec.decode_instructions(message.content)
    data = site_data(context, extra["site"])
    if ins.client_name != data.name:
        raise ConfigError(f"message for site {ins.client_name!r} reached site {data.name!r}")
    return ins, extra, data


def private_errors(handler):
    """A failing site answers with the error's type only: the traceback (which may name local
    paths) goes to the site's own log (its SuperNode output), never over the wire."""

    @functools.wraps(handler)
    def wrapped(message: Message, context: Context) -> Message:
        try:
            return handler(message, context)
        except Exception as err:  # noqa: BLE001 - every failure becomes a sanitized error reply
            traceback.print_exc(file=sys.stderr)
            print(f"medveil site error: {err}", file=sys.stderr, flush=True)
            from flwr.common.constant import ErrorCode

            # a refusal is the site's own decision and names no private data: say it in full
            said = f"SiteRefused: {err}" if isinstance(err, SiteRefused) else \
                f"{type(err).__name__} at the site (details in the site's log)"
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, said), reply_to=message)

    return wrapped


@client_app.query()
@private_errors
def site_join(message: Message, context: Context) -> Message:
    from medveil.federated.client import join_request

    site = codec.read_meta(message.content, "server message")["site"]
    return Message(codec.encode_join_request(join_request(site_data(context, site))), reply_to=message)


def _site_fit(context: Context, site: dict[str, Any], calibrate: bool):
    """The site's training function. Under DP: DP-SGD with the site's own ledger, within the
    stricter of the run's target and the site's ``max-epsilon``; a site with ``max-epsilon`` set
    refuses to train without DP, and no site refits a head outside DP-SGD (calibration: DP-SGD on
    the head when the run's ``calibration_epochs`` > 0, else refused)."""
    from medveil.federated.client import local_fit

    node = dict(context.node_config)
    ceiling = float(node.get("max-epsilon", 0) or 0)
    if not site.get("privacy", {}).get("dp"):
        if ceiling > 0:
            raise SiteRefused(f"this site trains only with differential privacy (max-epsilon {ceiling:g}); "
                              f"the run asks for training without it")
        return local_fit
    from medveil.federated.dp_site import DPSites
    from medveil.federated.privacy import PrivacyOptions

    opts = PrivacyOptions(**site["privacy"])
    if calibrate and not opts.plans_refit(calibrate):
        raise SiteRefused("a head refit on private labels outside DP-SGD is not covered by the privacy budget")
    state = str(node.get("state-dir", ""))
    if not state:
        raise ConfigError("this run uses differential privacy but the SuperNode has no node config "
                          "'state-dir' for the site's privacy ledger (start it with `medveil site start`)")
    opts.check()
    return DPSites(opts, Path(state), int(site["planned_stages"]), max_epsilon=ceiling,
                   planned_calibration=bool(site.get("planned_calibration")))


def _serve(message: Message, context: Context, evaluate_only: bool) -> Message:
    """The site's work for a ``train`` or ``evaluate`` message: ``client.serve``, as in-process."""
    from medveil.federated.client import CALIBRATE, EVALUATE, FIT, ClientJob, serve
    from medveil.federated.training import TrainRecipe

    ins, extra, data = _checked(message, context)
    if evaluate_only:
        job = ClientJob(ins, EVALUATE)
    else:  # calibrate: the last round refits the head only; evaluate: first report the received model
        job = ClientJob(ins, CALIBRATE if extra.get("calibrate") else FIT, int(extra["seed"]),
                        TrainRecipe(**extra["recipe"]), evaluate_first=bool(extra.get("evaluate")))
    fit = _site_fit(context, extra["site"], calibrate=job.work == CALIBRATE) if not evaluate_only else None
    reply = serve(data, job, device=_device(context), **({"fit": fit} if fit is not None else {}))
    state = str(dict(context.node_config).get("state-dir", ""))
    if state and job.work == FIT and reply.update is not None:  # kept for the site's own audit
        from medveil.federated.site_record import audit_folder, keep_release

        keep_release(audit_folder(state, data.name), extra["site"], data.name, data.source, ins, reply.update)
    content = (codec.encode_report(reply.report) if evaluate_only
               else codec.encode_update(reply.update, reply.report))
    return Message(content, reply_to=message)


@client_app.train()
@private_errors
def site_train(message: Message, context: Context) -> Message:
    return _serve(message, context, evaluate_only=False)


@client_app.evaluate()
@private_errors
def site_evaluate(message: Message, context: Context) -> Message:
    return _serve(message, context, evaluate_only=True)
