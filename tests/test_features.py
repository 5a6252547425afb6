"""Feature networks (random / trained / file / ViT) and FID / KID / nearest-real fidelity metrics."""

from __future__ import annotations

import pytest
import torch

import medveil.generative.feature_training as ft
from medveil.errors import ConfigError, DataError
from medveil.evaluate.fidelity import FeatureModule, fidelity_metrics, metrics_from_embeddings, nearest_real
from medveil.generative.feature_training import FeatureTrainConfig, train_feature_net
from medveil.models.features import ConvFeatureNet, build_feature_net
from medveil.models.vit import ViTConfig, VisionTransformer


def _blobs(n: int, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two visibly different classes: smooth horizontal vs vertical gradients plus noise."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, size)
    labels = torch.arange(n) % 2
    x = torch.where(labels.view(-1, 1, 1, 1) == 0, ramp.view(1, 1, 1, size), ramp.view(1, 1, size, 1))
    x = x.expand(n, 3, size, size) * 0.6 + 0.2 + 0.05 * torch.randn(n, 3, size, size, generator=g)
    return x.clamp(0, 1), labels


def test_random_conv_shapes_determinism_and_frozen():
    net = build_feature_net("random-conv:seed=0")
    x = torch.rand(2, 3, 32, 32)
    assert net.embed(x).shape == (2, 32 + 64 + 128 + 256)
    assert net.feature_maps(x).shape == (2, 32, 32, 32)
    assert net.embed(x[:, :1]).shape == (2, net.dim)  # grey is repeated to RGB
    maps, emb = net.features(x)  # one shared pass == the two separate calls
    assert torch.allclose(maps, net.feature_maps(x)) and torch.allclose(emb, net.embed(x))
    with pytest.raises(DataError, match="got \\(2, 4, 32, 32\\)"):
        net.embed(torch.rand(2, 4, 32, 32))

    state = torch.get_rng_state()
    again = build_feature_net("random-conv:seed=0")
    assert torch.equal(torch.get_rng_state(), state)  # building does not move the global RNG
    assert torch.equal(net.embed(x), again.embed(x))
    assert not torch.allclose(net.embed(x), build_feature_net("random-conv:seed=1").embed(x))
    assert build_feature_net("random-conv:seed=0,width=8").dim == 8 + 16 + 32 + 64

    assert all(not p.requires_grad for p in net.parameters())
    net.train()
    assert not net.training
    xg = x.clone().requires_grad_(True)
    net.feature_maps(xg).pow(2).mean().backward()  # gradients reach the input, not the weights
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())
    d = net.describe()
    assert d["name"] == "random-conv:seed=0,width=32" and d["weights_sha256"] is None


def test_bad_specs_are_one_line_config_errors(tmp_path):
    for spec in ("inception", "random-conv:seed=x", "random-conv:depth=3", "conv:" + str(tmp_path / "no.pt")):
        with pytest.raises(ConfigError):
            build_feature_net(spec)
    junk = tmp_path / "junk.pt"
    torch.save({"hello": 1}, junk)
    with pytest.raises(ConfigError, match="not a MedVeil conv feature-net file"):
        build_feature_net(f"conv:{junk}")
    with pytest.raises(ConfigError, match="not a MedVeil ViT checkpoint"):
        build_feature_net(f"vit:{junk}")


def test_trained_net_saves_loads_and_resumes(tmp_path, monkeypatch):
    x, y = _blobs(24)
    cfg = FeatureTrainConfig(epochs=2, batch_size=8, widths=(8, 16), seed=3)
    net = train_feature_net(x, y, tmp_path / "sup.pt", cfg, progress=False)
    loaded = build_feature_net(f"conv:{tmp_path / 'sup.pt'}")
    assert torch.equal(net.embed(x), loaded.embed(x))
    d = loaded.describe()
    assert d["source"] == "trained-supervised" and len(d["weights_sha256"]) == 64
    assert not (tmp_path / "sup.pt.train-ckpt").exists()

    # self-supervised run killed in epoch 2, then resumed: identical weights to an unbroken run
    full = train_feature_net(x, None, tmp_path / "a.pt", cfg, progress=False)
    real_augment, calls = ft.augment, {"n": 0}

    def dying_augment(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 8:  # 3 batches x 2 views per epoch: dies inside epoch 2
            raise KeyboardInterrupt
        return real_augment(*args, **kwargs)

    monkeypatch.setattr(ft, "augment", dying_augment)
    with pytest.raises(KeyboardInterrupt):
        train_feature_net(x, None, tmp_path / "b.pt", cfg, progress=False)
    assert (tmp_path / "b.pt.train-ckpt").exists() and not (tmp_path / "b.pt").exists()
    monkeypatch.setattr(ft, "augment", real_augment)
    resumed = train_feature_net(x, None, tmp_path / "b.pt", cfg, progress=False)
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_vit_checkpoint_as_feature_net(tmp_path):
    cfg = ViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    torch.manual_seed(0)
    vit = VisionTransformer(cfg)
    torch.save({"vit_config": cfg.to_dict(), "model": vit.state_dict()}, tmp_path / "vit.pt")
    net = build_feature_net(f"vit:{tmp_path / 'vit.pt'}")
    x = torch.rand(3, 3, 32, 32)  # resized to the ViT's 16 px inside
    assert net.embed(x).shape == (3, 32)
    assert net.feature_maps(x).shape == (3, 32, 4, 4)
    assert torch.allclose(net.embed(x), vit.forward_features(torch.nn.functional.interpolate(
        x, size=(16, 16), mode="bilinear", align_corners=False)), atol=1e-6)
    assert net.describe()["vit_config"]["embed_dim"] == 32
    maps, emb = net.features(x)
    assert torch.allclose(maps, net.feature_maps(x)) and torch.allclose(emb, net.embed(x))


def test_fid_kid_self_zero_noise_large():
    net = build_feature_net("random-conv:seed=0,width=8")
    real, _ = _blobs(64, size=16)
    same = fidelity_metrics(real, real, net, kid_subset_size=32, kid_subsets=20)
    assert abs(same["fid"]) < 1e-3 and abs(same["kid_mean"]) < 1e-2
    assert same["nn_real_distance_mean"] < 1e-4
    noise = torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    far = fidelity_metrics(real, noise, net, kid_subset_size=32, kid_subsets=20)
    assert far["fid"] > 100 * max(abs(same["fid"]), 1e-3) and far["fid"] > 1.0
    assert far["kid_mean"] > 0.1 and far["nn_real_distance_min"] > 0.1
    assert far["feature_net"] == "random-conv:seed=0,width=8" and far["feature_net_info"]["seed"] == 0
    assert len(far["nn_real_distance"]) == 64
    # uint8 input equals float input up to quantisation; KID subsets reproducible by seed
    q = fidelity_metrics(real, (noise * 255).round().to(torch.uint8), net, kid_subset_size=32, kid_subsets=20)
    assert q["fid"] == pytest.approx(far["fid"], rel=1e-2) and q["kid_mean"] == pytest.approx(far["kid_mean"], rel=1e-2)
    with pytest.raises(DataError, match="at least 2"):
        fidelity_metrics(real, noise[:1], net)


def test_feature_module_for_torchmetrics_and_nearest_real():
    net = ConvFeatureNet((8,), seed=0)
    m = FeatureModule(net)
    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(m((x * 255).round().to(torch.uint8)), m(x), atol=0.05)
    emb = torch.randn(40, 5, generator=torch.Generator().manual_seed(0))
    m = metrics_from_embeddings(emb, emb + 3.0, kid_subset_size=20, kid_subsets=5)
    assert m["fid"] == pytest.approx(5 * 9.0, rel=1e-3)  # shifted copy: FID = ||mean shift||^2
    dist, idx = nearest_real(torch.tensor([[0.0, 0.0], [10.0, 0.0]]), torch.tensor([[9.0, 0.0], [0.0, 1.0]]))
    assert idx.tolist() == [1, 0] and dist.tolist() == pytest.approx([1.0, 1.0])
