"""A tiny StyleGAN2 on the shipped RetinaMNIST sample: a few minutes on 2 CPU cores.

``train_tiny`` is what ``medveil demo`` calls; the configs here are also the starting points
of the APTOS benchmark (``benchmarks/gan.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medveil.data.samples import sample_path
from medveil.generative.config import TrainConfig
from medveil.generative.data import load_gan_images
from medveil.generative.train import train_gan
from medveil.models.stylegan2 import GANConfig


def tiny_config(steps: int = 300, resolution: int = 32, seed: int = 0) -> TrainConfig:
    """Small CPU config: channels 64 at 4-16 px (32 at 32 px), batch 16, light R1, ADA fast."""
    gan = GANConfig(resolution=resolution, z_dim=64, w_dim=64, mapping_layers=2,
                    channel_base=1024, channel_max=64)
    return TrainConfig(gan=gan, steps=steps, batch=16, lr=0.0025, r1_gamma=0.1, ema_kimg=0.5,
                       mixing_prob=0.5, augment="ada", ada_kimg=10.0, seed=seed,
                       log_every=10, sample_every=100, checkpoint_every=100, grid_size=16)


def small64_config(steps: int = 600, seed: int = 0) -> TrainConfig:
    """64 px CPU config: channels 128/128/64/32/16 at 4/8/16/32/64 px, batch 16."""
    gan = GANConfig(resolution=64, z_dim=128, w_dim=128, mapping_layers=4,
                    channel_base=1024, channel_max=128)
    return TrainConfig(gan=gan, steps=steps, batch=16, lr=0.0025, r1_gamma=0.2, ema_kimg=1.0,
                       mixing_prob=0.5, augment="ada", ada_kimg=10.0, seed=seed,
                       log_every=10, sample_every=100, checkpoint_every=100, grid_size=16)


def default_retina_path() -> Path:
    """The RetinaMNIST sample shipped with MedVeil."""
    return sample_path("retinamnist")


def train_tiny(dataset_path: str | Path | None, out_dir: str | Path, steps: int = 300, *,
               split: str = "train", seed: int = 0, resume: bool = False,
               progress: bool | None = None) -> dict[str, Any]:
    """Train the tiny 32 px generator on ``dataset_path`` (default: shipped RetinaMNIST) [split]
    into ``out_dir``. Returns the run summary plus ``grid``: path of the final sample grid."""
    path = Path(dataset_path) if dataset_path else default_retina_path()
    cfg = tiny_config(steps=steps, seed=seed)
    images = load_gan_images(path, split, cfg.gan.resolution, cfg.gan.img_channels)
    summary = train_gan(images, cfg, out_dir, resume=resume, progress=progress)
    summary["grid"] = str(Path(out_dir) / "samples" / "latest.png")
    summary["dataset"] = str(path)
    return summary
