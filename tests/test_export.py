"""medveil export (safetensors + config + model card + transformers folder) and reading the
transformers layout wherever a checkpoint is accepted."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from medveil.cli.main import main
from medveil.errors import MedVeilError
from medveil.federated.export import export_model
from medveil.federated.universal import TaskEntry, UniversalModel, load_universal
from medveil.models import ViTConfig, VisionTransformer
from medveil.models.checkpoint import load_vit_checkpoint, read_checkpoint
from medveil.models.hf_layout import from_hf, to_hf

transformers = pytest.importorskip("transformers")


def tiny_universal(stem: str = "patch", in_chans: int = 3) -> UniversalModel:
    torch.manual_seed(0)
    cfg = ViTConfig(img_size=16, patch_size=4, in_chans=in_chans, embed_dim=32, depth=2, num_heads=2,
                    decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, stem=stem)
    backbone = VisionTransformer(cfg).eval()
    with torch.no_grad():  # non-trivial norms and cls token, so every tensor is exercised
        for p in backbone.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    registry = {"blood": TaskEntry("blood", 3, "multi-class", ["a", "b", "c"]),
                "chest": TaskEntry("chest", 2, "binary", ["normal", "pneumonia"])}
    heads = {n: nn.Linear(32, e.num_classes) for n, e in registry.items()}
    return UniversalModel(cfg, backbone, heads, registry)


def run_folder(tmp_path, universal: UniversalModel):
    run = tmp_path / "run"
    universal.save(run / "model.pt")
    (run / "metrics.json").write_text(json.dumps({
        "config": {"seed": 7, "clients": [{"name": "blood", "path": "/data/bloodmnist.npz"},
                                          {"name": "chest", "path": "", "sample": "pneumoniamnist"}],
                   "model": universal.cfg.to_dict()},
        "strategy": "distill", "schedule": "parallel", "stages": [{}, {}, {}],
        "final": {"blood": {"acc": 0.91, "bacc": 0.9, "auc": 0.99, "n": 100},
                  "chest": {"acc": 0.8, "bacc": 0.75, "auc": 0.9, "n": 50}}}))
    return run


def test_export_round_trips_and_loads_in_transformers(tmp_path, capsys):
    universal = tiny_universal()
    run = run_folder(tmp_path, universal)
    out = tmp_path / "export"
    assert main(["export", str(run / "model.pt"), "--out", str(out)]) == 0
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert files == {"model.safetensors", "config.json", "README.md", "transformers/config.json",
                     "transformers/model.safetensors", "transformers/preprocessor_config.json"}
    x = torch.rand(4, 3, 16, 16)
    back = load_universal(out)  # the folder, or its model.safetensors
    for task in ("blood", "chest"):
        assert torch.equal(back.predict(task, x), universal.predict(task, x))
    assert back.registry == universal.registry
    config = json.loads((out / "config.json").read_text())
    assert config["vit"]["patch_size"] == 4 and config["normalisation"]["mean"][0] == pytest.approx(0.485)
    assert config["tasks"]["chest"]["class_names"] == ["normal", "pneumonia"]
    card = (out / "README.md").read_text()
    for text in ("| blood | multi-class | a, b, c |", "bloodmnist.npz", "0.910", "Seed 7",
                 "No differential privacy", "not for diagnosis"):
        assert text in card, text
    # the weights are timm names: load-check reads them with the stored config
    capsys.readouterr()
    assert main(["model", "load-check", str(out / "model.safetensors")]) == 0
    text = capsys.readouterr().out
    assert "dim 32 depth 2" in text and "finite True" in text
    # transformers reads the transformers/ folder and computes the same cls feature
    hf = transformers.ViTModel.from_pretrained(out / "transformers", add_pooling_layer=False).eval()
    with torch.no_grad():
        ref = hf(pixel_values=universal.backbone.normalize(x)).last_hidden_state[:, 0]
        torch.testing.assert_close(universal.backbone.forward_features(x), ref, atol=1e-5, rtol=1e-4)


def test_export_refuses_existing_out_and_bad_model(tmp_path):
    universal = tiny_universal(stem="conv")
    run = run_folder(tmp_path, universal)
    out = tmp_path / "export"
    out.mkdir()
    with pytest.raises(MedVeilError, match="exists; pass --overwrite"):
        export_model(run / "model.pt", out)
    s = export_model(run / "model.pt", out, overwrite=True)
    assert not s["transformers"] and not (out / "transformers").exists()  # conv stem: no HF twin
    assert "convolutional stem" in (out / "README.md").read_text()
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(load_universal(out).predict("blood", x), universal.predict("blood", x))
    bad = tmp_path / "bad.pt"
    bad.write_bytes((run / "model.pt").read_bytes()[:300])
    assert main(["export", str(bad), "--out", str(tmp_path / "e2")]) == 2
    assert not (tmp_path / "e2").exists() and not list(tmp_path.glob(".e2.*"))
    (tmp_path / "foreign.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(MedVeilError, match="not a readable safetensors"):
        load_universal(tmp_path / "foreign.safetensors")


@pytest.mark.parametrize("kind", ["vit", "mae"])
def test_transformers_folders_load_wherever_checkpoints_are_accepted(tmp_path, kind, capsys):
    """A folder written by transformers' save_pretrained (its current key spelling) loads by
    load-check and load_vit_checkpoint, with its config.json giving the shape."""
    kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
              image_size=16, patch_size=4, num_channels=3, layer_norm_eps=1e-6, qkv_bias=True)
    torch.manual_seed(0)
    if kind == "vit":
        hf = transformers.ViTModel(transformers.ViTConfig(**kw), add_pooling_layer=False)
    else:
        hf = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(
            **kw, decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
            decoder_intermediate_size=64, mask_ratio=0.0))
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.05)
    hf.eval().save_pretrained(tmp_path / "hf")
    sd, cfg = read_checkpoint(tmp_path / "hf")
    assert "blocks.1.attn.qkv.weight" in sd and cfg["embed_dim"] == 32 and cfg["depth"] == 2
    vit = VisionTransformer(ViTConfig(**{k: cfg[k] for k in ("img_size", "patch_size", "in_chans", "embed_dim",
                                                             "depth", "num_heads", "mlp_ratio")})).eval()
    report = load_vit_checkpoint(tmp_path / "hf", vit)
    assert any("transformers ViT names" in n for n in report.notes)
    x = torch.rand(2, 3, 16, 16)
    encoder = hf if kind == "vit" else hf.vit
    with torch.no_grad():
        ref = encoder(pixel_values=vit.normalize(x)).last_hidden_state[:, 0]
        torch.testing.assert_close(vit.forward_features(x), ref, atol=1e-5, rtol=1e-4)
    capsys.readouterr()
    assert main(["model", "load-check", str(tmp_path / "hf")]) == 0
    assert "transformers ViT names mapped" in capsys.readouterr().out


def test_hf_layout_round_trip_both_spellings():
    vit = tiny_universal().backbone
    sd = vit.state_dict()
    old = to_hf(sd, prefix="vit.")  # 4.x spelling, separate query / key / value
    assert "vit.encoder.layer.0.attention.attention.query.weight" in old
    back = from_hf(old)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
