"""The universal model's whole life on shipped data, through the CLI as a user runs it:
federate (the demo config, shortened) -> predict -> adapt to a dataset no site held -> predict
the new task -> export -> load back -> report."""

from __future__ import annotations

import csv

import pytest
import torch

from medveil.cli.main import main
from medveil.config_io import dumps_toml, read_toml
from medveil.data.samples import sample_path
from medveil.federated.demo import demo_config_path
from medveil.federated.universal import load_universal

pytestmark = pytest.mark.slow


def short_demo_config(tmp_path):
    """demo.toml with five of its six sites (skin / HAM10000 kept out for adapt) and short training."""
    raw = read_toml(demo_config_path())
    raw["clients"] = [c for c in raw["clients"] if c.get("sample") != "ham10000"]
    raw["data"].update(max_train=160, max_test=80, max_pool=40)
    raw["pretrain"]["epochs"] = 1
    raw["federation"]["rounds"] = 1
    raw["local"]["epochs"] = 1
    raw["curation"]["epochs"] = 1.0
    path = tmp_path / "short_demo.toml"
    path.write_text(dumps_toml(raw))
    return path


def rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_federate_predict_adapt_export_report(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["federate", "--config", str(short_demo_config(tmp_path)), "--out", str(run), "--quiet"]) == 0
    blood = str(sample_path("bloodmnist"))
    assert main(["predict", str(run / "model.pt"), blood, "--task", "blood", "--out", str(tmp_path / "p1.csv"),
                 "--quiet"]) == 0
    p1 = rows(tmp_path / "p1.csv")
    assert len(p1) > 0 and {"id", "predicted", "prob_basophil"} <= set(p1[0])

    # a site that was not in the federation, with a modality no site held (dermoscopy)
    skin = str(sample_path("ham10000"))
    adapted = run / "adapted.pt"
    capsys.readouterr()
    assert main(["adapt", str(run / "model.pt"), skin, "--name", "skin", "--mode", "probe",
                 "--out", str(adapted)]) == 0
    text = capsys.readouterr().out
    assert "test (universal start)" in text and "test (MIM-only start, same recipe)" in text
    model = load_universal(adapted)
    assert set(model.registry) == {"blood", "organ-ct", "retina", "breast-us", "chest-xray", "skin"}
    before = load_universal(run / "model.pt")
    x = torch.rand(3, 3, 28, 28)
    assert torch.equal(model.predict("blood", x), before.predict("blood", x))  # probe: others untouched
    assert main(["predict", str(adapted), skin, "--task", "skin", "--out", str(tmp_path / "p2.csv"), "--quiet"]) == 0
    assert rows(tmp_path / "p2.csv")[0]["predicted"] in model.registry["skin"].class_names

    # export, load back (as a universal model, and as a plain ViT checkpoint)
    exp = tmp_path / "export"
    assert main(["export", str(adapted), "--out", str(exp)]) == 0
    back = load_universal(exp)
    for task in model.registry:
        assert torch.equal(back.predict(task, x), model.predict(task, x))
    assert main(["model", "load-check", str(exp / "model.safetensors")]) == 0
    card = (exp / "README.md").read_text()
    assert "| skin | multi-class |" in card and "added later (adapt)" in card

    # the report a person reads
    assert main(["report", str(run), "--out", str(tmp_path / "report.html")]) == 0
    page = (tmp_path / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "data:image/png;base64," in page
    assert "chest-xray" in page and "Absent sites and rejected updates" in page
    assert "http://" not in page and "https://" not in page and "<script" not in page  # self-contained
