"""Models for ``medveil anonymize``: load a trained generator/encoder, or (``--quick``) train a
tiny StyleGAN2 and ReStyle encoder on the private images for a smoke run.

Quick models are for checking that the pipeline runs on your data, not for a release anyone
should use: a few hundred GAN steps at 32 px give blurry, barely fundus-like images. Both runs
go to ``RUN_DIR/gan`` and ``RUN_DIR/encoder`` and resume when killed (the trainers'
checkpoints), so a resumed ``--quick`` anonymisation reuses them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from medveil.anonymize.pipeline import Models
from medveil.errors import ConfigError
from medveil.generative.checkpoint import load_checkpoint, load_generator
from medveil.generative.demo import tiny_config
from medveil.generative.encoder_training import (
    EncoderTrainConfig, generator_fingerprint, load_encoder, train_encoder,
)
from medveil.generative.train import train_gan
from medveil.models.stylegan2 import GANConfig

# The GAN demo's tiny 32 px generator (medveil.generative.demo.tiny_config).
TINY_GAN: GANConfig = tiny_config().gan
QUICK_GAN_STEPS = 300
QUICK_ENCODER_STEPS = 100


def load_models(gan: str | Path, encoder: str | Path | None = None,
                device: str | torch.device = "cpu") -> Models:
    """The EMA generator of a GAN run (RUN_DIR or checkpoint) and optionally an encoder."""
    G = load_generator(gan).to(device)
    enc = load_encoder(encoder, G).to(device) if encoder is not None else None
    return Models(G, enc, {"gan": str(gan), "encoder": None if encoder is None else str(encoder),
                           "gan_config": G.cfg.to_dict(),
                           "generator_sha256": generator_fingerprint(G), "quick": False})


def quick_models(x: torch.Tensor, run_dir: str | Path, *, gan_steps: int = QUICK_GAN_STEPS,
                 encoder_steps: int = QUICK_ENCODER_STEPS, seed: int = 0,
                 progress: bool | None = None, device: str | torch.device = "cpu") -> Models:
    """Train (or resume, or reuse) a tiny GAN and encoder on x (N, C, H, W) in [0, 1]."""
    if gan_steps < 1 or encoder_steps < 0:
        raise ConfigError("quick mode needs gan steps >= 1 and encoder steps >= 0")
    run = Path(run_dir)
    gan_cfg = GANConfig(**{**TINY_GAN.to_dict(), "img_channels": int(x.shape[1])})
    if x.shape[-1] != gan_cfg.resolution or x.shape[-2] != gan_cfg.resolution:
        x = torch.nn.functional.interpolate(x, size=(gan_cfg.resolution,) * 2, mode="bilinear",
                                            antialias=True, align_corners=False).clamp(0, 1)
    train_cfg = dataclasses.replace(
        tiny_config(steps=gan_steps, seed=seed), gan=gan_cfg, batch=min(16, len(x)),
        log_every=max(1, gan_steps // 10), sample_every=gan_steps,
        checkpoint_every=max(1, gan_steps // 5))
    if _trained_steps(run / "gan") < gan_steps:
        train_gan(x, train_cfg, run / "gan", resume=True, device=str(device), progress=progress)
    G = load_generator(run / "gan").to(device)
    enc = None
    if encoder_steps:
        enc_cfg = EncoderTrainConfig(steps=encoder_steps, batch=min(8, len(x)), synth_batch=4,
                                     seed=seed, width=16, head_channels=32,
                                     checkpoint_every=max(1, encoder_steps // 5))
        if not (run / "encoder" / "encoder.pt").is_file():
            train_encoder(x, G, enc_cfg, run / "encoder", resume=True, progress=progress)
        enc = load_encoder(run / "encoder", G).to(device)
    info: dict[str, Any] = {"quick": True, "gan": str(run / "gan"),
                            "gan_steps": _trained_steps(run / "gan"),
                            "encoder": str(run / "encoder") if enc is not None else None,
                            "encoder_steps": encoder_steps, "gan_config": gan_cfg.to_dict(),
                            "generator_sha256": generator_fingerprint(G),
                            "note": "tiny models trained by --quick: a smoke run, not a release"}
    return Models(G, enc, info)


def _trained_steps(run: Path) -> int:
    ckpt = run / "checkpoints" / "latest.pt"
    return int(load_checkpoint(ckpt).get("step", 0)) if ckpt.is_file() else 0
