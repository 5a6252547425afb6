"""The StyleGAN2 discriminator (Karras et al. 2020): residual ResNet from full resolution down
to 4x4, then a minibatch-std channel, a conv and two FC layers -> one logit per image. Built from
the equalised-lr blocks of :mod:`medveil.models.stylegan2`."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from medveil.models.stylegan2 import EqualConv2d, EqualLinear, GANConfig


class DiscriminatorBlock(nn.Module):
    """Residual block: conv3x3 -> conv3x3 + 2x down, plus a 1x1 down skip; sum / sqrt 2."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv0 = EqualConv2d(in_ch, in_ch, 3, activation=True)
        self.conv1 = EqualConv2d(in_ch, out_ch, 3, activation=True, down=True)
        self.skip = EqualConv2d(in_ch, out_ch, 1, bias=False, down=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in, R, R) -> (B, out, R/2, R/2)
        return (self.skip(x) + self.conv1(self.conv0(x))) / math.sqrt(2.0)


def minibatch_std(x: torch.Tensor, group: int) -> torch.Tensor:
    """Append one channel: the std over groups of samples, averaged over C, H, W.
    (B, C, H, W) -> (B, C+1, H, W). The group size is the largest divisor of B <= group."""
    b, c, h, w = x.shape
    g = max(d for d in range(1, min(group, b) + 1) if b % d == 0)
    y = x.reshape(g, b // g, c, h, w)
    y = (y - y.mean(dim=0)).square().mean(dim=0).add(1e-8).sqrt()  # (B/g, C, H, W)
    y = y.mean(dim=(1, 2, 3)).reshape(-1, 1, 1, 1).repeat(g, 1, h, w)  # (B, 1, H, W)
    return torch.cat([x, y], dim=1)


class Discriminator(nn.Module):
    """Residual StyleGAN2 discriminator: fromRGB at full resolution, one block per octave down
    to 4x4, then minibatch-std, conv, and two FC layers -> one logit per image."""

    def __init__(self, cfg: GANConfig) -> None:
        super().__init__()
        self.cfg = cfg
        resolutions = cfg.block_resolutions[::-1]  # [R, R/2, ..., 4]
        self.fromrgb = EqualConv2d(cfg.img_channels, cfg.channels(cfg.resolution), 1,
                                   activation=True)
        self.blocks = nn.Sequential(*[
            DiscriminatorBlock(cfg.channels(res), cfg.channels(res // 2))
            for res in resolutions[:-1]
        ])
        ch4 = cfg.channels(4)
        self.conv = EqualConv2d(ch4 + 1, ch4, 3, activation=True)
        self.fc = EqualLinear(ch4 * 16, ch4, activation=True)
        self.out = EqualLinear(ch4, 1)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        # img: (B, C, R, R) in [-1, 1] -> logits (B,)
        x = self.blocks(self.fromrgb(img))  # (B, ch4, 4, 4)
        x = self.conv(minibatch_std(x, self.cfg.mbstd_group))  # (B, ch4, 4, 4)
        x = self.fc(x.flatten(1))  # (B, ch4)
        return self.out(x).squeeze(1)
