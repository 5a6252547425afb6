"""ReStyle-style iterative encoder into the W+ space of our StyleGAN2 (pure PyTorch, our own).

One refinement step reads the target image x and the current reconstruction y = G(w_t)
stacked as 6 channels and predicts a residual: ``w_{t+1} = w_t + E(x, y_t)``, starting from
the generator's average latent (stored in the encoder as the buffer ``w_avg``).

Backbone: a small ResNet (GroupNorm, leaky ReLU) halving the resolution per stage down to 4x4;
a feature pyramid (top-down, pSp-like) gives coarse (4x4), medium (8x8) and fine (16x16) maps;
one map2style head per W+ entry (strided convs to 1x1, then a linear layer) reads the map that
matches its synthesis layer: layers of the 4 and 8 px blocks -> coarse, 16 and 32 px -> medium,
64 px and above -> fine. The last linear layer of every head starts at zero, so an untrained
encoder returns the average latent.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from medveil.errors import ConfigError

PYRAMID = (4, 8, 16)  # sizes of the coarse / medium / fine maps


def w_resolutions(resolution: int) -> list[int]:
    """Synthesis resolution read by each W+ entry: [4, 4, 8, 8, 8, 16, 16, 16, ...] (num_ws long)."""
    res = [4, 4]
    for r in (2**i for i in range(3, int(math.log2(resolution)) + 1)):
        res += [r, r, r]
    return res


@dataclass
class EncoderConfig:
    resolution: int = 64
    img_channels: int = 3
    num_ws: int = 14
    w_dim: int = 128
    width: int = 16  # channels of the stem; doubled per stage up to max_width
    max_width: int = 256
    head_channels: int = 64  # channels of the pyramid maps and map2style heads

    def __post_init__(self) -> None:
        r = self.resolution
        if r < 32 or r & (r - 1):
            raise ConfigError(f"encoder resolution must be a power of two >= 32, got {r}")
        if self.num_ws != len(w_resolutions(r)):
            raise ConfigError(f"encoder: num_ws {self.num_ws} does not match the W+ layout of a "
                              f"{r} px StyleGAN2 ({len(w_resolutions(r))})")

    @classmethod
    def for_generator(cls, G: nn.Module, **kw: Any) -> EncoderConfig:
        return cls(resolution=G.resolution, img_channels=G.img_channels, num_ws=G.num_ws, w_dim=G.w_dim, **kw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, c), c)


class ResBlock(nn.Module):
    """Pre-activation residual block; ``down`` halves the resolution (stride-2 conv + 1x1 skip)."""

    def __init__(self, cin: int, cout: int, down: bool) -> None:
        super().__init__()
        stride = 2 if down else 1
        self.body = nn.Sequential(_norm(cin), nn.LeakyReLU(0.2), nn.Conv2d(cin, cout, 3, stride, 1),
                                  _norm(cout), nn.LeakyReLU(0.2), nn.Conv2d(cout, cout, 3, 1, 1))
        self.skip = nn.Conv2d(cin, cout, 1, stride) if (down or cin != cout) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, cin, H, W) -> (B, cout, H/s, W/s)
        return self.skip(x) + self.body(x)


class Map2Style(nn.Module):
    """(B, c, s, s) -> log2(s) stride-2 convs -> (B, c, 1, 1) -> linear -> (B, w_dim)."""

    def __init__(self, c: int, size: int, w_dim: int) -> None:
        super().__init__()
        convs: list[nn.Module] = []
        for _ in range(int(math.log2(size))):
            convs += [nn.Conv2d(c, c, 3, 2, 1), nn.LeakyReLU(0.2)]
        self.convs = nn.Sequential(*convs)
        self.linear = nn.Linear(c, w_dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.convs(x).flatten(1))


class Encoder(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        C, hc = cfg.img_channels, cfg.head_channels
        self.stem = nn.Conv2d(2 * C, cfg.width, 3, 1, 1)
        stages, widths, cin, res = [], [], cfg.width, cfg.resolution
        while res > 4:
            cout = min(cin * 2, cfg.max_width)
            stages.append(nn.Sequential(ResBlock(cin, cout, down=True), ResBlock(cout, cout, down=False)))
            widths.append(cout)
            cin, res = cout, res // 2
        self.stages = nn.ModuleList(stages)
        self.stage_res = [cfg.resolution // 2 ** (i + 1) for i in range(len(stages))]  # e.g. [32, 16, 8, 4]
        # lateral 1x1 convs onto the pyramid maps (4x4, 8x8, 16x16)
        self.lateral = nn.ModuleDict({str(s): nn.Conv2d(widths[self.stage_res.index(s)], hc, 1) for s in PYRAMID})
        self.level_of_w = [PYRAMID[0] if r <= 8 else PYRAMID[1] if r <= 32 else PYRAMID[2]
                           for r in w_resolutions(cfg.resolution)]
        self.heads = nn.ModuleList(Map2Style(hc, s, cfg.w_dim) for s in self.level_of_w)
        self.register_buffer("w_avg", torch.zeros(1, cfg.num_ws, cfg.w_dim))  # set from G.mean_latent

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x target, y current reconstruction, both (B, C, R, R) in [-1, 1] -> W+ residual (B, num_ws, w_dim)."""
        h = self.stem(torch.cat([x, y], dim=1))  # (B, width, R, R)
        feats = {}
        for res, stage in zip(self.stage_res, self.stages):
            h = stage(h)  # (B, c_res, res, res)
            feats[res] = h
        maps: dict[int, torch.Tensor] = {}
        top = None
        for s in PYRAMID:  # top-down: coarse, then each finer map adds the upsampled coarser one
            lat = self.lateral[str(s)](feats[s])  # (B, hc, s, s)
            top = lat if top is None else lat + F.interpolate(top, size=(s, s), mode="bilinear",
                                                               align_corners=False)
            maps[s] = top
        return torch.stack([head(maps[s]) for head, s in zip(self.heads, self.level_of_w)], dim=1)

    def check_generator(self, G: nn.Module, where: str = "encoder") -> None:
        """One-line ConfigError when ``G`` is not the kind of generator this encoder was built for."""
        c = self.cfg
        got = (G.resolution, G.img_channels, G.num_ws, G.w_dim)
        if got != (c.resolution, c.img_channels, c.num_ws, c.w_dim):
            raise ConfigError(f"{where} was trained for a {c.resolution} px, {c.img_channels}-channel generator with "
                              f"W+ ({c.num_ws}, {c.w_dim}); this generator is {got[0]} px, {got[1]}-channel, "
                              f"W+ ({got[2]}, {got[3]})")

    def invert(self, x: torch.Tensor, G: nn.Module, iterations: int = 5,
               return_all: bool = False) -> tuple[torch.Tensor, torch.Tensor] | list[tuple[torch.Tensor, torch.Tensor]]:
        """x (B, C, R, R) in [0, 1] -> (ws (B, num_ws, w_dim), reconstruction (B, C, R, R) in [0, 1])
        after ``iterations`` refinements from ``w_avg``; with return_all, the list of every
        step's (ws, recon), step 0 being the average latent."""
        self.check_generator(G)
        xs = x * 2 - 1
        w = self.w_avg.expand(x.shape[0], -1, -1)  # (B, num_ws, w_dim)
        y = G.synthesis(w, noise_mode="const")  # (B, C, R, R) in ~[-1, 1]
        steps = [(w, y)]
        for _ in range(iterations):
            w = w + self(xs, y)
            y = G.synthesis(w, noise_mode="const")
            steps.append((w, y))
        out = [(w_t, ((y_t + 1) / 2).clamp(0, 1)) for w_t, y_t in steps]
        return out if return_all else out[-1]
