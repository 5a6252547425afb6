"""medveil.io: files appear whole or not at all."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from medveil.io import atomic_file, jsonable, save_torch_atomic, write_json_atomic, write_text_atomic


def test_failed_write_leaves_old_file_and_no_temporaries(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "report.json"
    write_text_atomic(target, "old\n")
    with pytest.raises(RuntimeError):
        with atomic_file(target, "w") as fh:
            fh.write("half of the new")
            raise RuntimeError("killed")
    assert target.read_text() == "old\n"
    assert [p.name for p in target.parent.iterdir()] == ["report.json"]


def test_json_is_strict_and_torch_round_trips(tmp_path: Path) -> None:
    obj = {"a": float("nan"), "b": (1, np.float32(2.5)), "c": np.arange(3), "d": torch.tensor(4.0),
           "e": Path("x/y"), 7: math.inf}
    assert jsonable(obj) == {"a": None, "b": [1, 2.5], "c": [0, 1, 2], "d": 4.0, "e": "x/y", "7": None}
    path = write_json_atomic(tmp_path / "m.json", obj)
    assert json.loads(path.read_text())["b"] == [1, 2.5]  # strict JSON: no NaN tokens
    state = {"w": torch.arange(6.0).view(2, 3)}
    loaded = torch.load(save_torch_atomic(tmp_path / "ck.pt", state), weights_only=True)
    assert torch.equal(loaded["w"], state["w"])
    assert (tmp_path / "ck.pt").stat().st_mode & 0o777 == 0o644
