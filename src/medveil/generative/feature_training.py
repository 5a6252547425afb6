"""Train a :class:`~medveil.models.features.ConvFeatureNet` on the data itself.

With labels: supervised (linear head on the embedding, cross-entropy).
Without labels: SimCLR-lite (two random views per image - crop+resize, flips, brightness/contrast
jitter - NT-Xent loss with temperature ``tau`` on a small projection head).
The result is written by :func:`save_conv_feature_net` and used as the feature-net spec
``conv:/path/file.pt``. Per-epoch checkpoints (atomic) let a killed run resume identically.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from medveil.errors import ConfigError, DataError
from medveil.generative.checkpoint import load_checkpoint
from medveil.io import save_torch_atomic
from medveil.models.features import CONV_FORMAT, DEFAULT_WIDTHS, ConvFeatureNet, as_rgb, load_conv_feature_net
from medveil.progress import bar as progress_bar


@dataclass
class FeatureTrainConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    widths: tuple[int, ...] = DEFAULT_WIDTHS
    tau: float = 0.2  # NT-Xent temperature (self-supervised mode)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random view of (B, 3, H, W) in [0, 1]: crop 60-100 % + resize back, h/v flips, jitter."""
    B, _, H, W = x.shape
    out = torch.empty_like(x)
    scales = 0.6 + 0.4 * torch.rand(B, generator=gen)
    for i in range(B):
        h, w = max(2, int(H * scales[i])), max(2, int(W * scales[i]))
        top = int(torch.randint(0, H - h + 1, (1,), generator=gen))
        left = int(torch.randint(0, W - w + 1, (1,), generator=gen))
        crop = x[i : i + 1, :, top : top + h, left : left + w]
        out[i] = F.interpolate(crop, size=(H, W), mode="bilinear", align_corners=False)[0]
    flip_h = torch.rand(B, generator=gen) < 0.5
    flip_v = torch.rand(B, generator=gen) < 0.5
    out[flip_h] = out[flip_h].flip(-1)
    out[flip_v] = out[flip_v].flip(-2)
    bright = (torch.rand(B, 1, 1, 1, generator=gen) - 0.5) * 0.4
    contrast = 0.7 + 0.6 * torch.rand(B, 1, 1, 1, generator=gen)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return ((out - mean) * contrast + mean + bright).clamp(0, 1)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """SimCLR loss of two views' projections (B, P): each view must find its partner among 2B-1."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # (2B, P)
    sim = z @ z.T / tau
    sim.fill_diagonal_(float("-inf"))
    B = z1.shape[0]
    target = torch.cat([torch.arange(B, 2 * B), torch.arange(0, B)])
    return F.cross_entropy(sim, target)


def save_conv_feature_net(net: ConvFeatureNet, path: str | Path, info: dict) -> Path:
    """Write ``net``'s weights + widths + training info atomically (readable by ``conv:PATH``)."""
    return save_torch_atomic(path, {"format": CONV_FORMAT, "widths": list(net.widths), "info": info,
                                    "state_dict": net.state_dict()})


def train_feature_net(images: torch.Tensor, labels: torch.Tensor | None, out_path: str | Path,
                      cfg: FeatureTrainConfig | None = None, progress: bool = True) -> ConvFeatureNet:
    """images: float (N, 1|3, H, W) in [0, 1]; labels: int (N,) or None (self-supervised).
    Returns the frozen trained net, also saved to ``out_path`` (use it as ``conv:out_path``)."""
    cfg = cfg or FeatureTrainConfig()
    images = as_rgb(images.float())
    N = images.shape[0]
    if N < 2:
        raise DataError(f"need at least 2 images to train a feature net, got {N}")
    if labels is not None and labels.shape[0] != N:
        raise DataError(f"{labels.shape[0]} labels for {N} images")
    supervised = labels is not None
    out_path = Path(out_path)
    ckpt_path = out_path.with_name(out_path.name + ".train-ckpt")

    net = ConvFeatureNet(cfg.widths, seed=cfg.seed, source="trained-supervised" if supervised else "trained-simclr")
    for p in net.parameters():
        p.requires_grad_(True)
    n_out = int(labels.max()) + 1 if supervised else 64
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        head = nn.Linear(net.dim, n_out) if supervised else nn.Sequential(
            nn.Linear(net.dim, 256), nn.ReLU(), nn.Linear(256, n_out))
    params = list(net.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    start_epoch, history = 0, []
    if ckpt_path.is_file():  # resume
        state = load_checkpoint(ckpt_path)
        if state["config"] != asdict(cfg) or state["supervised"] != supervised:
            raise ConfigError(f"{ckpt_path}: unfinished run with a different config; delete it to start over")
        net.load_state_dict(state["net"])
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        start_epoch, history = state["epoch"], state["history"]

    bs = min(cfg.batch_size, N)
    for epoch in range(start_epoch, cfg.epochs):
        perm = torch.randperm(N, generator=gen)
        total, steps = 0.0, 0
        for idx in progress_bar(perm.split(bs), desc=f"feature net {epoch + 1}/{cfg.epochs}",
                                disable=not progress, leave=False):
            if len(idx) < 2:
                continue
            x = images[idx]
            if supervised:
                loss = F.cross_entropy(head(net._embed(augment(x, gen))), labels[idx].long())
            else:
                loss = nt_xent(head(net._embed(augment(x, gen))), head(net._embed(augment(x, gen))), cfg.tau)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, steps = total + loss.item(), steps + 1
        history.append({"epoch": epoch + 1, "loss": total / max(steps, 1)})
        save_torch_atomic(ckpt_path, {
            "config": asdict(cfg), "supervised": supervised, "net": net.state_dict(),
            "head": head.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
            "epoch": epoch + 1, "history": history})

    info = {"source": net.source, "config": {**asdict(cfg), "widths": list(cfg.widths)},
            "num_images": N, "image_size": list(images.shape[-2:]), "history": history}
    save_conv_feature_net(net, out_path, info)
    ckpt_path.unlink(missing_ok=True)
    return load_conv_feature_net(out_path)
