"""ViT / MAE models and checkpoint loading (tiny sizes, a few seconds on 2 cores)."""

from __future__ import annotations

import pytest
import torch

from medveil.errors import MedVeilError
from medveil.models import MaskedAutoencoderViT, ViTConfig, VisionTransformer
from medveil.models.checkpoint import load_vit_checkpoint, read_checkpoint, save_checkpoint
from medveil.models.hf_layout import from_hf as hf_to_mae_keys
from medveil.models.layers import sincos_pos_embed


def small_cfg(**kw) -> ViTConfig:
    base = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2,
                decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    base.update(kw)
    return ViTConfig(**base)


def expected_keys(cfg: ViTConfig, decoder: bool, head: bool) -> list[str]:
    """The timm / MAE models_mae.py state-dict keys, written out independently."""
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    per_block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                 "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                 "mlp.fc2.weight", "mlp.fc2.bias"]
    keys += [f"blocks.{i}.{k}" for i in range(cfg.depth) for k in per_block]
    keys += ["norm.weight", "norm.bias"]
    if head:
        keys += ["head.weight", "head.bias"]
    if decoder:
        keys += ["mask_token", "decoder_pos_embed", "decoder_embed.weight", "decoder_embed.bias"]
        keys += [f"decoder_blocks.{i}.{k}" for i in range(cfg.decoder_depth) for k in per_block]
        keys += ["decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"]
    return sorted(keys)


# ---- shapes and keys -------------------------------------------------------------------------
def test_key_names_match_timm_mae_layout():
    cfg = small_cfg()
    assert sorted(VisionTransformer(cfg).state_dict()) == expected_keys(cfg, decoder=False, head=False)
    assert sorted(VisionTransformer(cfg, num_classes=5).state_dict()) == expected_keys(cfg, False, True)
    assert sorted(MaskedAutoencoderViT(cfg).state_dict()) == expected_keys(cfg, decoder=True, head=False)


def test_presets_and_config_round_trip():
    tiny, base = ViTConfig.tiny(28, 1), ViTConfig.base16()
    assert (tiny.embed_dim, tiny.depth, tiny.num_heads, tiny.patch_size, tiny.grid_size) == (192, 6, 3, 4, 7)
    assert (base.embed_dim, base.depth, base.num_heads, base.patch_size, base.img_size) == (768, 12, 12, 16, 224)
    assert (base.decoder_embed_dim, base.decoder_depth, base.decoder_num_heads) == (512, 8, 16)
    assert ViTConfig.from_dict(base.to_dict()) == base
    with pytest.raises(MedVeilError, match="bogus"):
        ViTConfig.from_dict({"bogus": 1})


@pytest.mark.parametrize("img_size,in_chans", [(16, 3), (28, 1)])
def test_vit_shapes(img_size, in_chans):
    cfg = small_cfg(img_size=img_size, in_chans=in_chans)
    x = torch.rand(3, in_chans, img_size, img_size)
    vit = VisionTransformer(cfg, num_classes=7)
    assert vit.forward_features(x).shape == (3, 32)
    assert vit(x).shape == (3, 7)
    assert VisionTransformer(cfg)(x).shape == (3, 32)  # Identity head
    mae = MaskedAutoencoderViT(cfg)
    loss, pred, mask = mae(x)
    L = (img_size // 4) ** 2
    assert loss.ndim == 0 and pred.shape == (3, L, 16 * in_chans) and mask.shape == (3, L)


def test_wrong_input_shape_is_one_line_error():
    vit = VisionTransformer(small_cfg(img_size=16, in_chans=1))
    with pytest.raises(MedVeilError, match=r"expects images \(1, 16, 16\), got \(3, 16, 16\)"):
        vit(torch.rand(2, 3, 16, 16))
    with pytest.raises(MedVeilError, match="got \\(1, 28, 28\\)"):
        vit(torch.rand(2, 1, 28, 28))


def test_tiny_preset_28px_grey_runs():
    cfg = ViTConfig.tiny(img_size=28, in_chans=1)
    mae = MaskedAutoencoderViT(cfg)
    loss, pred, mask = mae(torch.rand(2, 1, 28, 28))
    assert pred.shape == (2, 49, 16) and torch.isfinite(loss)
    assert (mask.sum(1) == 49 - int(49 * 0.25)).all()


def test_sincos_table_matches_transformers_mae():
    from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding

    ref = build_2d_sinusoidal_position_embedding(7, 7, 32, cls_token=True)
    ref = torch.cat([ref[:, 16:], ref[:, :16]], dim=1)  # the layout of the released MAE weights
    torch.testing.assert_close(sincos_pos_embed(32, 7)[0], ref, atol=1e-6, rtol=0)


# ---- masking and loss ------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.0])
def test_masking_keeps_one_minus_ratio(ratio):
    x = torch.randn(4, 16, 8)
    visible, mask, ids_restore = MaskedAutoencoderViT.random_masking(x, ratio)
    keep = int(16 * (1 - ratio))
    assert visible.shape == (4, keep, 8)
    assert (mask.sum(1) == 16 - keep).all()
    for b in range(4):  # the visible tokens are exactly the unmasked ones
        kept = x[b][mask[b] == 0]
        assert torch.equal(torch.sort(visible[b], dim=0).values, torch.sort(kept, dim=0).values)
    assert torch.equal(torch.sort(ids_restore, 1).values, torch.arange(16).expand(4, -1))


def test_loss_only_on_masked_patches():
    torch.manual_seed(0)
    mae = MaskedAutoencoderViT(small_cfg())
    imgs = torch.rand(2, 3, 16, 16)
    loss, pred, mask = mae(imgs)
    target = mae.patchify(mae.normalize(imgs))
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = (pred - target).pow(2).mean(-1)
    torch.testing.assert_close(loss, per_patch[mask.bool()].mean())
    # perturbing predictions of visible patches changes nothing
    pred2 = pred.detach().clone()
    pred2[~mask.bool()] += 10.0
    torch.testing.assert_close(mae.forward_loss(mae.normalize(imgs), pred2, mask), loss.detach())


def test_patchify_round_trip():
    mae = MaskedAutoencoderViT(small_cfg(in_chans=3))
    imgs = torch.rand(2, 3, 16, 16)
    assert torch.equal(mae.unpatchify(mae.patchify(imgs)), imgs)


def test_determinism_under_seed():
    def run():
        torch.manual_seed(123)
        mae = MaskedAutoencoderViT(small_cfg())
        loss, pred, mask = mae(torch.rand(2, 3, 16, 16))
        return loss, pred, mask

    a, b = run(), run()
    for t1, t2 in zip(a, b):
        assert torch.equal(t1, t2)


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_loss_decreases_with_training(stem):
    torch.manual_seed(0)
    cfg = small_cfg(stem=stem)
    mae = MaskedAutoencoderViT(cfg)
    imgs = torch.rand(8, 3, 16, 16)
    opt = torch.optim.AdamW(mae.parameters(), lr=3e-3)
    noise = torch.rand(8, 16)  # fixed mask: a pure fitting test
    losses = []
    for _ in range(25):
        loss, _, _ = mae(imgs, noise=noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert not any(p.requires_grad for p in (mae.pos_embed, mae.decoder_pos_embed))
    # the encoder round-trips into a plain ViT (the conv stem's keys included)
    vit = VisionTransformer(cfg)
    vit.load_state_dict(mae.encoder_state_dict())
    mae.eval()
    x = torch.rand(2, 3, 16, 16)
    latent, _, _ = mae.forward_encoder(mae.normalize(x), mask_ratio=0.0)
    torch.testing.assert_close(vit.forward_features(x), latent[:, 0])


def test_encoder_state_dict_round_trip():
    torch.manual_seed(0)
    cfg = small_cfg()
    mae = MaskedAutoencoderViT(cfg)
    vit = VisionTransformer(cfg, num_classes=4)
    result = vit.load_state_dict(mae.encoder_state_dict(), strict=False)
    assert result.unexpected_keys == [] and sorted(result.missing_keys) == ["head.bias", "head.weight"]
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(vit.forward_features(x), mae.forward_features(x))
    # the encoder path of the MAE at mask ratio 0 gives the same cls feature
    latent, _, _ = mae.forward_encoder(mae.normalize(x), mask_ratio=0.0)
    torch.testing.assert_close(latent[:, 0], vit.forward_features(x), atol=1e-5, rtol=1e-5)


# ---- against transformers' ViT-MAE (independent implementation) -------------------------------
def hf_mae(cfg: ViTConfig):
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    hcfg = ViTMAEConfig(
        hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
        intermediate_size=int(cfg.embed_dim * cfg.mlp_ratio), image_size=cfg.img_size,
        patch_size=cfg.patch_size, num_channels=cfg.in_chans, decoder_hidden_size=cfg.decoder_embed_dim,
        decoder_num_hidden_layers=cfg.decoder_depth, decoder_num_attention_heads=cfg.decoder_num_heads,
        decoder_intermediate_size=int(cfg.decoder_embed_dim * cfg.mlp_ratio), mask_ratio=0.75,
        norm_pix_loss=cfg.norm_pix_loss, layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True,
    )
    torch.manual_seed(1)
    model = ViTMAEForPreTraining(hcfg).eval()
    with torch.no_grad():  # random weights everywhere, so every tensor is exercised
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model


def test_matches_transformers_vitmae_via_checkpoint(tmp_path):
    cfg = ViTConfig.tiny(img_size=16, in_chans=3)
    cfg.depth = 2
    hf = hf_mae(cfg)
    ckpt = tmp_path / "mae_timm_layout.pth"
    sd = {f"module.{k}": v for k, v in hf_to_mae_keys(hf.state_dict()).items()}
    torch.save({"model": sd, "epoch": 3}, ckpt)

    ours = MaskedAutoencoderViT(cfg).eval()
    report = load_vit_checkpoint(ckpt, ours)
    assert report.missing == [] and report.dropped == []
    x = torch.rand(4, 3, 16, 16)
    noise = torch.rand(4, 16)
    with torch.no_grad():
        loss, pred, mask = ours(x, noise=noise)
        ref = hf(pixel_values=ours.normalize(x), noise=noise)
    torch.testing.assert_close(mask, ref.mask)
    torch.testing.assert_close(pred, ref.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss, ref.loss, atol=1e-4, rtol=1e-4)

    # encoder only: features equal the transformers encoder's cls output (no masking)
    vit = VisionTransformer(cfg, num_classes=3).eval()
    report = load_vit_checkpoint(ckpt, vit)
    assert sorted(report.missing) == ["head.bias", "head.weight"]
    assert any(k.startswith("decoder_") for k in report.dropped)
    hf.config.mask_ratio = 0.0
    with torch.no_grad():
        feats = vit.forward_features(x)
        ref_feats = hf.vit(pixel_values=vit.normalize(x)).last_hidden_state[:, 0]
    torch.testing.assert_close(feats, ref_feats, atol=1e-4, rtol=1e-4)


def test_matches_transformers_vitmodel_features(tmp_path):
    from transformers import ViTConfig as HFViTConfig
    from transformers import ViTModel

    cfg = ViTConfig.tiny(img_size=16, in_chans=1)
    cfg.depth = 2
    hf = ViTModel(HFViTConfig(hidden_size=192, num_hidden_layers=2, num_attention_heads=3,
                              intermediate_size=768, image_size=16, patch_size=4, num_channels=1,
                              layer_norm_eps=1e-6, hidden_act="gelu"), add_pooling_layer=False).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.05)
    ckpt = tmp_path / "vit.pt"
    torch.save({"state_dict": hf_to_mae_keys(hf.state_dict())}, ckpt)
    vit = VisionTransformer(cfg).eval()
    load_vit_checkpoint(ckpt, vit)
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(x),
                                   hf(pixel_values=vit.normalize(x)).last_hidden_state[:, 0],
                                   atol=1e-4, rtol=1e-4)


# ---- checkpoint adaptation and errors --------------------------------------------------------
def test_checkpoint_adaptations(tmp_path):
    src_cfg = small_cfg(img_size=16, in_chans=3)
    src = VisionTransformer(src_cfg, num_classes=10)
    ckpt = tmp_path / "src.pth"
    torch.save(src.state_dict(), ckpt)
    # 24 px grey model with 4 classes: pos_embed resized 4x4 -> 6x6, RGB filters summed, head skipped
    dst = VisionTransformer(small_cfg(img_size=24, in_chans=1), num_classes=4)
    report = load_vit_checkpoint(ckpt, dst)
    notes = " | ".join(report.notes)
    assert "pos_embed" in notes and "grey" in notes and "head.weight" in notes
    assert dst.pos_embed.shape == (1, 37, 32)
    torch.testing.assert_close(dst.patch_embed.proj.weight, src.patch_embed.proj.weight.sum(1, keepdim=True))
    torch.testing.assert_close(dst.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)
    # same grid: resize is the identity
    same = VisionTransformer(src_cfg)
    load_vit_checkpoint(ckpt, same)
    torch.testing.assert_close(same.pos_embed, src.pos_embed)


def test_checkpoint_errors(tmp_path):
    vit = VisionTransformer(small_cfg())
    with pytest.raises(MedVeilError, match="checkpoint not found"):
        load_vit_checkpoint(tmp_path / "nope.pth", vit)
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint\n")
    with pytest.raises(MedVeilError, match="not a PyTorch checkpoint"):
        load_vit_checkpoint(junk, vit)
    wide = tmp_path / "wide.pth"
    torch.save({"model": VisionTransformer(small_cfg(embed_dim=64, num_heads=4)).state_dict()}, wide)
    with pytest.raises(MedVeilError, match=r"shape mismatch for \S+: checkpoint"):
        load_vit_checkpoint(wide, vit)
    partial = tmp_path / "partial.pth"
    sd = vit.state_dict()
    del sd["blocks.1.mlp.fc1.weight"]
    torch.save(sd, partial)
    with pytest.raises(MedVeilError, match="missing key blocks.1.mlp.fc1.weight"):
        load_vit_checkpoint(partial, vit)
    assert load_vit_checkpoint(partial, vit, strict_backbone=False).missing == ["blocks.1.mlp.fc1.weight"]
    other = tmp_path / "other.pth"
    torch.save({"model": {"foo.weight": torch.zeros(2)}}, other)
    with pytest.raises(MedVeilError, match="no ViT weights"):
        load_vit_checkpoint(other, vit)
    # every message is one line
    try:
        load_vit_checkpoint(wide, vit)
    except MedVeilError as err:
        assert "\n" not in str(err)


def test_save_checkpoint_atomic_and_loadable(tmp_path):
    cfg = small_cfg()
    mae = MaskedAutoencoderViT(cfg)
    path = save_checkpoint(tmp_path / "run" / "mae.pth", mae, cfg, extra={"epoch": 2, "seed": 0})
    assert sorted(p.name for p in path.parent.iterdir()) == ["mae.pth"]  # no tmp left behind
    sd, stored_cfg = read_checkpoint(path)
    assert ViTConfig.from_dict(stored_cfg) == cfg
    fresh = MaskedAutoencoderViT(cfg)
    report = load_vit_checkpoint(path, fresh)
    assert report.missing == [] and report.dropped == []
    for k, v in mae.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)


def test_cli_load_check(tmp_path, capsys):
    import argparse

    from medveil.cli import model_cmd

    parser = argparse.ArgumentParser(prog="medveil")
    model_cmd.register(parser.add_subparsers(dest="command"))
    cfg = ViTConfig.tiny(img_size=16, in_chans=1)
    path = save_checkpoint(tmp_path / "m.pth", MaskedAutoencoderViT(cfg), cfg)
    args = parser.parse_args(["model", "load-check", str(path)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "dropped 32 MAE decoder tensors" in out and "MAE decoder: loaded" in out and "shape (2, 192), finite True" in out
    # another image size: the position grid is resized and reported
    args = parser.parse_args(["model", "load-check", str(path), "--img-size", "24"])
    assert args.func(args) == 0
    assert "resized grid 16 -> 36" in capsys.readouterr().out
    args = parser.parse_args(["model", "load-check", str(tmp_path / "missing.pth")])
    with pytest.raises(MedVeilError, match="checkpoint not found"):
        args.func(args)


# ---- convolutional stem (ViTConfig.stem = "conv") --------------------------------------------
@pytest.mark.parametrize("img_size,patch,in_chans", [(16, 4, 3), (28, 4, 1), (32, 8, 3), (16, 2, 3), (28, 7, 3),
                                                     (18, 6, 1)])
def test_conv_stem_shapes_and_own_keys(img_size, patch, in_chans):
    cfg = small_cfg(img_size=img_size, patch_size=patch, in_chans=in_chans, stem="conv")
    vit = VisionTransformer(cfg, num_classes=3)
    tokens = vit.embed(vit.normalize(torch.rand(2, in_chans, img_size, img_size)))
    assert tokens.shape == (2, cfg.num_patches, cfg.embed_dim)
    assert vit(torch.rand(2, in_chans, img_size, img_size)).shape == (2, 3)
    keys = set(vit.state_dict())
    stem_keys = {k for k in keys if k.startswith("patch_embed.")}
    assert "patch_embed.proj.weight" not in keys  # a public checkpoint's projection cannot load into it
    n_convs = 1 + ((patch & -patch).bit_length() - 1)  # full resolution, then one per factor 2
    assert vit.patch_embed.stem_proj.kernel_size == (patch >> (n_convs - 1),) * 2
    assert stem_keys == {f"patch_embed.stem.{i}.{m}.{w}" for i in range(n_convs) for m, w in
                         (("conv", "weight"), ("norm", "weight"), ("norm", "bias"))} | \
        {"patch_embed.stem_proj.weight", "patch_embed.stem_proj.bias"}
    # the transformer keeps the timm / MAE names
    patch_cfg = small_cfg(img_size=img_size, patch_size=patch, in_chans=in_chans)
    assert keys - stem_keys == set(expected_keys(patch_cfg, decoder=False, head=True)) - {
        "patch_embed.proj.weight", "patch_embed.proj.bias"}
    assert {vit.layer_of(k) for k in stem_keys} == {0}  # layer-wise decay treats it as the embedding
    with pytest.raises(MedVeilError, match="stem"):
        small_cfg(stem="resnet").validate()


@pytest.mark.parametrize("img_size,patch,in_chans", [(16, 4, 3), (28, 4, 1), (32, 8, 3), (28, 7, 3)])
def test_cnn_stem_shapes_stages_and_own_keys(img_size, patch, in_chans):
    """The hybrid trunk: two convolutions and a pool per factor 2 of the patch (none for odd p),
    widths 32, 64, ...; the same token grid as the patch stem, its own keys, the transformer's
    keys unchanged, layer 0 for layer-wise decay."""
    cfg = small_cfg(img_size=img_size, patch_size=patch, in_chans=in_chans, stem="cnn")
    vit = VisionTransformer(cfg, num_classes=3)
    tokens = vit.embed(vit.normalize(torch.rand(2, in_chans, img_size, img_size)))
    assert tokens.shape == (2, cfg.num_patches, cfg.embed_dim)
    assert vit(torch.rand(2, in_chans, img_size, img_size)).shape == (2, 3)
    n_down = (patch & -patch).bit_length() - 1
    stem = vit.patch_embed.stem
    pools = [m for m in stem if isinstance(m, torch.nn.MaxPool2d)]
    convs = [m.conv for m in stem if hasattr(m, "conv")]
    assert len(pools) == n_down and len(convs) == 2 * max(n_down, 1)
    assert [c.out_channels for c in convs[::2]] == [32 << i for i in range(max(n_down, 1))]
    assert vit.patch_embed.stem_proj.kernel_size == (patch >> n_down,) * 2
    keys = set(vit.state_dict())
    stem_keys = {k for k in keys if k.startswith("patch_embed.")}
    assert "patch_embed.proj.weight" not in keys and "patch_embed.stem_proj.weight" in keys
    patch_cfg = small_cfg(img_size=img_size, patch_size=patch, in_chans=in_chans)
    assert keys - stem_keys == set(expected_keys(patch_cfg, decoder=False, head=True)) - {
        "patch_embed.proj.weight", "patch_embed.proj.bias"}
    assert {vit.layer_of(k) for k in stem_keys} == {0}


@pytest.mark.parametrize("stem", ["conv", "cnn", "patch"])
def test_masked_pixels_cannot_reach_visible_tokens(stem):
    """Whatever a masked patch holds, the encoder's output (every visible token and the cls
    token) is bit-identical, and its gradient with respect to masked pixels is exactly zero."""
    torch.manual_seed(0)
    cfg = small_cfg(stem=stem)
    mae = MaskedAutoencoderViT(cfg).eval()
    x = torch.randn(3, 3, 16, 16)
    noise = torch.rand(3, cfg.num_patches)
    latent, mask, _ = mae.forward_encoder(x, 0.75, noise)
    pixel_mask = mae.unpatchify(mask.unsqueeze(-1).expand(-1, -1, 16 * 3)).bool()  # (B, C, H, W)
    x2 = torch.where(pixel_mask, torch.randn_like(x) * 5, x)
    assert not torch.equal(x, x2)
    latent2, _, _ = mae.forward_encoder(x2, 0.75, noise)
    assert torch.equal(latent, latent2)
    xg = x.clone().requires_grad_(True)
    mae.forward_encoder(xg, 0.75, noise)[0].sum().backward()
    assert torch.count_nonzero(xg.grad[pixel_mask]) == 0
    assert torch.count_nonzero(xg.grad[~pixel_mask]) > 0
    if stem != "patch":  # without the blanking the overlapping stem would leak: the test can fail
        leaky = mae.keep(mae.embed(x2), mae.mask_from_noise(noise, 0.75)[0])
        assert not torch.equal(leaky, mae.keep(mae.embed(x), mae.mask_from_noise(noise, 0.75)[0]))


def test_global_pool_token_avg_reads_cls_and_mean_patch_tokens():
    """[model] global_pool = "token+avg": heads read [cls, mean of patch tokens] (2D); the same
    weights as the default model (no new parameters), whose features are the first half."""
    torch.manual_seed(0)
    token = VisionTransformer(ViTConfig(img_size=16, embed_dim=32, depth=2, num_heads=2), num_classes=3)
    both = VisionTransformer(ViTConfig(img_size=16, embed_dim=32, depth=2, num_heads=2, global_pool="token+avg"),
                             num_classes=3)
    assert both.feature_dim == 64 and token.feature_dim == 32 and both.head.in_features == 64
    backbone = {k: v for k, v in token.state_dict().items() if not k.startswith("head.")}
    assert not both.load_state_dict(backbone, strict=False).unexpected_keys
    x = torch.rand(5, 3, 16, 16)
    with torch.no_grad():
        f = both.forward_features(x)
        tokens = both.encode(both.prepend_cls(both.embed(both.normalize(x))))
    assert f.shape == (5, 64) and both(x).shape == (5, 3)
    assert torch.equal(f[:, :32], token.eval().forward_features(x).detach())
    assert torch.allclose(f[:, 32:], tokens[:, 1:].mean(1))
    with pytest.raises(MedVeilError, match="global_pool must be one of token, token\\+avg"):
        ViTConfig(global_pool="max").validate()


def test_vit_feature_net_with_token_avg_heads():
    """ViTFeatureNet (FID / KID features, k-SALSA's content net) embeds what the heads read (2D
    with token+avg) and keeps D-channel feature maps on the patch grid."""
    from medveil.models.features import ViTFeatureNet

    vit = VisionTransformer(ViTConfig(img_size=16, embed_dim=32, depth=2, num_heads=2, global_pool="token+avg"))
    net = ViTFeatureNet(vit)
    x = torch.rand(2, 3, 16, 16)
    assert net.dim == 64 and net.embed(x).shape == (2, 64)
    assert net.feature_maps(x).shape == (2, 32, 4, 4)
