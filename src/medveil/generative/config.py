"""Training configuration of the GAN: a dataclass that round-trips through TOML.

```toml
steps = 2000
batch = 32
[gan]
resolution = 64
channel_max = 256
```
Unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from medveil.config_io import dataclass_from_dict, dumps_toml, read_toml
from medveil.errors import ConfigError
from medveil.models.stylegan2 import GANConfig

AUGMENT_MODES = ("ada", "fixed", "none")

# Fields that may change between a checkpoint and a resumed run without changing the maths
# of the steps already taken (the run length and logging / evaluation cadence).
RESUMABLE_FIELDS = ("steps", "log_every", "sample_every", "checkpoint_every", "eval_every",
                    "eval_images")


@dataclass
class TrainConfig:
    gan: GANConfig = field(default_factory=GANConfig)
    steps: int = 2000  # optimiser steps of D and G (one batch each)
    batch: int = 32
    lr: float = 0.0025  # Adam learning rate of G and D
    beta1: float = 0.0
    beta2: float = 0.99
    r1_gamma: float = 0.5  # R1 weight; StyleGAN2-ADA heuristic: 0.0002 * R^2 / batch
    r1_interval: int = 16  # lazy regularisation: R1 every this many D steps
    ema_kimg: float = 2.0  # EMA half-life of G_ema in thousands of images
    ema_rampup: float = 0.05  # half-life <= rampup * images seen (0 = off)
    mixing_prob: float = 0.9  # style-mixing regularisation probability
    augment: str = "ada"  # ada | fixed | none
    aug_p: float = 0.0  # initial (ada) or constant (fixed) augmentation probability
    ada_target: float = 0.6
    ada_interval: int = 4  # D steps between p updates
    ada_kimg: float = 50.0  # images (thousands) for p to move by 1
    seed: int = 0
    log_every: int = 10
    sample_every: int = 250
    checkpoint_every: int = 250
    eval_every: int = 0  # FID/KID every this many steps (0: only at the end, if an evaluator is given)
    eval_images: int = 500  # generated images per FID/KID evaluation
    grid_size: int = 16  # images in each sample grid (fixed z)

    def __post_init__(self) -> None:
        if isinstance(self.gan, dict):
            self.gan = GANConfig.from_dict(self.gan)
        if not isinstance(self.gan, GANConfig):
            raise ConfigError(f"train config: gan must be a table of GAN fields, got {self.gan!r}")
        for f in fields(self):
            v, t = getattr(self, f.name), f.type
            if (t == "int" and (not isinstance(v, int) or isinstance(v, bool))) or \
                    (t == "float" and not isinstance(v, (int, float))) or \
                    (t == "str" and not isinstance(v, str)):
                raise ConfigError(f"train config: {f.name} must be {t}, got {v!r}")
        if self.augment not in AUGMENT_MODES:
            raise ConfigError(f"augment must be one of {AUGMENT_MODES}, got {self.augment!r}")
        for name in ("steps", "batch", "r1_interval", "ada_interval", "log_every", "grid_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"train config: {name} must be >= 1, got {getattr(self, name)!r}")
        if not 0.0 <= self.aug_p <= 1.0:
            raise ConfigError(f"train config: aug_p must be in [0, 1], got {self.aug_p}")
        if self.lr <= 0 or self.r1_gamma < 0:
            raise ConfigError("train config: lr must be > 0 and r1_gamma >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def resume_key(self) -> dict[str, Any]:
        """The fields a resumed run must share with its checkpoint."""
        d = self.to_dict()
        for name in RESUMABLE_FIELDS:
            d.pop(name)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> TrainConfig:
        return dataclass_from_dict(cls, d, where)


def load_train_config(path: str | Path) -> TrainConfig:
    return TrainConfig.from_dict(read_toml(path), where=str(path))


def save_train_config(cfg: TrainConfig, path: str | Path) -> None:
    from medveil.io import write_text_atomic

    write_text_atomic(path, dumps_toml(cfg.to_dict()))
