"""Train the ReStyle encoder of :mod:`medveil.models.encoder` against a frozen generator.

Every step uses ``batch`` real images of the private set and ``synth_batch`` generator samples
(z ~ N(0, I), truncation ``truncation_psi``), whose true W+ code is known. Starting from the
average latent, the encoder refines ``iterations`` times; each refinement's loss is
back-propagated on its own (the previous reconstruction is detached, as in ReStyle) and the
optimiser steps once per batch. Loss per image (weights: :class:`~medveil.generative.invert.ReconWeights`):
pixel L2 + feature-map L2 + embedding cosine, plus ``latent`` x MSE(w, w_true) on generator samples.

Run directory::

    RUN/config.json              EncoderTrainConfig + generator config / fingerprint + feature net
    RUN/metrics.jsonl            one row per log interval
    RUN/checkpoints/latest.pt    encoder, optimiser, step, RNG (atomic; resume -> identical weights)
    RUN/encoder.pt               the trained encoder for inference (written at the end)
    RUN/summary.json             final losses, seconds, images seen
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from medveil.errors import ConfigError
from medveil.generative.checkpoint import (
    config_mismatch, load_checkpoint, rng_state, seed_everything, set_rng_state,
)
from medveil.io import save_torch_atomic, write_json_atomic, write_text_atomic
from medveil.generative.invert import DEFAULT_FEATURE_NET, ReconTargets, ReconWeights, recon_losses, to_unit
from medveil.generative.latent_opt import frozen
from medveil.generative.train import EpochSampler
from medveil.models.encoder import Encoder, EncoderConfig
from medveil.models.features import FeatureNet, build_feature_net
from medveil.models.stylegan2 import Generator
from medveil.progress import bar as progress_bar

ENCODER_FORMAT = "medveil-restyle-encoder/1"
RESUMABLE_FIELDS = ("steps", "log_every", "checkpoint_every")


@dataclass
class EncoderTrainConfig:
    steps: int = 1000
    batch: int = 8  # real images per step
    synth_batch: int = 4  # generator samples per step (true latent known)
    iterations: int = 3  # refinements per training step (inference may use more, e.g. 5)
    lr: float = 1e-4  # Adam
    truncation_psi: float = 0.8  # of the generator samples
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    feature_net: str = DEFAULT_FEATURE_NET
    weights: ReconWeights = field(default_factory=ReconWeights)
    width: int = 16  # encoder stem channels (CPU-sized; pSp-like capacity needs 32-64)
    head_channels: int = 64  # encoder pyramid / map2style channels

    def __post_init__(self) -> None:
        if isinstance(self.weights, dict):
            self.weights = ReconWeights(**self.weights)
        for name in ("steps", "batch", "iterations", "log_every", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"encoder training: {name} must be >= 1, got {getattr(self, name)}")
        if self.synth_batch < 0 or self.lr <= 0:
            raise ConfigError("encoder training: synth_batch must be >= 0 and lr > 0")

    def resume_key(self) -> dict[str, Any]:
        d = asdict(self)
        for name in RESUMABLE_FIELDS:
            d.pop(name)
        return d


def generator_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over a module's state dict (names, shapes, values), e.g. which G an encoder fits."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_encoder(encoder: Encoder, path: str | Path, meta: dict[str, Any]) -> Path:
    return save_torch_atomic(path, {"format": ENCODER_FORMAT, "encoder_config": encoder.cfg.to_dict(),
                                    "state_dict": encoder.state_dict(), **meta})


def load_encoder(path: str | Path, G: Generator | None = None) -> Encoder:
    """An encoder from ``RUN/encoder.pt`` (or the file itself); with ``G``, checks it fits:
    another W+ layout is a one-line ConfigError, other weights of the same layout a warning."""
    p = Path(path)
    if p.is_dir():
        if not (p / "encoder.pt").is_file() and (p / "checkpoints" / "latest.pt").is_file():
            raise ConfigError(f"{p}: encoder training has not finished (resume it to write encoder.pt)")
        p = p / "encoder.pt"
    ck = load_checkpoint(p)
    if not isinstance(ck, dict) or ck.get("format") != ENCODER_FORMAT:
        raise ConfigError(f"{p}: not a MedVeil encoder file (expected format {ENCODER_FORMAT})")
    enc = Encoder(EncoderConfig(**ck["encoder_config"]))
    enc.load_state_dict(ck["state_dict"])
    enc.eval().requires_grad_(False)
    if G is not None:
        enc.check_generator(G, where=str(p))
        if ck.get("generator_fingerprint") not in (None, generator_fingerprint(G)):
            warnings.warn(f"{p}: encoder was trained against other generator weights; "
                          "expect poorer inversions", stacklevel=2)
    return enc


class EncoderTrainer:
    def __init__(self, images: torch.Tensor, G: Generator, cfg: EncoderTrainConfig, run_dir: str | Path,
                 fnet: FeatureNet | None = None, progress: bool | None = None) -> None:
        if images.ndim != 4 or images.shape[1:] != (G.img_channels, G.resolution, G.resolution):
            raise ConfigError(f"training images have shape {tuple(images.shape)}, the generator expects "
                              f"(N, {G.img_channels}, {G.resolution}, {G.resolution}) in [0, 1]")
        self.cfg, self.G, self.progress = cfg, G, progress
        self.device = next(G.parameters()).device
        self.fnet = (fnet or build_feature_net(cfg.feature_net)).to(self.device)
        self.run_dir = Path(run_dir)
        self.ckpt_path = self.run_dir / "checkpoints" / "latest.pt"
        self.images = images.float()
        seed_everything(cfg.seed)
        self.encoder = Encoder(EncoderConfig.for_generator(G, width=cfg.width,
                                                            head_channels=cfg.head_channels)).to(self.device)
        with torch.no_grad():
            self.encoder.w_avg.copy_(G.mean_latent())
        self.opt = torch.optim.Adam(self.encoder.parameters(), lr=cfg.lr)
        self.sampler = EpochSampler(len(self.images), min(cfg.batch, len(self.images)))
        self.step = 0
        self.meta = {"generator_config": G.cfg.to_dict(), "generator_fingerprint": generator_fingerprint(G),
                     "feature_net": self.fnet.describe(), "train_config": asdict(cfg)}

    # ---------------------------------------------------------------- one step
    def train_step(self) -> dict[str, float]:
        cfg, G, E = self.cfg, self.G, self.encoder
        x = self.images[self.sampler.next()].to(self.device)  # (b, C, R, R) in [0, 1]
        w_true = None
        if cfg.synth_batch:
            with torch.no_grad():
                z = torch.randn(cfg.synth_batch, G.z_dim).to(self.device)
                w_true = G.broadcast(G.mapping(z, cfg.truncation_psi))  # (s, num_ws, w_dim)
                x = torch.cat([x, to_unit(G.synthesis(w_true, noise_mode="const")).clamp(0, 1)])
        n_real = x.shape[0] - (0 if w_true is None else w_true.shape[0])
        targets = ReconTargets(x, self.fnet)
        xs = x * 2 - 1
        w = E.w_avg.expand(x.shape[0], -1, -1)  # (B, num_ws, w_dim)
        with torch.no_grad():
            y = G.synthesis(w, noise_mode="const")
        self.opt.zero_grad(set_to_none=True)
        logs: dict[str, float] = {}
        for _ in range(cfg.iterations):
            w = w.detach() + E(xs, y.detach())  # (B, num_ws, w_dim)
            y = G.synthesis(w, noise_mode="const")
            per_image, parts = recon_losses(to_unit(y), targets, self.fnet, cfg.weights)  # (B,)
            if w_true is not None and cfg.weights.latent:
                latent = (w[n_real:] - w_true).square().mean(dim=(1, 2))  # (s,)
                per_image = per_image + cfg.weights.latent * torch.cat([torch.zeros(n_real, device=w.device), latent])
                parts["latent"] = latent
            (per_image.mean() / cfg.iterations).backward()
            for k, v in parts.items():
                logs[k] = logs.get(k, 0.0) + float(v.detach().mean()) / cfg.iterations
        self.opt.step()
        self.step += 1
        logs["pixel_last"] = float(parts["pixel"].detach().mean())
        return logs

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"config": asdict(self.cfg), "step": self.step, "encoder": self.encoder.state_dict(),
                "opt": self.opt.state_dict(), "sampler": self.sampler.state_dict(), "rng": rng_state(),
                "generator_fingerprint": self.meta["generator_fingerprint"]}

    def load_state_dict(self, ck: dict[str, Any]) -> None:
        config_mismatch(self.cfg.resume_key(), EncoderTrainConfig(**ck["config"]).resume_key(), str(self.ckpt_path))
        if ck["generator_fingerprint"] != self.meta["generator_fingerprint"]:
            raise ConfigError(f"{self.ckpt_path}: this encoder run was started against another generator")
        self.encoder.load_state_dict(ck["encoder"])
        self.opt.load_state_dict(ck["opt"])
        self.sampler.load_state_dict(ck["sampler"])
        self.step = int(ck["step"])
        set_rng_state(ck["rng"])

    # ---------------------------------------------------------------- loop
    def run(self, resume: bool = False) -> dict[str, Any]:
        cfg = self.cfg
        if self.ckpt_path.is_file():
            if not resume:
                raise ConfigError(f"{self.run_dir} already holds an encoder run; resume it or pick a new folder")
            self.load_state_dict(load_checkpoint(self.ckpt_path))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.run_dir / "config.json", self.meta)
        metrics = self.run_dir / "metrics.jsonl"
        if self.step == 0:
            metrics.unlink(missing_ok=True)
        elif metrics.is_file():  # drop rows logged after the checkpoint we resumed from
            keep = [ln for ln in metrics.read_text().splitlines() if json.loads(ln)["step"] <= self.step]
            write_text_atomic(metrics, "".join(ln + "\n" for ln in keep))
        t0, acc, n = time.perf_counter(), {}, 0
        with frozen(self.G, self.fnet):
            self.encoder.train()
            bar = progress_bar(total=cfg.steps, initial=self.step, desc="encoder", disable=self.progress is False)
            while self.step < cfg.steps:
                logs = self.train_step()
                acc = {k: acc.get(k, 0.0) + v for k, v in logs.items()}
                n += 1
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    row = {"step": self.step, **{k: v / n for k, v in acc.items()}}
                    with open(metrics, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    bar.set_postfix(pixel=f"{row['pixel']:.4f}")
                    acc, n = {}, 0
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    save_torch_atomic(self.ckpt_path, self.state_dict())
            bar.close()
        self.encoder.eval()
        save_encoder(self.encoder, self.run_dir / "encoder.pt", {**self.meta, "step": self.step})
        rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
        summary = {"steps": self.step, "seconds_this_session": time.perf_counter() - t0,
                   "last": rows[-1] if rows else {}, "feature_net": self.fnet.name}
        write_json_atomic(self.run_dir / "summary.json", summary)
        return summary


def train_encoder(images: torch.Tensor, G: Generator, cfg: EncoderTrainConfig, run_dir: str | Path, *,
                  resume: bool = False, fnet: FeatureNet | None = None, progress: bool | None = None
                  ) -> tuple[Encoder, dict[str, Any]]:
    """Train (or resume) an encoder on images (N, C, R, R) in [0, 1]; returns (encoder, summary)."""
    trainer = EncoderTrainer(images, G, cfg, run_dir, fnet=fnet, progress=progress)
    summary = trainer.run(resume=resume)
    return trainer.encoder, summary
