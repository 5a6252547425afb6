"""The engine's transport over Flower: each configured client is a SuperNode (one per hospital)
that the ServerApp reaches through the ``Grid`` (Flower's Message API).

- Sites are found by asking every newly connected node for its join request (a ``query``
  message); the site name comes from the node's ``--node-config name=...``. A node whose name is
  not in the config, or is already held by another online node, is ignored (logged).
- ``exchange`` pushes one ``train`` message per training job (fit / calibrate, with the
  evaluate-first flag) or one ``evaluate`` message per evaluation-only job, and polls for replies
  until all are in or ``stage_timeout`` seconds pass (or, with ``straggler_timeout`` > 0, that many
  seconds after a majority of the sites replied). A site that does not reply in time (killed,
  disconnected, slow) or whose ClientApp failed is *absent* for this stage; it is asked again next
  stage (a restarted SuperNode with the same key keeps its node id). Messages carry the same
  TTL, so a late site never trains on an expired stage.
- Undecodable replies are *rejected* (never aggregated); shapes / NaN are screened by the engine.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from medveil.errors import ConfigError, UpdateRejected
from medveil.federated.config import FederationConfig
from medveil.federated.flower import codec
from medveil.federated.client import CALIBRATE, EVALUATE, ClientJob, ClientReply
from medveil.federated.messages import JoinRequest
from medveil.federated.transport import Exchange
from medveil.federated.updates import Rejection

log = logging.getLogger("medveil.federated")

POLL_SECONDS = 0.1  # Grid.send_and_receive sleeps 3 s between pulls; we poll faster


def site_options(cfg: FederationConfig) -> dict[str, Any]:
    """What a site needs to build its splits exactly as the in-process engine would (and to audit
    its releases as `medveil audit` would)."""
    d = cfg.data
    return {"img_size": cfg.model.img_size, "in_chans": cfg.model.in_chans, "seed": cfg.seed,
            "pool_fraction": 0.0 if d.pool_path else d.pool_fraction, "max_train": d.max_train,
            "max_test": d.max_test, "max_pool": d.max_pool, "eval_split": d.eval_split,
            # for the site's own audit (`medveil site audit`): the attacker's reference recipe
            "reference_recipe": dataclasses.asdict(cfg.evaluation.finetune_recipe(cfg.local)),
            **({"privacy": dataclasses.asdict(cfg.privacy), "planned_stages": cfg.federation.rounds,
                "planned_calibration": cfg.federation.calibrate_heads} if cfg.privacy.dp else {})}


class FlowerTransport:
    def __init__(self, grid, cfg: FederationConfig, stage_timeout: float = 3600.0,
                 join_timeout: float = 300.0, min_sites: int = 0, straggler_timeout: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        names = [c.name for c in cfg.clients]
        if min_sites < 0 or min_sites > len(names):
            raise ConfigError(f"min-sites must be in 0..{len(names)} (0 = all configured sites)")
        self.grid, self.cfg, self.names = grid, cfg, names
        self.stage_timeout, self.join_timeout = float(stage_timeout), float(join_timeout)
        self.straggler_timeout = float(straggler_timeout)
        if min(self.stage_timeout, self.join_timeout) <= 0 or self.straggler_timeout < 0:
            raise ConfigError("stage-timeout and join-timeout must be > 0, straggler-timeout >= 0")
        self.min_sites = min_sites or len(names)
        self.clock = clock
        self.node_of: dict[str, int] = {}        # site name -> node id
        self.requests: dict[str, JoinRequest] = {}
        self.asked: set[int] = set()             # node ids already asked who they are
        self.site = site_options(cfg)
        self._waited = False

    # ---- discovery -----------------------------------------------------------------------
    def _online(self) -> set[int]:
        return set(self.grid.get_node_ids())

    def _discover(self, stage: int) -> set[int]:
        online = self._online()
        new = sorted(online - self.asked - set(self.node_of.values()))
        if new:
            content = {n: codec.encode_join_query(self.site) for n in new}
            replies = self._exchange(content, "query", stage, f"join-{stage}")
            self.asked.update(new)
            for node, (reply, err) in replies.items():
                if err is not None:
                    self.asked.discard(node)  # ask again next time
                    log.warning("node %d did not say who it is: %s", node, err)
                    continue
                try:
                    req = codec.decode_join_request(reply, f"node {node}")
                except UpdateRejected as err2:
                    log.warning("%s", err2)
                    continue
                self._claim(req, node, online)
        return online

    def _claim(self, req: JoinRequest, node: int, online: set[int]) -> None:
        name = req.client_name
        if name not in self.names:
            log.warning("node %d calls itself %r, which is not a configured site; ignored", node, name)
            return
        holder = self.node_of.get(name)
        if holder is not None and holder != node and holder in online:
            log.warning("node %d calls itself %r, already held by online node %d; ignored", node, name, holder)
            return
        self.node_of[name] = node
        self.requests[name] = req
        log.info("site %r is node %d (%d classes)", name, node, req.num_classes)

    def available(self, stage: int) -> list[str]:
        online = self._discover(stage)
        if not self._waited:  # first stage: wait for the consortium to gather
            self._waited = True
            deadline = self.clock() + self.join_timeout
            while len(self._present(online)) < self.min_sites and self.clock() < deadline:
                time.sleep(1.0)
                online = self._discover(stage)
            present = self._present(online)
            if not present:
                raise ConfigError(f"no configured site connected within {self.join_timeout:.0f} s "
                                  f"(expected: {', '.join(self.names)})")
            if len(present) < self.min_sites:
                log.warning("only %d of %d sites connected; starting without %s", len(present),
                            self.min_sites, ", ".join(n for n in self.names if n not in present))
        return self._present(online)

    def _present(self, online: set[int]) -> list[str]:
        return [n for n in self.names if self.node_of.get(n) in online]

    def join_request(self, name: str) -> JoinRequest:
        return self.requests[name]

    # ---- rounds --------------------------------------------------------------------------
    def _exchange(self, contents: dict[int, Any], message_type: str, stage: int,
                  group: str) -> dict[int, tuple[Any, str | None]]:
        """Push one message per node; node -> (reply content, None) or (None, why not)."""
        from flwr.app import Message

        if not contents:
            return {}
        ttl = self.stage_timeout  # expired with the round: a late or restarted site never trains on it
        messages = [Message(content, node, message_type, ttl=ttl, group_id=group)
                    for node, content in contents.items()]
        ids = list(self.grid.push_messages(messages))
        node_of_msg = dict(zip(ids, contents, strict=True))
        pending = {i for i in ids if i}
        out: dict[int, tuple[Any, str | None]] = {}
        deadline = self.clock() + self.stage_timeout
        majority = len(pending) // 2 + 1
        while pending and self.clock() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                mid = reply.metadata.reply_to_message_id
                if mid not in pending:
                    continue
                pending.discard(mid)
                node = node_of_msg[mid]
                if reply.has_error():
                    reason = (reply.error.reason or "").strip().splitlines()
                    out[node] = (None, f"site error: {reason[-1] if reason else reply.error.code}")
                else:
                    out[node] = (reply.content, None)
            if pending and self.straggler_timeout and len(out) >= majority:
                deadline = min(deadline, self.clock() + self.straggler_timeout)
                majority = len(contents) + 1  # set the straggler deadline once
            if pending:
                time.sleep(POLL_SECONDS)
        for mid in pending:
            out[node_of_msg[mid]] = (None, "no reply in time (stage / straggler timeout)")
        for mid, node in node_of_msg.items():
            if not mid:
                out[node] = (None, "message not accepted by the SuperLink")
        return out

    def _round(self, items: dict[str, Any], message_type: str, stage: int, decode) -> Exchange:
        """Send name -> content; decode replies; absent / rejected bookkeeping."""
        result: Exchange = Exchange()
        by_node = {self.node_of[name]: name for name in items}
        replies = self._exchange({self.node_of[n]: c for n, c in items.items()}, message_type, stage,
                                 f"{message_type}-{stage}")
        for node, (content, err) in replies.items():
            name = by_node[node]
            down = codec.payload_bytes(items[name])
            result.wire_bytes[name] = {f"{message_type}_down": down}
            if err is not None:
                result.absent[name] = err
                continue
            result.wire_bytes[name][f"{message_type}_up"] = codec.payload_bytes(content)
            where = f"client {name!r} stage {stage}"
            try:
                reply = decode(content, where)
                first = reply[0] if isinstance(reply, tuple) else reply  # (update, report) for train
                if first.client_name != name or first.stage != stage:
                    raise UpdateRejected(f"{where}: reply is for {first.client_name!r} stage {first.stage}")
            except UpdateRejected as err2:
                log.warning("update rejected: %s", err2)
                result.rejected.append(Rejection(name, stage, str(err2)))
                continue
            update, report = reply if isinstance(reply, tuple) else (None, reply)
            result.replies[name] = ClientReply(update=update, report=report)
        return result

    def exchange(self, jobs: list[ClientJob], stage: int) -> Exchange:
        """Evaluation-only jobs as ``evaluate`` messages, training jobs as ``train`` messages (one
        round each; the engine never mixes them in one call)."""
        result = Exchange()
        for message_type in ("train", "evaluate"):
            batch = [j for j in jobs if (j.work == EVALUATE) == (message_type == "evaluate")]
            if batch:
                part = self._round({j.client_name: self._encode(j) for j in batch}, message_type, stage,
                                   codec.decode_update if message_type == "train" else codec.decode_report)
                result.replies.update(part.replies)
                result.absent.update(part.absent)
                result.rejected += part.rejected
                result.wire_bytes.update(part.wire_bytes)
        return result

    def _encode(self, job: ClientJob):
        if job.work == EVALUATE:
            return codec.encode_instructions(job.instructions, site=self.site)
        return codec.encode_instructions(job.instructions, seed=job.seed, recipe=dataclasses.asdict(job.recipe),
                                         site=self.site, evaluate=job.evaluate_first,
                                         calibrate=job.work == CALIBRATE)
