"""Local style alignment (k-SALSA step 5), batched over many groups at once.

For each group with W+ centroid w_bar, optimise a latent w (start at w_bar; generator and
feature nets frozen, noise ``const``) to minimise

    L = lambda_c * L_content + lambda_s * L_style

- L_content = mean over members i of (1 - cos(f(G(w)), f(x^_i))), f = ``content_net.embed``,
  x^_i = the member's GAN reconstruction.
- L_style: ``style_net.feature_maps`` of G(w) and of each real member x_i are cut into a P x P
  grid of patches; one Gram matrix per patch; each real patch is paired with the synthetic
  patch whose Gram is most cosine-similar (the pairing is a hard arg-max, no gradient);
  loss = squared Frobenius distance of each pair, averaged over patches and members.
- Adam, lr 0.1, linear warm-up over the first 5% of the steps, cosine decay over the last 25%.

Gram scale (``gram_scale``): the reference uses unnormalised Grams (sum over the positions
of a patch) with lambda_s = 1e-6 for VGG-19 conv1_2 at 512 px. That weight is tied to VGG's
activation scale and to the patch size (an unnormalised Gram grows with the positions n per
patch, its squared distance with n^2), so it means nothing for our feature nets at 64 px.
Our default is ``gram_scale="mean"``: Gram / n (mean outer product per position), which makes
the loss independent of resolution; an unnormalised Gram distance equals n^2 times it.
DEFAULT_LAMBDA_S = 0.05 (for "mean" Grams): the reference's 1e-6 on unnormalised Grams is
1e-6 * n^2 = 0.066 on mean Grams at our default geometry (64 px, P = 4: n = 16 x 16 = 256
positions per patch), and measured on 50 APTOS images at 64 px with ``random-conv:seed=0``
(synthetic = the pixel mean of 5 members) the two terms are of the same order:
lambda_c * L_content = 1e2 * 0.021 = 2.1 and 0.05 * L_style = 0.05 * 62.6 = 3.1. Other feature
nets have other activation scales: re-check with ``medveil anonymize`` (report.json records
the total loss at start and end and both terms at the end). ``gram_scale="sum",
lambda_s=1e-6`` is the reference weighting.

Learning rate: 0.1 is the reference's, for 100 steps. Our W+ codes spread only ~0.2 per
coordinate between images, so with far fewer steps 0.1 overshoots (10 steps on the quick
APTOS GAN: mean loss +26%, 2 of 12 groups improved; lr 0.03: -30%, 12 of 12); 30 steps at
0.1 recover (-38%, 12 of 12).

Batching: groups (k..2k-1 members) are padded to the largest group of the batch and masked;
the loss of a batch is the *sum* of the per-group losses, so each group's latent gets exactly
the gradient it would get alone, and Adam is per-parameter: batching changes the cost, not the
result (up to float rounding). Member targets (embeddings of reconstructions, patch Grams of
real images) are computed once per batch, before the loop, with feature nets built once.
Convolutions run in channels-last memory layout (generator and feature nets are switched for
the call and restored after): faster on CPU than the default layout (``benchmarks/ksalsa.py``
measures it). The slow per-group loop of the reference (rebuild the nets per group, recompute
member targets every step) lives in ``benchmarks/alignment_reference.py``, for the speed
comparison and the equality test only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from medveil.errors import ConfigError
from medveil.generative.latent_opt import frozen, warmup_cosine_lr
from medveil.models.features import FeatureNet
from medveil.progress import bar as progress_bar

GRAM_SCALES = ("mean", "sum")
DEFAULT_LAMBDA_C = 1e2
DEFAULT_LAMBDA_S = 0.05  # for gram_scale="mean"; see the module docstring
REFERENCE_LAMBDA_S = 1e-6  # the reference weight, for gram_scale="sum" with VGG-19 at 512 px


@dataclass(frozen=True)
class AlignConfig:
    steps: int = 100
    lr: float = 0.1
    warmup_frac: float = 0.05  # linear warm-up over the first 5% of the steps
    decay_frac: float = 0.25  # cosine decay to 0 over the last 25%
    lambda_c: float = DEFAULT_LAMBDA_C
    lambda_s: float = DEFAULT_LAMBDA_S
    patches: int = 4  # P: a P x P grid of patches per feature map
    gram_scale: str = "mean"  # "mean" (Gram / positions per patch) | "sum" (unnormalised)

    def __post_init__(self) -> None:
        if self.steps < 0 or self.patches < 1 or self.lr <= 0:
            raise ConfigError(f"alignment: need steps >= 0, patches >= 1, lr > 0; got {self}")
        if self.gram_scale not in GRAM_SCALES:
            raise ConfigError(f"alignment: gram_scale must be one of {GRAM_SCALES}, "
                              f"got {self.gram_scale!r}")
        if not (0 <= self.warmup_frac <= 1 and 0 <= self.decay_frac <= 1):
            raise ConfigError("alignment: warmup_frac and decay_frac must be in [0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AlignTargets:
    """Fixed per-member targets of one batch of groups (padded to M members)."""

    content: torch.Tensor  # (B, M, D) unit-norm embeddings of the members' reconstructions
    grams: torch.Tensor  # (B, M, P*P, C, C) patch Grams of the members' real images
    mask: torch.Tensor  # (B, M) 1.0 for a real member, 0.0 for padding


@dataclass
class AlignResult:
    ws: torch.Tensor  # (G, num_ws, w_dim) aligned latents
    images: torch.Tensor  # (G, C, R, R) G(ws) in [0, 1]
    loss_start: np.ndarray  # (G,) total loss at the centroid
    loss_end: np.ndarray  # (G,) total loss after the last step
    content_end: np.ndarray  # (G,) L_content after the last step (unweighted)
    style_end: np.ndarray  # (G,) L_style after the last step (unweighted)
    seconds: float


# ----------------------------------------------------------------------------- losses


def patch_grams(maps: torch.Tensor, patches: int, scale: str = "mean") -> torch.Tensor:
    """Feature maps (B, C, h, w) -> one Gram per patch of a P x P grid: (B, P*P, C, C).

    Rows/columns that do not fill a whole patch (h or w not divisible by P) are dropped.
    scale "sum": F F^T over the n = (h/P)(w/P) positions of a patch; "mean": divided by n.
    """
    b, c, h, w = maps.shape
    ph, pw = h // patches, w // patches
    if ph == 0 or pw == 0:
        raise ConfigError(f"feature maps of {h}x{w} are too small for a {patches}x{patches} "
                          "patch grid; use fewer patches or a larger image")
    x = maps[:, :, : ph * patches, : pw * patches]
    x = x.reshape(b, c, patches, ph, patches, pw).permute(0, 2, 4, 1, 3, 5)
    x = x.reshape(b, patches * patches, c, ph * pw)  # (B, Q, C, n)
    gram = x @ x.transpose(-1, -2)  # (B, Q, C, C)
    return gram / (ph * pw) if scale == "mean" else gram


def style_loss(syn_grams: torch.Tensor, real_grams: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Best-match patch Gram loss per group.

    syn_grams (B, Q, C, C); real_grams (B, M, Q, C, C); mask (B, M) -> (B,).
    Each real patch is paired with the synthetic patch of highest cosine similarity.
    """
    s = syn_grams.flatten(2)  # (B, Q, D), D = C*C
    r = real_grams.flatten(3)  # (B, M, Q, D)
    # |r - s|^2 = |r|^2 - 2 r.s + |s|^2 from the (B, M, Q, Q) dot products, which the pairing
    # needs anyway: no (B, M, Q, D) copy of the matched synthetic Grams (far less memory traffic).
    dots = torch.einsum("bmpd,bqd->bmpq", r, s)  # (B, M, Q real patches, Q synthetic patches)
    s_sq = s.square().sum(dim=-1)  # (B, Q)
    with torch.no_grad():
        r_norm = r.norm(dim=-1)  # (B, M, Q)
        cos = dots / (r_norm[..., None] * s_sq.sqrt()[:, None, None, :]).clamp_min(1e-12)
        match = cos.argmax(dim=-1, keepdim=True)  # (B, M, Q, 1) index of the synthetic patch
    matched_dot = torch.gather(dots, 3, match)[..., 0]  # (B, M, Q)
    matched_sq = torch.gather(s_sq[:, None, None, :].expand_as(dots), 3, match)[..., 0]  # (B, M, Q)
    per_pair = (r_norm.square() - 2.0 * matched_dot + matched_sq).clamp_min(0.0)  # rounding: never < 0
    per_member = per_pair.mean(dim=-1)  # (B, M)
    return (per_member * mask).sum(dim=1) / mask.sum(dim=1)


def content_loss(syn_emb: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """syn_emb (B, D); targets (B, M, D) unit-norm; mask (B, M) -> (B,) mean of 1 - cos."""
    cos = torch.einsum("bd,bmd->bm", F.normalize(syn_emb, dim=-1), targets)
    return ((1.0 - cos) * mask).sum(dim=1) / mask.sum(dim=1)


def lr_at(step: int, cfg: AlignConfig) -> float:
    """Learning rate of step ``step`` (0-based): warm-up, constant, cosine decay."""
    return warmup_cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup_frac, cfg.decay_frac)


# ----------------------------------------------------------------------------- batched


@contextmanager
def channels_last(*modules: nn.Module) -> Iterator[None]:
    """4-D parameters and buffers in channels-last layout inside; the default layout after."""
    for m in modules:
        m.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        for m in modules:
            m.to(memory_format=torch.contiguous_format)


def pad_groups(groups: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Index groups -> (B, M) member indices (padding repeats the first member) and (B, M) mask."""
    m = max(len(g) for g in groups)
    index = torch.zeros(len(groups), m, dtype=torch.long)
    mask = torch.zeros(len(groups), m)
    for i, g in enumerate(groups):
        g = torch.as_tensor(np.asarray(g), dtype=torch.long)
        index[i, : len(g)], index[i, len(g):], mask[i, : len(g)] = g, g[0], 1.0
    return index, mask


@torch.no_grad()
def member_targets(images: torch.Tensor, recons: torch.Tensor, groups: Sequence[np.ndarray],
                   content_net: FeatureNet, style_net: FeatureNet, cfg: AlignConfig,
                   device: torch.device | None = None) -> AlignTargets:
    """Targets of a batch of groups, computed once.

    images, recons: (N, C, R, R) in [0, 1] (real images and their reconstructions, indexed by
    the groups' row indices). Each member is embedded once (padding slots copy a row).
    """
    index, mask = pad_groups(groups)
    rows = torch.as_tensor(np.concatenate([np.asarray(g) for g in groups]), dtype=torch.long)
    emb = F.normalize(content_net.embed(recons[rows].to(device)), dim=-1)  # (n, D)
    grams = patch_grams(style_net.feature_maps(images[rows].to(device)), cfg.patches,
                        cfg.gram_scale)  # (n, Q, C, C)
    slot = torch.zeros(int(rows.max()) + 1, dtype=torch.long)
    slot[rows] = torch.arange(len(rows))
    pos = slot[index].to(emb.device)  # (B, M) row of each member in emb / grams
    return AlignTargets(content=emb[pos], grams=grams[pos], mask=mask.to(emb.device))


def group_losses(G: nn.Module, ws: torch.Tensor, targets: AlignTargets, content_net: FeatureNet,
                 style_net: FeatureNet, cfg: AlignConfig
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ws (B, num_ws, w_dim) -> per-group (total, content, style) losses (B,) and images (B,C,R,R)."""
    x = (G.synthesis(ws, noise_mode="const") + 1.0) / 2.0  # (B, C, R, R), ~[0, 1]
    if style_net is content_net:  # one pass for both (the common layers are shared)
        maps, emb = content_net.features(x)
    else:
        maps, emb = style_net.feature_maps(x), content_net.embed(x)
    lc = content_loss(emb, targets.content, targets.mask)
    ls = style_loss(patch_grams(maps, cfg.patches, cfg.gram_scale), targets.grams, targets.mask)
    return cfg.lambda_c * lc + cfg.lambda_s * ls, lc, ls, x


def align_batch(G: nn.Module, w0: torch.Tensor, targets: AlignTargets, content_net: FeatureNet,
                style_net: FeatureNet, cfg: AlignConfig) -> dict[str, torch.Tensor]:
    """Optimise B latents at once from w0 (B, num_ws, w_dim); targets fixed.

    Returns ws, images (in [0, 1]) and per-group loss_start / loss_end / content / style.
    """
    with frozen(G, content_net, style_net):
        w = w0.detach().clone().to(targets.mask.device).requires_grad_(True)
        opt = torch.optim.Adam([w], lr=cfg.lr)
        loss_start = None
        for step in range(cfg.steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            total, _, _, _ = group_losses(G, w, targets, content_net, style_net, cfg)
            if loss_start is None:
                loss_start = total.detach()
            opt.zero_grad(set_to_none=True)
            total.sum().backward()  # sum: each group gets its own gradient
            opt.step()
        with torch.no_grad():
            total, lc, ls, x = group_losses(G, w, targets, content_net, style_net, cfg)
    return {"ws": w.detach(), "images": x.clamp(0, 1), "loss_start": total if loss_start is None
            else loss_start, "loss_end": total, "content": lc, "style": ls}


def align_groups(
    G: nn.Module, w_start: torch.Tensor, images: torch.Tensor, recons: torch.Tensor,
    groups: Sequence[np.ndarray], content_net: FeatureNet, style_net: FeatureNet | None = None,
    cfg: AlignConfig = AlignConfig(), *, batch_size: int = 64,
    which: Sequence[int] | None = None,
    on_batch: Callable[[list[int], dict[str, torch.Tensor]], None] | None = None,
    progress: bool | None = None, memory_channels_last: bool = True,
) -> AlignResult:
    """Align many groups, ``batch_size`` groups per optimisation batch (channels-last layout
    unless ``memory_channels_last`` is False).

    w_start: (n_groups, num_ws, w_dim) start latents (the W+ centroids). images/recons:
    (N, C, R, R) in [0, 1] at G's resolution. which: group indices to do (default all), e.g.
    the unfinished ones of a resumed run. on_batch(indices, outputs) is called after each batch
    (to persist it). Returns results for ``which``, in that order.
    """
    style_net = style_net or content_net
    which = list(range(len(groups))) if which is None else [int(g) for g in which]
    device = next(G.parameters()).device
    t0 = time.perf_counter()
    outs: list[dict[str, torch.Tensor]] = []
    bar = progress_bar(total=len(which), desc="align", unit="group", disable=progress is False)
    layout = channels_last(G, content_net, style_net) if memory_channels_last else nullcontext()
    with layout:
        for start in range(0, len(which), batch_size):
            idx = which[start: start + batch_size]
            targets = member_targets(images, recons, [groups[g] for g in idx], content_net,
                                     style_net, cfg, device)
            out = align_batch(G, w_start[idx].to(device), targets, content_net, style_net, cfg)
            out = {k: v.detach().contiguous().cpu() for k, v in out.items()}
            if on_batch is not None:
                on_batch(idx, out)
            outs.append(out)
            bar.update(len(idx))
    bar.close()
    return collect_results(outs, time.perf_counter() - t0, w_start)


# ----------------------------------------------------------------------------- internals


def collect_results(outs: list[dict[str, torch.Tensor]], seconds: float, w_start: torch.Tensor
                    ) -> AlignResult:
    """One AlignResult from per-batch (or per-group) outputs, in order."""
    if not outs:
        empty = np.zeros(0, dtype=np.float32)
        return AlignResult(w_start[:0].clone(), torch.zeros(0), empty, empty, empty, empty, seconds)
    cat = {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
    num = lambda k: cat[k].float().numpy()  # noqa: E731
    return AlignResult(ws=cat["ws"], images=cat["images"], loss_start=num("loss_start"),
                       loss_end=num("loss_end"), content_end=num("content"),
                       style_end=num("style"), seconds=seconds)
