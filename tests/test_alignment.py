"""Local style alignment: losses, loss reduction, batched == per-group reference, targets
computed once, padding/masks for groups of unequal sizes."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medveil.anonymize.alignment import (
    AlignConfig, align_groups, content_loss, lr_at, member_targets,
    patch_grams, style_loss,
)
from medveil.models.features import build_feature_net
from medveil.models.stylegan2 import GANConfig, Generator

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from alignment_reference import align_per_group_reference  # noqa: E402  (the benchmark's per-group loop)

SPEC = "random-conv:seed=0,width=8"


@pytest.fixture(scope="module")
def setup():
    """A tiny random generator, 'real' images with structure, reconstructions and groups of
    unequal sizes (5, 6, 7, 9 members: k = 5, sizes in [k, 2k-1])."""
    torch.manual_seed(0)
    G = Generator(GANConfig(resolution=32, z_dim=16, w_dim=16, mapping_layers=1,
                            channel_base=128, channel_max=16)).eval()
    n = 27
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    disc = (xx**2 + yy**2 < 0.8).float()
    freq = torch.rand(n) * 8 + 2
    grey = torch.stack([disc * (0.5 + 0.3 * torch.sin(f * xx)) for f in freq])  # (n, 32, 32)
    images = torch.stack([grey, grey * 0.5, grey * 0.2], dim=1)  # (n, 3, 32, 32) in [0, 1]
    ws = G.mean_latent(200).expand(n, -1, -1) + 0.5 * torch.randn(n, G.num_ws, G.w_dim)
    with torch.no_grad():
        recons = ((G.synthesis(ws, noise_mode="const") + 1) / 2).clamp(0, 1)
    sizes = [5, 6, 7, 9]
    bounds = np.cumsum([0, *sizes])
    perm = np.random.default_rng(0).permutation(n)
    groups = [np.sort(perm[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    w0 = torch.stack([ws[torch.as_tensor(g)].mean(0) for g in groups])
    return G, images, recons, groups, w0


class CountingNet(torch.nn.Module):
    """Wraps a FeatureNet and counts the images each method sees."""

    def __init__(self, net):
        super().__init__()
        self.net, self.name = net, net.name
        self.embed_rows, self.map_rows = 0, 0

    def embed(self, x):
        self.embed_rows += len(x)
        return self.net.embed(x)

    def feature_maps(self, x):
        self.map_rows += len(x)
        return self.net.feature_maps(x)

    def features(self, x):  # maps + embedding in one pass
        self.embed_rows += len(x)
        self.map_rows += len(x)
        return self.net.features(x)

    def describe(self):
        return self.net.describe()


def test_patch_grams_shapes_and_scale():
    maps = torch.randn(2, 3, 8, 8)
    mean, total = patch_grams(maps, 4, "mean"), patch_grams(maps, 4, "sum")
    assert mean.shape == (2, 16, 3, 3)
    torch.testing.assert_close(total, mean * 4)  # 2 x 2 = 4 positions per patch
    patch = maps[1, :, 2:4, 4:6].reshape(3, 4)  # row 1, column 2 of the 4 x 4 grid
    torch.testing.assert_close(total[1, 1 * 4 + 2], patch @ patch.T)


def test_style_loss_best_match_and_mask():
    torch.manual_seed(0)
    syn = torch.randn(1, 4, 3, 3)
    real = syn[:, [2, 0, 3, 1]][:, None]  # real patches are a permutation of the synthetic ones
    mask = torch.ones(1, 1)
    # |r - s|^2 is computed as |r|^2 - 2 r.s + |s|^2: zero up to float32 rounding of |r|^2 (~9 here)
    tol = 1e-5 * float(real.square().sum(dim=(-1, -2)).mean())
    assert style_loss(syn, real, mask).item() == pytest.approx(0.0, abs=tol)  # best match finds them
    shifted = style_loss(syn, real[:, :, [1, 2, 3, 0]] + 0.1, mask).item()
    assert shifted == pytest.approx(0.1**2 * 9, rel=1e-3)  # still paired with its own patch: 9 entries + 0.1
    padded = torch.cat([real, 100 * torch.randn(1, 1, 4, 3, 3)], dim=1)  # a padding slot
    assert style_loss(syn, padded, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(0.0, abs=tol)
    emb = torch.randn(1, 5)
    targets = torch.nn.functional.normalize(torch.stack([emb[0], -emb[0]])[None], dim=-1)
    assert content_loss(emb, targets, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-6)
    assert content_loss(emb, targets, torch.tensor([[1.0, 1.0]])).item() == pytest.approx(1.0, abs=1e-6)


def test_style_loss_equals_the_direct_matched_gram_distance_and_its_gradient():
    """The loss is computed from dot products (no copy of the matched Grams): same value and
    gradient as pairing each real patch with its most cosine-similar synthetic patch and summing
    the squared differences directly."""
    torch.manual_seed(0)
    syn = torch.rand(3, 16, 4, 4, dtype=torch.float64, requires_grad=True)
    real = torch.rand(3, 5, 16, 4, 4, dtype=torch.float64)
    mask = torch.tensor([[1.0, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.float64)
    s, r = syn.flatten(2), real.flatten(3)  # (B, Q, D), (B, M, Q, D)
    cos = torch.nn.functional.normalize(r, dim=-1) @ torch.nn.functional.normalize(s, dim=-1).transpose(1, 2)[:, None]
    matched = torch.stack([s[b][cos[b].argmax(-1)] for b in range(3)])  # (B, M, Q, D)
    direct = (((r - matched) ** 2).sum(-1).mean(-1) * mask).sum(1) / mask.sum(1)
    (g_direct,) = torch.autograd.grad(direct.sum(), syn)
    ours = style_loss(syn, real, mask)
    (g_ours,) = torch.autograd.grad(ours.sum(), syn)
    torch.testing.assert_close(ours, direct)
    torch.testing.assert_close(g_ours, g_direct)


def test_lr_schedule_warmup_and_cosine_decay():
    cfg = AlignConfig(steps=100, lr=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1 / 5)  # warm-up over the first 5 steps
    assert lr_at(4, cfg) == pytest.approx(0.1)
    assert lr_at(50, cfg) == pytest.approx(0.1)
    assert lr_at(75, cfg) == pytest.approx(0.1)  # decay starts at 75
    assert lr_at(99, cfg) < 0.001


def test_alignment_reduces_loss(setup):
    G, images, recons, groups, w0 = setup
    net = build_feature_net(SPEC)
    res = align_groups(G, w0, images, recons, groups, net, cfg=AlignConfig(steps=15),
                       progress=False)
    assert res.ws.shape == w0.shape and res.images.shape == (4, 3, 32, 32)
    assert (res.loss_end < res.loss_start).all()
    assert res.loss_end.mean() < 0.5 * res.loss_start.mean()
    assert 0 <= res.images.min() and res.images.max() <= 1
    assert not torch.equal(res.ws, w0)


def test_batched_equals_per_group_reference(setup):
    G, images, recons, groups, w0 = setup
    cfg = AlignConfig(steps=4)
    batched = align_groups(G, w0, images, recons, groups, build_feature_net(SPEC), cfg=cfg,
                           batch_size=4, progress=False)  # one batch, padded to 9 members
    reference = align_per_group_reference(G, w0, images, recons, groups, SPEC, cfg=cfg)
    torch.testing.assert_close(batched.ws, reference.ws, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(batched.images, reference.images, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(batched.loss_end, reference.loss_end, rtol=1e-3)
    # batch size does not change the result either (padding differs between batches)
    pairs = align_groups(G, w0, images, recons, groups, build_feature_net(SPEC), cfg=cfg,
                         batch_size=2, progress=False)
    torch.testing.assert_close(batched.ws, pairs.ws, atol=2e-4, rtol=1e-4)


def test_channels_last_same_result_and_layout_restored(setup):
    G, images, recons, groups, w0 = setup
    cfg, net = AlignConfig(steps=3), build_feature_net(SPEC)
    fast = align_groups(G, w0, images, recons, groups, net, cfg=cfg, progress=False)
    plain = align_groups(G, w0, images, recons, groups, net, cfg=cfg, progress=False,
                         memory_channels_last=False)
    torch.testing.assert_close(fast.ws, plain.ws, atol=2e-4, rtol=1e-4)
    assert fast.images.is_contiguous()
    four_d = [p for m in (G, net) for p in m.parameters() if p.dim() == 4]
    assert four_d and all(p.is_contiguous() for p in four_d)  # caller's modules untouched


def test_member_features_computed_once(setup):
    G, images, recons, groups, w0 = setup
    steps, n_members = 5, sum(len(g) for g in groups)
    net = CountingNet(build_feature_net(SPEC))
    align_groups(G, w0, images, recons, groups, net, cfg=AlignConfig(steps=steps), batch_size=2,
                 progress=False)
    # members once (targets) + the synthetic batch every step + one final evaluation
    assert net.embed_rows == n_members + (steps + 1) * len(groups)
    assert net.map_rows == n_members + (steps + 1) * len(groups)


def test_targets_padding_and_mask(setup):
    _, images, recons, groups, _ = setup
    net = build_feature_net(SPEC)
    t = member_targets(images, recons, groups, net, net, AlignConfig())
    assert t.content.shape[:2] == (4, 9) and t.grams.shape[:3] == (4, 9, 16)
    assert t.mask.sum(dim=1).tolist() == [5.0, 6.0, 7.0, 9.0]
    # the 6th member of the 7-member group is its real 6th member
    one = member_targets(images, recons, [groups[2]], net, net, AlignConfig())
    torch.testing.assert_close(t.grams[2, :7], one.grams[0])
    torch.testing.assert_close(t.content[2, :7], one.content[0])
