"""The training recipe's pieces: per-modality augmentation (seeded, safe flips), warm-up + cosine
schedule values, layer-wise learning-rate decay groups, stochastic depth, label smoothing, and
the site-alone CNN baselines."""

from __future__ import annotations

import math

import pytest
import torch
from fed_helpers import tiny_config

from medveil.data.augment import NO_AUGMENT, AugmentPolicy, policy_for
from medveil.data.dataset import Task
from medveil.errors import ConfigError
from medveil.evaluate.site_alone import SiteAloneRecipe, published_row, train_site_alone
from medveil.federated.sites import build_sites
from medveil.federated.training import TrainRecipe, param_groups, task_loss, train_classifier, warmup_cosine
from medveil.models import ViTConfig, VisionTransformer
from medveil.models.cnn import ResNet18, SmallCNN

ORGAN = ["bladder", "femur-left", "femur-right", "heart", "kidney-left"]


def test_policies_follow_the_modality():
    organ = policy_for("abdominal CT (axial)", ORGAN)
    assert not organ.hflip and not organ.vflip and organ.rotate_deg <= 10  # left/right in the labels
    chest = policy_for("paediatric chest X-ray", ["normal", "pneumonia"])
    assert not chest.hflip  # the heart's side
    blood = policy_for("blood-cell microscopy", ["basophil", "eosinophil"])
    assert blood.hflip and blood.vflip and blood.rotate_deg == 180 and blood.brightness <= 0.05
    fundus = policy_for("colour fundus", ["grade 0", "grade 1"])
    assert fundus.hflip and not fundus.vflip and fundus.contrast <= 0.05  # colour is diagnostic
    assert policy_for("dermoscopy", ["nv"], "none") is NO_AUGMENT
    flips = policy_for("dermoscopy", ["nv"], "flip")
    assert flips == AugmentPolicy(hflip=True, vflip=True)  # flips alone, nothing else
    assert policy_for("abdominal CT (axial)", ORGAN, "flip").is_identity
    with pytest.raises(ConfigError, match="augment must be"):
        policy_for("dermoscopy", ["nv"], "strong")
    for unknown in ("unknown", "DX", "CR/DX"):  # a DICOM code or no catalogue entry: never mirrored
        assert not policy_for(unknown, ["a", "b"]).hflip


def test_augmentation_is_seeded_and_stays_in_range():
    x = torch.rand(8, 3, 28, 28)
    policy = policy_for("dermoscopy", ["nv", "mel"])
    a = policy.apply(x, torch.Generator().manual_seed(1))
    b = policy.apply(x, torch.Generator().manual_seed(1))
    c = policy.apply(x, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == x.shape
    assert 0 <= a.min() and a.max() <= 1
    assert NO_AUGMENT.apply(x, torch.Generator()) is x


def test_a_pure_flip_mirrors_the_image():
    x = torch.rand(64, 1, 8, 8)
    out = AugmentPolicy(hflip=True).apply(x, torch.Generator().manual_seed(0))
    flipped = torch.isclose(out, x.flip(-1), atol=1e-5).flatten(1).all(1)
    same = torch.isclose(out, x, atol=1e-5).flatten(1).all(1)
    assert (flipped | same).all() and 10 < flipped.sum() < 54  # about half of them, each exactly


def test_warmup_cosine_values():
    assert [warmup_cosine(s, 10, 2) for s in (0, 1)] == [0.5, 1.0]
    assert warmup_cosine(2, 10, 2) == 1.0
    assert math.isclose(warmup_cosine(6, 10, 2), 0.5)
    assert warmup_cosine(9, 10, 2) > 0 and math.isclose(warmup_cosine(10, 10, 2), 0.0, abs_tol=1e-12)
    assert warmup_cosine(0, 4, 0) == 1.0


def test_layer_decay_groups():
    vit = VisionTransformer(ViTConfig(img_size=8, patch_size=4, embed_dim=16, depth=3, num_heads=2), 0)
    head = torch.nn.Linear(16, 3)
    recipe = TrainRecipe(lr=1.0, layer_decay=0.5, head_lr_scale=10.0)
    params, groups = param_groups(vit, head, recipe)
    lrs = [g["lr"] for g in groups]
    assert lrs == [0.5**4, 0.5**3, 0.5**2, 0.5**1, 1.0, 10.0]  # embed, blocks 0-2, norm, head
    assert groups[0]["params"][0] is vit.cls_token and groups[-1]["params"][0] is head.weight
    assert sum(len(g["params"]) for g in groups) == len(params)
    assert len(param_groups(vit, head, TrainRecipe())[1]) == 2  # no decay: one backbone group


def test_drop_path_only_while_training_and_seeded():
    vit = VisionTransformer(ViTConfig(img_size=8, patch_size=4, embed_dim=16, depth=3, num_heads=2), 0)
    x = torch.rand(6, 3, 8, 8)
    ref = vit.eval()(x)
    vit.set_drop_path(0.5)
    assert [b.drop_path for b in vit.blocks] == [0.0, 0.25, 0.5]
    assert torch.equal(vit(x), ref)  # eval: no drop
    vit.train()
    torch.manual_seed(0)
    a = vit(x)
    torch.manual_seed(0)
    assert torch.equal(vit(x), a) and not torch.allclose(a, ref)


def test_label_smoothing_and_recipe_checks():
    logits, y = torch.tensor([[4.0, 0.0]]), torch.tensor([0])
    assert task_loss(logits, y, Task.MULTICLASS, smoothing=0.2) > task_loss(logits, y, Task.MULTICLASS)
    with pytest.raises(ConfigError, match="schedule must be"):
        TrainRecipe(schedule="step").check()
    with pytest.raises(ConfigError, match="augment must be"):
        TrainRecipe(augment="yes").check()


def test_full_recipe_trains_deterministically(tmp_path):
    cfg = tiny_config(tmp_path)
    clients, _ = build_sites(cfg.clients, cfg.data, cfg.model.img_size, cfg.model.in_chans, cfg.seed)
    data = clients[0]
    recipe = TrainRecipe(epochs=2, batch_size=16, augment="auto", schedule="cosine", warmup_epochs=0.5,
                         label_smoothing=0.1, layer_decay=0.75, drop_path=0.1)

    def run() -> torch.Tensor:
        torch.manual_seed(0)
        vit, head = VisionTransformer(cfg.model, 0), torch.nn.Linear(cfg.model.embed_dim, data.num_classes)
        train_classifier(vit, head, data.x_train, data.y_train, data.task, recipe, seed=5,
                         augment=policy_for(data.modality, data.class_names, "auto"))
        assert all(b.drop_path == 0 for b in vit.blocks) and not vit.training
        return head.weight.detach().clone()

    assert torch.equal(run(), run())


def test_cnn_shapes_and_site_alone(tmp_path):
    x = torch.rand(4, 3, 28, 28)
    assert SmallCNN(3, 5)(x).shape == (4, 5) and ResNet18(3, 2)(x).shape == (4, 2)
    assert 0.3e6 < sum(p.numel() for p in SmallCNN(3, 8).parameters()) < 1e6
    assert 10e6 < sum(p.numel() for p in ResNet18(3, 8).parameters()) < 12e6
    cfg = tiny_config(tmp_path)
    clients, _ = build_sites(cfg.clients, cfg.data, cfg.model.img_size, cfg.model.in_chans, cfg.seed)
    recipe = SiteAloneRecipe(epochs=2, batch_size=16)
    a = train_site_alone("small_cnn", clients[0], recipe, seed=0)
    b = train_site_alone("small_cnn", clients[0], recipe, seed=0)
    assert a["acc"] == b["acc"] and a["n"] == len(clients[0].x_test) and a["cpu_seconds"] > 0
    assert published_row(clients[0]) is None


def test_evaluate_rejects_an_unknown_site_alone_cnn(tmp_path):
    from medveil.errors import MedVeilError
    from medveil.evaluate.federated_run import evaluate_run

    with pytest.raises(MedVeilError, match="--site-alone: unknown CNN 'vgg'"):
        evaluate_run(tmp_path, site_alone_archs=("vgg",))


def test_evaluate_puts_the_site_alone_beside_the_universal_model(tmp_path, capsys):
    import json

    from medveil.cli.main import main
    from medveil.federated.engine import run_federation

    run_federation(tiny_config(tmp_path, "fedavg", rounds=1), tmp_path / "run", progress=False)
    assert main(["evaluate", str(tmp_path / "run"), "--no-finetune", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "each site alone" in out and "small_cnn" in out and "published" in out
    result = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    alone = result["site_alone"]["small_cnn"]
    assert set(alone) == {"alpha", "beta"} and all(0 <= m["acc"] <= 1 and m["cpu_seconds"] > 0 for m in alone.values())
    assert result["published"] == {"alpha": None, "beta": None}  # no published figure for these sets
    # scored on val, the published test accuracies are left out of the table
    config = tmp_path / "run" / "config.toml"
    config.write_text(config.read_text().replace('eval_split = "test"', 'eval_split = "val"'))
    assert main(["evaluate", str(tmp_path / "run"), "--no-finetune", "--site-alone", "none", "--quiet"]) == 0
    result = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    assert result["eval_split"] == "val" and result["published"] == {}
