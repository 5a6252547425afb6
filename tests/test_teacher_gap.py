"""benchmarks/teacher_gap.py: a finished run's last updates (the teachers), its universal model and
the site alone, scored on the val split (a tiny distill federation)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from medveil.federated.engine import run_federation
from medveil.federated.universal import load_universal

from fed_helpers import tiny_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import teacher_gap  # noqa: E402


def test_teacher_gap_scores_teachers_universal_and_alone_on_val(tmp_path, capsys):
    cfg = tiny_config(tmp_path, strategy="distill", rounds=1, federation={"calibrate_heads": True})
    run = tmp_path / "run"
    run_federation(cfg, run, progress=False)
    result = teacher_gap.teacher_gap(run)
    assert set(result["sites"]) == {"alpha", "beta"} and result["left_out"] == []
    for name, r in result["sites"].items():
        assert r["stage"] == 1 and r["n_val"] == {"alpha": 12, "beta": 10}[name]  # the val split, not test
        assert all(0.0 <= r[k]["acc"] <= 1.0 for k in ("teacher", "teacher_refit", "universal", "alone"))
    # the teacher is the last update, not the universal model: its own weights give its figure
    updates = torch.load(run / "checkpoints" / "updates.pt", weights_only=True)
    assert not torch.equal(updates["alpha"]["head"]["weight"], load_universal(run / "model.pt").heads["alpha"].weight)
    assert teacher_gap.main([str(tmp_path / "nowhere")]) == 2
    assert "no checkpoints/updates.pt" in capsys.readouterr().err
    (run / "complete").rename(run / "was_complete")
    assert teacher_gap.main([str(run)]) == 2 and "not a complete federated run" in capsys.readouterr().err
    (run / "was_complete").rename(run / "complete")
    last = torch.load(run / "checkpoints" / "updates.pt", weights_only=True)
    del last["beta"]
    torch.save(last, run / "checkpoints" / "updates.pt")  # beta absent from the last stage
    assert teacher_gap.teacher_gap(run)["left_out"] == ["beta"]
    assert teacher_gap.main([str(run), "--out", str(tmp_path / "gap.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert (tmp_path / "gap.json").is_file() and len(lines) == 5
    assert lines[-2].startswith("mean | ") and lines[-1] == "left out (no update in the last stage): beta"
