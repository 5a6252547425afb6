"""medveil adapt: a new site's head on the universal backbone (probe or fine-tune), its bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from fed_helpers import make_npz

from medveil.cli.main import main
from medveil.errors import MedVeilError
from medveil.evaluate.adapt import PROBE_CS, adapt
from medveil.federated.universal import TaskEntry, UniversalModel, load_universal
from medveil.models import ViTConfig, VisionTransformer


def tiny_model(tmp_path):
    torch.manual_seed(0)
    cfg = ViTConfig(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2,
                    decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    reg = {"alpha": TaskEntry("alpha", 2, "binary", ["no", "yes"])}
    path = UniversalModel(cfg, VisionTransformer(cfg).eval(), {"alpha": nn.Linear(32, 2)}, reg).save(
        tmp_path / "model.pt")
    return path


def test_probe_adds_a_task_and_keeps_the_others(tmp_path):
    model = tiny_model(tmp_path)
    data = make_npz(tmp_path / "bands.npz", 3, 90, seed=4)
    s = adapt(model, data, "bands", "probe", tmp_path / "new.pt")
    assert s["probe_C"] in PROBE_CS and set(s["val_bacc_by_C"]) == set(PROBE_CS)
    assert s["val_from"] == "its val split" and s["train"] == 90 and s["dropped_tasks"] == []
    assert s["test_metrics"]["acc"] > 0.8  # a bright band per class: linearly separable features
    new, old = load_universal(tmp_path / "new.pt"), load_universal(model)
    assert list(new.registry) == ["alpha", "bands"] and len(new.registry["bands"].class_names) == 3
    x = torch.rand(4, 1, 16, 16)
    assert torch.equal(new.predict("alpha", x), old.predict("alpha", x))


def test_finetune_says_it_drops_the_other_tasks(tmp_path, capsys):
    model = tiny_model(tmp_path)
    data = make_npz(tmp_path / "bands.npz", 2, 40, seed=5, colour=True)  # RGB into a grey model
    assert main(["adapt", str(model), str(data), "--name", "bands", "--mode", "finetune",
                 "--out", str(tmp_path / "ft.pt")]) == 0
    out = capsys.readouterr().out
    assert "dropped alpha" in out and "converted" in out
    assert "LP-FT" in out  # by default the fine-tune starts from the probe's head
    assert list(load_universal(tmp_path / "ft.pt").registry) == ["bands"]
    assert main(["adapt", str(model), str(data), "--name", "bands", "--mode", "finetune", "--head-start", "random",
                 "--out", str(tmp_path / "ft_random.pt")]) == 0
    assert "LP-FT" not in capsys.readouterr().out


def test_adapt_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    model = tiny_model(tmp_path)
    good = make_npz(tmp_path / "good.npz", 2, 20, seed=6)
    one = tmp_path / "one.npz"
    arrays = dict(np.load(good))
    arrays["train_labels"] = np.zeros_like(arrays["train_labels"])
    np.savez(one, **arrays)
    (tmp_path / "exists.pt").write_bytes(b"x")
    cases = [([str(model), str(one), "--name", "n", "--out", str(tmp_path / "a.pt")], "single class"),
             ([str(model), str(good), "--name", "alpha", "--out", str(tmp_path / "b.pt")], "already in"),
             ([str(model), str(good), "--name", "n", "--out", str(tmp_path / "exists.pt")], "--overwrite"),
             ([str(tmp_path / "nope.pt"), str(good), "--name", "n", "--out", str(tmp_path / "c.pt")], "not found")]
    for argv, message in cases:
        capsys.readouterr()
        assert main(["adapt", *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.pt", "good.npz", "model.pt", "one.npz"]
    with pytest.raises(MedVeilError, match="plain task name"):
        adapt(model, good, "../x", "probe", tmp_path / "d.pt")
