"""MedVeil messages <-> Flower ``RecordDict``: what actually crosses the wire.

Every message is at most four records: ``backbone`` and ``head`` (ArrayRecords holding each
state dict as ONE flat array per dtype; the server's calibration message under DP adds
``features``, the pool's feature basis) and ``meta`` (a ConfigRecord holding one JSON string:
names, stage, counts, metrics, the training recipe and seed, the data options, and each state's
layout: parameter names and shapes). No image, label, file path or dataset name is ever put in a
record. One flat array instead of one Array per parameter: Flower moves every Array as separate
objects (one HTTP request each), so a ViT's ~40 parameters cost ~80 requests per message.

Decoding a client's reply checks only its structure (records present, JSON readable); shapes,
dtypes and NaN/Inf are screened afterwards by :func:`medveil.federated.updates.screen_updates`
like any other update.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from medveil.errors import UpdateRejected
from medveil.federated.messages import (
    ClientUpdate,
    EvalReport,
    FitInstructions,
    JoinRequest,
    StateDict,
)

META = "meta"


def _records():
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    return Array, ArrayRecord, ConfigRecord, RecordDict


def _state_record(state: StateDict) -> tuple[Any, list[list[Any]]]:
    """(ArrayRecord with one flat array per dtype, layout [[name, shape, dtype], ...])."""
    Array, ArrayRecord, _, _ = _records()
    flat: dict[str, list[np.ndarray]] = {}
    layout = []
    for key, value in state.items():
        arr = value.detach().cpu().numpy()
        flat.setdefault(arr.dtype.str, []).append(arr.reshape(-1))
        layout.append([key, list(arr.shape), arr.dtype.str])
    record = ArrayRecord({dt: Array(np.concatenate(parts)) for dt, parts in flat.items()})
    return record, layout


def _state(record, layout: Any, where: str) -> StateDict:
    """Inverse of :func:`_state_record`; a layout that does not fit the data is rejected."""
    try:
        flat = {dt: arr.numpy() for dt, arr in record.items()}
        offsets = dict.fromkeys(flat, 0)
        state: StateDict = {}
        for key, shape, dt in layout:
            n = int(np.prod(shape, dtype=np.int64)) if shape else 1
            if n < 0 or any(int(d) < 0 for d in shape) or dt not in flat:
                raise ValueError
            chunk = flat[dt][offsets[dt]:offsets[dt] + n]
            if len(chunk) != n:
                raise ValueError
            offsets[dt] += n
            state[str(key)] = torch.from_numpy(np.array(chunk.reshape([int(d) for d in shape]), copy=True))
        if any(offsets[dt] != len(flat[dt]) for dt in flat):
            raise ValueError
    except (TypeError, ValueError, KeyError):
        raise UpdateRejected(f"{where}: arrays do not match their declared layout") from None
    return state


def _content(meta: dict[str, Any], **states: StateDict):
    _, _, ConfigRecord, RecordDict = _records()
    content = RecordDict()
    layouts = {}
    for name, state in states.items():
        content[name], layouts[name] = _state_record(state)
    content[META] = ConfigRecord({"json": json.dumps({**meta, "layout": layouts} if states else meta)})
    return content


def read_meta(content, where: str) -> dict[str, Any]:
    try:
        meta = json.loads(content.config_records[META]["json"])
    except (KeyError, TypeError, ValueError):
        raise UpdateRejected(f"{where}: reply without a readable '{META}' record") from None
    if not isinstance(meta, dict):
        raise UpdateRejected(f"{where}: '{META}' is not a JSON object")
    return meta


def _arrays(content, name: str, where: str) -> StateDict:
    layout = read_meta(content, where).get("layout", {}).get(name)
    try:
        record = content.array_records[name]
    except KeyError:
        raise UpdateRejected(f"{where}: reply without a '{name}' record") from None
    if not isinstance(layout, list):
        raise UpdateRejected(f"{where}: no layout for the '{name}' record")
    return _state(record, layout, f"{where} {name}")


def payload_bytes(content) -> int:
    """Bytes of a RecordDict's records (array data + keys + config), Flower's own count."""
    return int(sum(record.count_bytes() for record in content.values()))


# ---- server -> site ----------------------------------------------------------------------
def encode_join_query(site: dict[str, Any]):
    """Ask a site for its join request; ``site`` = the data options its split depends on."""
    return _content({"site": site})


def encode_instructions(ins: FitInstructions, **extra: Any):
    meta = {"client_name": ins.client_name, "stage": ins.stage, "model_config": ins.model_config, **extra}
    return _content(meta, backbone=ins.backbone, head=ins.head, **({"features": ins.features} if ins.features else {}))


def decode_instructions(content) -> tuple[FitInstructions, dict[str, Any]]:
    meta = read_meta(content, "server message")
    layout = meta.pop("layout", None) or {}
    ins = FitInstructions(client_name=meta.pop("client_name"), stage=int(meta.pop("stage")),
                          model_config=meta.pop("model_config"),
                          backbone=_arrays(content, "backbone", "server message"),
                          head=_arrays(content, "head", "server message"),
                          features=_arrays(content, "features", "server message") if "features" in layout else {})
    return ins, meta


# ---- site -> server ----------------------------------------------------------------------
def encode_join_request(req: JoinRequest):
    return _content({"client_name": req.client_name, "num_classes": req.num_classes, "task": req.task,
                     "class_names": list(req.class_names) if req.class_names else None})


def decode_join_request(content, where: str) -> JoinRequest:
    meta = read_meta(content, where)
    try:
        names = meta.get("class_names")
        return JoinRequest(client_name=str(meta["client_name"]), num_classes=int(meta["num_classes"]),
                           task=str(meta.get("task", "multi-class")),
                           class_names=tuple(str(n) for n in names) if names else None)
    except (KeyError, TypeError, ValueError):
        raise UpdateRejected(f"{where}: malformed join request") from None


def encode_update(update: ClientUpdate, evaluation: EvalReport | None = None):
    """The fine-tuned weights; with ``evaluation``, the report on the received model too."""
    meta = {"client_name": update.client_name, "stage": update.stage, "n_samples": update.n_samples,
            "metrics": update.metrics}
    if evaluation is not None:
        meta["evaluation"] = {"n_samples": evaluation.n_samples, "metrics": evaluation.metrics}
    return _content(meta, backbone=update.backbone, head=update.head)


def decode_update(content, where: str) -> tuple[ClientUpdate, EvalReport | None]:
    meta = read_meta(content, where)
    try:
        update = ClientUpdate(client_name=str(meta["client_name"]), stage=int(meta["stage"]),
                              backbone=_arrays(content, "backbone", where),
                              head=_arrays(content, "head", where),
                              n_samples=meta["n_samples"], metrics=dict(meta.get("metrics") or {}))
        ev = meta.get("evaluation")
        report = None if ev is None else EvalReport(update.client_name, update.stage, int(ev["n_samples"]),
                                                    dict(ev.get("metrics") or {}))
    except (KeyError, TypeError, ValueError):
        raise UpdateRejected(f"{where}: malformed update") from None
    return update, report


def encode_report(report: EvalReport):
    return _content({"client_name": report.client_name, "stage": report.stage,
                     "n_samples": report.n_samples, "metrics": report.metrics})


def decode_report(content, where: str) -> EvalReport:
    meta = read_meta(content, where)
    try:
        return EvalReport(client_name=str(meta["client_name"]), stage=int(meta["stage"]),
                          n_samples=int(meta["n_samples"]), metrics=dict(meta.get("metrics") or {}))
    except (KeyError, TypeError, ValueError):
        raise UpdateRejected(f"{where}: malformed evaluation report") from None
