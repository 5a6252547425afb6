"""Inversion of real images into the W+ space of a trained StyleGAN2 (k-SALSA step 2).

Two ways, which compose:
- the ReStyle encoder (:class:`medveil.models.encoder.Encoder`, trained by
  :mod:`medveil.generative.encoder_training`): fast, one pass per refinement;
- the projector (:func:`project`): per-image Adam on the W+ code, many images at once,
  starting from the average latent or from the encoder's output: slower, more accurate.

Losses (per image, so images in one batch never influence each other), with the weights of
:class:`ReconWeights` (defaults documented there):
    pixel   mean squared error on [-1, 1] pixels (the pSp / ReStyle L2 term)
    maps    relative L2 of the FeatureNet's early feature maps, ||f(y) - f(x)||^2 / ||f(x)||^2
            (stands in for LPIPS, which needs ImageNet weights)
    embed   1 - cos(embed(y), embed(x)) (the feature-similarity term)
Noise inputs are fixed (``noise_mode="const"``) throughout.

Images are float (N, C, R, R) in [0, 1] at the public API; the generator works in [-1, 1].
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from medveil.data.tensors import convert_channels
from medveil.errors import ConfigError, DataError
from medveil.generative.latent_opt import frozen, warmup_cosine_lr
from medveil.models.encoder import Encoder
from medveil.models.features import FeatureNet, build_feature_net
from medveil.models.stylegan2 import Generator
from medveil.progress import bar as progress_bar

DEFAULT_FEATURE_NET = "random-conv:seed=0"


@dataclass
class ReconWeights:
    pixel: float = 1.0  # MSE on [-1, 1] pixels
    maps: float = 0.1  # relative L2 of early feature maps (texture / edges)
    embed: float = 0.1  # 1 - cosine of global embeddings
    latent: float = 1.0  # encoder training on generator samples only: MSE to the true W+ code


@dataclass
class ProjectConfig:
    steps: int = 200
    lr: float = 0.1  # Adam on W+; warm-up first 5 %, cosine decay over the last 25 %
    warmup_frac: float = 0.05
    decay_frac: float = 0.25
    batch_size: int = 32  # images optimised together (independent losses, one Adam over the batch)
    weights: ReconWeights = field(default_factory=ReconWeights)


# ----------------------------------------------------------------------------- inputs


def match_generator(images: torch.Tensor, G: Generator, where: str = "images") -> torch.Tensor:
    """(N, C, H, W) float in [0, 1] (uint8 accepted) -> (N, G.img_channels, R, R): channel count
    and size converted explicitly, with one warning saying so."""
    if images.ndim != 4 or images.shape[0] == 0:
        raise DataError(f"{where}: expected images (N, C, H, W), got {tuple(images.shape)}")
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    n, c, h, w = x.shape
    R = G.resolution
    if c != G.img_channels:
        if c not in (1, 3):
            raise DataError(f"{where}: {c}-channel images cannot feed a {G.img_channels}-channel generator")
        warnings.warn(f"{where}: converted {n} image(s) from {c} to {G.img_channels} channel(s)", stacklevel=2)
        x = convert_channels(x, G.img_channels)
    if (h, w) != (R, R):
        warnings.warn(f"{where}: resized {n} image(s) from {h}x{w} to {R}x{R}", stacklevel=2)
        x = F.interpolate(x, size=(R, R), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    return x


def _rgb(x: torch.Tensor) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


# ----------------------------------------------------------------------------- losses


class ReconTargets:
    """Fixed target features of a batch, computed once: x (B, C, R, R) in [0, 1]."""

    def __init__(self, x: torch.Tensor, fnet: FeatureNet) -> None:
        with torch.no_grad():
            self.x = x
            self.maps, emb = fnet.features(_rgb(x))  # (B, c, h, w), (B, D)
            self.maps_energy = self.maps.square().mean(dim=(1, 2, 3)).clamp_min(1e-8)  # (B,)
            self.emb = F.normalize(emb, dim=1)


def recon_losses(y: torch.Tensor, t: ReconTargets, fnet: FeatureNet, wts: ReconWeights
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """y (B, C, R, R) in [0, 1] (with grad) -> weighted per-image loss (B,) and its parts (B,)."""
    pixel = ((y - t.x) * 2).square().mean(dim=(1, 2, 3))  # MSE on the [-1, 1] scale
    parts = {"pixel": pixel}
    total = wts.pixel * pixel
    if wts.maps or wts.embed:
        fmaps, emb = fnet.features(_rgb(y))
        maps = (fmaps - t.maps).square().mean(dim=(1, 2, 3)) / t.maps_energy
        embed = 1 - (F.normalize(emb, dim=1) * t.emb).sum(dim=1)
        parts["maps"], parts["embed"] = maps, embed
        total = total + wts.maps * maps + wts.embed * embed
    return total, parts


def to_unit(img: torch.Tensor) -> torch.Tensor:
    """Generator output in ~[-1, 1] -> [0, 1] (no clamp, so gradients pass everywhere)."""
    return (img + 1) / 2


@torch.no_grad()
def quality(recon: torch.Tensor, target: torch.Tensor, fnet: FeatureNet | None = None) -> dict[str, torch.Tensor]:
    """Per-image PSNR (dB), SSIM and feature distance (1 - cos of embeddings) of [0, 1] images."""
    recon, target = recon.clamp(0, 1).float(), target.float()
    out = {"psnr": peak_signal_noise_ratio(recon, target, data_range=1.0, reduction="none", dim=(1, 2, 3)),
           "ssim": structural_similarity_index_measure(recon, target, data_range=1.0, reduction="none")}
    if fnet is not None:
        a, b = fnet.embed(_rgb(recon)), fnet.embed(_rgb(target))
        out["feature_distance"] = 1 - F.cosine_similarity(a, b, dim=1)
    return {k: v.cpu() for k, v in out.items()}


def summarize(q: dict[str, torch.Tensor]) -> dict[str, float]:
    return {f"{k}_mean": float(v.mean()) for k, v in q.items()} | {f"{k}_std": float(v.std()) for k, v in q.items()}


# ----------------------------------------------------------------------------- projector


def project(images: torch.Tensor, G: Generator, fnet: FeatureNet, w_init: torch.Tensor | None = None,
            cfg: ProjectConfig | None = None, progress: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image latent optimisation in W+.

    images (N, C, R, R) in [0, 1] matching G; w_init (N, num_ws, w_dim) or None (average latent).
    Returns ws (N, num_ws, w_dim) and reconstructions (N, C, R, R) in [0, 1], on the CPU.
    Deterministic: no random draws (noise const, fixed start).
    """
    cfg = cfg or ProjectConfig()
    device = next(G.parameters()).device
    if w_init is None:
        w_init = G.mean_latent().expand(images.shape[0], -1, -1)
    if w_init.shape != (images.shape[0], G.num_ws, G.w_dim):
        raise ConfigError(f"w_init must be ({images.shape[0]}, {G.num_ws}, {G.w_dim}), got {tuple(w_init.shape)}")
    ws_out, recon_out = [], []
    with frozen(G, fnet):
        batches = list(zip(images.split(cfg.batch_size), w_init.split(cfg.batch_size)))
        bar = progress_bar(total=len(batches) * cfg.steps, desc="project", disable=progress is False, leave=False)
        for x, w0 in batches:
            x = x.to(device)
            targets = ReconTargets(x, fnet)
            w = w0.detach().clone().to(device).requires_grad_(True)
            opt = torch.optim.Adam([w], lr=cfg.lr)
            for step in range(cfg.steps):
                for group in opt.param_groups:
                    group["lr"] = warmup_cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup_frac, cfg.decay_frac)
                loss, _ = recon_losses(to_unit(G.synthesis(w, noise_mode="const")), targets, fnet, cfg.weights)
                opt.zero_grad(set_to_none=True)
                loss.sum().backward()  # sum: each image's gradient is its own loss's gradient
                opt.step()
                bar.update(1)
            with torch.no_grad():
                ws_out.append(w.detach().cpu())
                recon_out.append(to_unit(G.synthesis(w, noise_mode="const")).clamp(0, 1).cpu())
        bar.close()
    return torch.cat(ws_out), torch.cat(recon_out)


@torch.no_grad()
def encode(images: torch.Tensor, G: Generator, encoder: Encoder, iterations: int = 5,
           batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder-only inversion, batched: (ws (N, num_ws, w_dim), recon (N, C, R, R) in [0, 1]) on CPU."""
    device = next(G.parameters()).device
    encoder = encoder.to(device).eval()
    outs = [encoder.invert(x.to(device), G, iterations) for x in images.split(batch_size)]
    return torch.cat([w.cpu() for w, _ in outs]), torch.cat([y.cpu() for _, y in outs])


def invert_images(images: torch.Tensor, G: Generator, encoder: Encoder | None = None, steps: int = 200, *,
                  fnet: FeatureNet | None = None, iterations: int = 5, cfg: ProjectConfig | None = None,
                  batch_size: int = 32, progress: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert images (N, C, H, W) in [0, 1] -> (ws (N, num_ws, w_dim), recon (N, C, R, R) in [0, 1]).

    encoder given: start from its ``iterations``-step output, else from the average latent;
    ``steps`` > 0: refine with the projector (``steps`` overrides ``cfg.steps``); images of
    another size / channel count are converted explicitly (with a warning).
    """
    x = match_generator(images, G)
    fnet = fnet or build_feature_net(DEFAULT_FEATURE_NET)
    fnet = fnet.to(next(G.parameters()).device)
    w0, recon = encode(x, G, encoder, iterations, batch_size) if encoder is not None else (None, None)
    if steps <= 0:
        if w0 is None:
            raise ConfigError("invert_images needs an encoder or steps > 0")
        return w0, recon
    base = cfg or ProjectConfig()
    run_cfg = ProjectConfig(**{**asdict(base), "steps": steps, "batch_size": batch_size,
                               "weights": base.weights})
    return project(x, G, fnet, w0, run_cfg, progress)
