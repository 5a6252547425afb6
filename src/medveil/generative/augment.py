"""Differentiable augmentation for GAN training on small data (DiffAugment / ADA style).

``augment(x, p)`` applies, to every image independently with probability ``p`` per operation:
horizontal flip, an affine warp (integer-ish translation up to 1/8 of the size, rotation up to
``max_rotate_deg``, isotropic log-normal scaling) through ``affine_grid``/``grid_sample``,
brightness, saturation and contrast changes, and cutout. Every op is differentiable in ``x``,
so the same function is used on real and generated images and gradients reach G.

``AdaptiveP`` is the ADA controller: it watches r_t = E[sign(D(real))] over an interval and
raises p when D over-fits (r_t > target), lowers it otherwise, clamped to [0, p_max].

All randomness comes from the global torch RNG, so checkpointing ``torch.get_rng_state()``
makes training resume exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugmentSpec:
    translate: float = 0.125  # max shift as a fraction of the image size
    max_rotate_deg: float = 10.0
    scale_std: float = 0.1  # std of log2(scale)
    brightness: float = 0.5  # add U(-b, b) to images in [-1, 1]
    saturation: float = 1.0  # multiply the chroma by U(1-s, 1+s)
    contrast: float = 0.5  # multiply the contrast by U(1-c, 1+c)
    cutout: float = 0.25  # side of the square hole as a fraction of the image size


def _chosen(b: int, p: float, device: torch.device) -> torch.Tensor:
    """(B,) float mask: 1 where an op is applied (probability p)."""
    return (torch.rand(b, device=device) < p).float()


def augment(x: torch.Tensor, p: float, spec: AugmentSpec | None = None) -> torch.Tensor:
    """x: (B, C, H, W) images in [-1, 1] -> augmented (B, C, H, W). Identity when p <= 0."""
    if p <= 0:
        return x
    s = spec or AugmentSpec()
    b, c, h, w = x.shape
    dev = x.device

    # --- geometry: one affine matrix per image (flip * rotate * scale, then translate)
    flip = 1.0 - 2.0 * _chosen(b, p, dev)  # (B,) +-1
    angle = (torch.rand(b, device=dev) * 2 - 1) * math.radians(s.max_rotate_deg) * _chosen(b, p, dev)
    scale = torch.exp2(torch.randn(b, device=dev) * s.scale_std * _chosen(b, p, dev))
    shift = (torch.rand(b, 2, device=dev) * 2 - 1) * 2 * s.translate * _chosen(b, p, dev)[:, None]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([  # (B, 2, 3) maps output coords -> input coords, in [-1, 1] units
        torch.stack([cos * flip, -sin, shift[:, 0]], dim=1),
        torch.stack([sin * flip, cos, shift[:, 1]], dim=1),
    ], dim=1)
    identity = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]], device=dev)
    if not torch.equal(theta, identity.expand(b, 2, 3)):
        grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)  # (B, H, W, 2)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    # --- colour (on [-1, 1] images)
    x = x + ((torch.rand(b, device=dev) * 2 - 1) * s.brightness * _chosen(b, p, dev)).view(b, 1, 1, 1)
    if c == 3:
        sat = 1 + (torch.rand(b, device=dev) * 2 - 1) * s.saturation * _chosen(b, p, dev)
        grey = x.mean(dim=1, keepdim=True)  # (B, 1, H, W)
        x = grey + (x - grey) * sat.view(b, 1, 1, 1)
    con = 1 + (torch.rand(b, device=dev) * 2 - 1) * s.contrast * _chosen(b, p, dev)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = mean + (x - mean) * con.view(b, 1, 1, 1)

    # --- cutout: zero a square at a random centre (mask is constant, so still differentiable)
    size_h, size_w = max(1, int(h * s.cutout)), max(1, int(w * s.cutout))
    cy = torch.randint(0, h, (b, 1, 1), device=dev)
    cx = torch.randint(0, w, (b, 1, 1), device=dev)
    ys = torch.arange(h, device=dev).view(1, h, 1)
    xs = torch.arange(w, device=dev).view(1, 1, w)
    hole = ((ys - cy).abs() <= size_h // 2) & ((xs - cx).abs() <= size_w // 2)  # (B, H, W)
    hole = hole & (_chosen(b, p, dev) > 0).view(b, 1, 1)
    return x * (~hole).unsqueeze(1).to(x.dtype)


class AdaptiveP:
    """ADA probability controller.

    Call ``observe(real_logits)`` after every discriminator step. Every ``interval`` calls it
    sets r_t = mean(sign(D(real))) over those steps and moves p by
    ``sign(r_t - target) * images_seen / (speed_kimg * 1000)``, clamped to [0, p_max]
    (``speed_kimg``: images for p to move by 1; ADA uses 500, small CPU runs want ~20-100).
    """

    def __init__(self, target: float = 0.6, interval: int = 4, speed_kimg: float = 50.0,
                 p: float = 0.0, p_max: float = 0.8) -> None:
        self.target, self.interval, self.speed_kimg, self.p_max = target, interval, speed_kimg, p_max
        self.p = float(p)
        self.r_t = 0.0
        self._sign_sum = 0.0
        self._count = 0  # images seen this interval
        self._calls = 0

    def observe(self, real_logits: torch.Tensor) -> float:
        """Accumulate sign(D(real)); returns the (possibly updated) p."""
        self._sign_sum += float(torch.sign(real_logits.detach()).sum())
        self._count += int(real_logits.numel())
        self._calls += 1
        if self._calls >= self.interval:
            self.r_t = self._sign_sum / max(1, self._count)
            step = self._count / (self.speed_kimg * 1000.0)
            direction = 1.0 if self.r_t > self.target else -1.0
            self.p = min(self.p_max, max(0.0, self.p + direction * step))
            self._sign_sum, self._count, self._calls = 0.0, 0, 0
        return self.p

    def state_dict(self) -> dict[str, float]:
        return {"p": self.p, "r_t": self.r_t, "sign_sum": self._sign_sum,
                "count": self._count, "calls": self._calls}

    def load_state_dict(self, d: dict[str, float]) -> None:
        self.p, self.r_t = float(d["p"]), float(d["r_t"])
        self._sign_sum, self._count, self._calls = float(d["sign_sum"]), int(d["count"]), int(d["calls"])
