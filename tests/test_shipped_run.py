"""benchmarks/shipped_run.py: a finished, evaluated run folder becomes the shipped-config JSON
and its README table (a hand-made run folder with the fields the engine and `medveil evaluate` write)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import shipped_run  # noqa: E402


def _m(acc: float, bacc: float) -> dict[str, float]:
    return {"acc": acc, "bacc": bacc}


def test_collect_and_table_read_a_run_folder(tmp_path):
    sites = ("a", "b")
    (tmp_path / "config.toml").write_text('seed = 3\n[model]\nglobal_pool = "token+avg"\n')
    stages = [{"stage": 0, "kind": "pretrain", "seconds": 10.0, "cpu_seconds": 20.0},
              {"stage": 1, "kind": "federated", "seconds": 30.0, "cpu_seconds": 60.0,
               "clients": {s: {"test_before_calibration": _m(0.5, 0.4), "test": _m(0.8, 0.7)} for s in sites}}]
    (tmp_path / "metrics.json").write_text(json.dumps({"stages": stages}))
    evaluation = {"universal": {"a": _m(0.8, 0.7), "b": _m(0.6, 0.5)},
                  "final": {s: {"finetune": _m(0.9, 0.8)} for s in sites},
                  "mim_only": {s: {"finetune": _m(0.7, 0.6)} for s in sites},
                  "site_alone": {"small_cnn": {s: _m(0.75, 0.65) for s in sites}},
                  "published": {"a": 0.958, "b": None}}
    (tmp_path / "evaluation.json").write_text(json.dumps(evaluation))
    result = shipped_run.collect(tmp_path, "test", None, 5.0)
    assert result["federate_wall_s"] == 40.0  # no wall time given: the stages' seconds
    assert result["federate_cpu_min"] == 1.3
    assert result["config"]["model"]["global_pool"] == "token+avg"
    assert result["final"]["a"] == _m(0.8, 0.7) and result["before_calibration"]["b"] == _m(0.5, 0.4)
    lines = shipped_run.table(result).splitlines()
    assert lines[2] == "| universal (own head) | 0.800 / 0.700 | 0.600 / 0.500 | 0.700 / 0.600 |"
    assert lines[5] == "| small CNN alone | 0.750 / 0.650 | 0.750 / 0.650 | 0.750 / 0.650 |"
    assert lines[6] == "| published ResNet-18 (28, all train images, GPU) | 0.958 | - | |"
