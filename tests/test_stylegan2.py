"""StyleGAN2 generator / discriminator: shapes, W+ layout, noise modes, config errors."""

from __future__ import annotations

import pytest
import torch

from medveil.errors import ConfigError
from medveil.models.stylegan2 import GANConfig, Generator
from medveil.models.stylegan2_discriminator import Discriminator, minibatch_std


def tiny(resolution: int = 32, **kw) -> GANConfig:
    return GANConfig(resolution=resolution, z_dim=16, w_dim=16, mapping_layers=2,
                     channel_base=256, channel_max=16, **kw)


@pytest.mark.parametrize("res,num_ws", [(32, 11), (64, 14)])
def test_generator_shapes_and_w_plus(res: int, num_ws: int) -> None:
    torch.manual_seed(0)
    G = Generator(tiny(res))
    assert G.num_ws == num_ws and G.w_dim == 16
    z = torch.randn(3, 16)
    w = G.mapping(z)
    assert w.shape == (3, 16)
    img = G.synthesis(G.broadcast(w))
    assert img.shape == (3, 3, res, res) and torch.isfinite(img).all()
    assert torch.allclose(G(z), img)
    assert G.mean_latent(64).shape == (1, num_ws, 16)
    # every W+ entry matters: changing only the last style (final toRGB) changes the image
    ws = G.broadcast(w).clone()
    ws[:, -1] += 1.0
    assert not torch.allclose(G.synthesis(ws), img)


def test_channels_from_config() -> None:
    cfg = GANConfig(resolution=64, channel_base=4096, channel_max=256)
    assert [cfg.channels(r) for r in cfg.block_resolutions] == [256, 256, 256, 128, 64]
    G = Generator(GANConfig(resolution=32, channel_base=512, channel_max=32))
    assert G.synthesis_net.blocks[0].const.shape == (32, 4, 4)
    assert G.synthesis_net.blocks[-1].conv1.conv.out_ch == 16  # 512 // 32


def test_noise_modes() -> None:
    torch.manual_seed(0)
    G = Generator(tiny()).eval()
    for m in G.modules():  # make noise matter
        if hasattr(m, "noise_strength"):
            m.noise_strength.data.fill_(0.5)
    ws = G.broadcast(G.mapping(torch.randn(2, 16)))
    a, b = G.synthesis(ws, "const"), G.synthesis(ws, "const")
    assert torch.equal(a, b)
    assert not torch.allclose(G.synthesis(ws, "random"), G.synthesis(ws, "random"))
    assert not torch.allclose(G.synthesis(ws, "none"), a)
    with pytest.raises(ConfigError):
        G.synthesis(ws, "bogus")
    with pytest.raises(ConfigError, match="num_ws|ws"):
        G.synthesis(ws[:, :-1])
    # const noise lives in buffers: a copy with the same state gives the same image
    H = Generator(tiny())
    H.load_state_dict(G.state_dict())
    assert torch.equal(H.eval().synthesis(ws, "const"), a)


def test_truncation_and_w_avg() -> None:
    torch.manual_seed(0)
    G = Generator(tiny())
    z = torch.randn(8, 16)
    G.train()
    G.mapping(z)  # training mode updates the tracked average
    assert G.mapping_net.w_avg.abs().sum() > 0
    G.eval()
    before = G.mapping_net.w_avg.clone()
    w0 = G.mapping(z, truncation_psi=0.0)
    assert torch.allclose(w0, before.expand(8, -1))
    G.mean_latent(32)
    assert torch.equal(G.mapping_net.w_avg, before)  # eval / mean_latent leave it alone


def test_gradients_reach_ws() -> None:
    G = Generator(tiny()).requires_grad_(False)
    ws = G.mean_latent(16).clone().requires_grad_(True)
    G.synthesis(ws).square().mean().backward()
    assert ws.grad is not None and ws.grad.abs().sum() > 0


@pytest.mark.parametrize("res", [16, 48, 100, 512])
def test_bad_resolution(res: int) -> None:
    with pytest.raises(ConfigError, match="power of two"):
        GANConfig(resolution=res)


def test_config_roundtrip_and_unknown_field() -> None:
    cfg = tiny(64)
    assert GANConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="chanel_max"):
        GANConfig.from_dict({**cfg.to_dict(), "chanel_max": 3})


@pytest.mark.parametrize("batch", [4, 5, 1])
def test_discriminator_shape(batch: int) -> None:
    D = Discriminator(tiny(32))
    out = D(torch.randn(batch, 3, 32, 32))
    assert out.shape == (batch,) and torch.isfinite(out).all()


def test_minibatch_std_channel() -> None:
    x = torch.randn(4, 2, 4, 4)
    y = minibatch_std(x, 4)
    assert y.shape == (4, 3, 4, 4)
    same = minibatch_std(torch.ones(4, 2, 4, 4), 4)
    assert torch.allclose(same[:, 2], torch.full((4, 4, 4), 1e-4), atol=1e-5)  # sqrt(1e-8)


def test_grey_generator() -> None:
    cfg = tiny(32, img_channels=1)
    assert Generator(cfg)(torch.randn(2, 16)).shape == (2, 1, 32, 32)
    assert Discriminator(cfg)(torch.randn(2, 1, 32, 32)).shape == (2,)


def test_fused_and_unfused_modconv_agree() -> None:
    from medveil.models.stylegan2 import ModulatedConv2d

    torch.manual_seed(0)
    for demod, up in [(True, False), (True, True), (False, False)]:
        conv = ModulatedConv2d(6, 5, 3, w_dim=4, demodulate=demod, up=up)
        x, w = torch.randn(3, 6, 8, 8), torch.randn(3, 4)
        assert torch.allclose(conv(x, w, fused=True), conv(x, w, fused=False), atol=1e-5)
    G = Generator(tiny())
    z = torch.randn(2, 16)
    assert torch.allclose(G.train()(z), G.eval()(z), atol=1e-5)
    assert torch.allclose(G.set_modconv_form(False)(z), G.set_modconv_form(True)(z), atol=1e-5)
