"""The federated core's contracts: typed stage records read and write the metrics.json layout
of runs made before they existed; one client entry point (``client.serve``) for every kind of
work; robust aggregation without Flower, with Flower's arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fed_helpers import tiny_config

from medveil.federated.client import CALIBRATE, EVALUATE, FIT, ClientJob, serve
from medveil.federated.curation import robust_average
from medveil.federated.records import SiteStageRecord, StageRecord, stages_from_json, stages_to_json
from medveil.federated.stages import prepare
from medveil.federated.training import TrainRecipe

OLD_RUN = Path(__file__).parent / "data" / "metrics_untyped_records.json"


def test_records_read_and_write_the_untyped_layout_exactly():
    """metrics.json stages written by the untyped records (before this module existed): read
    back and written again, the same JSON, key order included (old run folders resume)."""
    old = json.loads(OLD_RUN.read_text())["stages"]
    assert [s["kind"] for s in old] == ["pretrain", "federated", "federated"]
    again = stages_to_json(stages_from_json(old))
    assert json.dumps(again) == json.dumps(old)
    last = stages_from_json(old)[-1]
    assert isinstance(last.clients["blood"], SiteStageRecord)
    assert last.clients["blood"].test_before_calibration["acc"] == old[-1]["clients"]["blood"][
        "test_before_calibration"]["acc"]
    assert last.calibration["calibrated"] == list(last.clients)


def test_stage_record_round_trip_with_absent_rejected_and_pending():
    from medveil.federated.updates import Rejection

    rec = StageRecord.federated(3, "distill", "parallel", ["a", "b"])
    rec.site("a").bytes["fit_down"] = 10
    rec.site("a").joined_now = True
    rec.absent["c"] = "not connected"
    rec.rejected.append(Rejection("b", 3, "NaN or Inf in head.weight"))
    rec.evaluation, rec.evaluate_next = "pending", ["a"]
    d = rec.to_json()
    assert d["absent"] == [{"client": "c", "reason": "not connected"}]
    assert d["rejected"] == [{"client": "b", "stage": 3, "reason": "NaN or Inf in head.weight"}]
    assert d["clients"] == {"a": {"bytes": {"fit_down": 10}, "joined_now": True}}
    assert StageRecord.from_json(json.loads(json.dumps(d))) == rec


def test_serve_does_each_kind_of_work(tmp_path):
    fed = prepare(tiny_config(tmp_path, "fedavg", rounds=1))
    data = fed.clients[0]
    ins = fed.server.join(fed.transport.join_request(data.name), 1, seed=0)
    recipe = TrainRecipe(epochs=1, batch_size=16)
    only_eval = serve(data, ClientJob(ins, EVALUATE))
    assert only_eval.update is None and only_eval.report.n_samples == len(data.x_test)
    fit = serve(data, ClientJob(ins, FIT, seed=1, recipe=recipe, evaluate_first=True))
    assert fit.report.metrics == only_eval.report.metrics  # the received model, before training
    assert set(fit.update.backbone) == set(ins.backbone) and fit.update.n_samples == len(data.x_train)
    cal = serve(data, ClientJob(ins, CALIBRATE, seed=1, recipe=recipe))
    assert cal.report is None and cal.update.backbone == {} and set(cal.update.head) == {"weight", "bias"}
    with pytest.raises(ValueError, match="needs a training recipe"):
        ClientJob(ins, FIT)
    with pytest.raises(ValueError, match="unknown client work"):
        ClientJob(ins, "distil")


def _states(k: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(3, 4, generator=g), "steps": torch.tensor(i)} for i in range(k)]


def test_robust_average_without_flower():
    states = [{"w": torch.tensor([1.0, 10.0]), "n": torch.tensor(1)},
              {"w": torch.tensor([2.0, -5.0]), "n": torch.tensor(2)},
              {"w": torch.tensor([3.0, 0.0]), "n": torch.tensor(3)},
              {"w": torch.tensor([100.0, 1.0]), "n": torch.tensor(4)}]
    med = robust_average(states, "median")
    torch.testing.assert_close(med["w"], torch.tensor([2.5, 0.5]))  # mean of the two middle values
    assert med["n"] is states[0]["n"]  # non-floating tensors: from the first state
    trimmed = robust_average(states, "trimmed_mean", trim_fraction=0.25)  # cut 1 of 4 at each end
    torch.testing.assert_close(trimmed["w"], torch.tensor([2.5, 0.5]))


@pytest.mark.parametrize("k", [3, 4, 7])
def test_robust_average_equals_flowers_aggregates(k):
    flwr_aggregate = pytest.importorskip("flwr.server.strategy.aggregate")
    states = _states(k, seed=k)
    results = [([s["w"].double().numpy()], 1) for s in states]
    np.testing.assert_array_equal(robust_average(states, "median")["w"].double().numpy(),
                                  flwr_aggregate.aggregate_median(results)[0].astype(np.float32))
    np.testing.assert_array_equal(
        robust_average(states, "trimmed_mean", 0.2)["w"].double().numpy(),
        flwr_aggregate.aggregate_trimmed_avg(results, proportiontocut=0.2)[0].astype(np.float32))
