"""Training-time augmentation of image batches for classifiers, chosen per modality.

Small datasets need augmentation more than anything else (a ViT or CNN trained on 2000 images
without it memorises them). What is safe depends on the images:

- a horizontal flip swaps left and right, so it is on only for modalities known to have no
  side (microscopy, pathology, dermoscopy, fundus, ultrasound, OCT) and off whenever a class
  name says "left" or "right" (OrganMNIST's kidney-left / kidney-right ...); CT, X-ray and any
  modality the rules do not know (a DICOM code, "unknown") are never mirrored;
- colour is diagnostic in stained microscopy, pathology, dermoscopy and fundus photographs, so
  their brightness / contrast jitter is mild and hue or saturation are never touched;
- cells, tissue and skin lesions have no up or down: vertical flips and any rotation are fine;
  anatomy (CT, X-ray, ultrasound, fundus) gets small rotations only.

:func:`policy_for` turns (modality, class names) into an :class:`AugmentPolicy`; ``apply`` draws
every random number from the generator it is given, so a seed gives the same batches. One affine
warp per image (random resized crop, flips, rotation) with reflection padding, then per-image
brightness / contrast. Inputs and outputs are float (B, C, H, W) in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from medveil.errors import ConfigError

AUGMENT_MODES = ("none", "flip", "auto")


@dataclass(frozen=True)
class AugmentPolicy:
    hflip: bool = False
    vflip: bool = False
    crop_scale: tuple[float, float] = (1.0, 1.0)  # random resized crop: kept area fraction
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # its aspect ratio range
    rotate_deg: float = 0.0  # uniform in [-deg, +deg]
    brightness: float = 0.0  # additive, uniform in [-b, +b]
    contrast: float = 0.0  # multiplicative about the image mean, uniform in [1 - c, 1 + c]

    @property
    def is_identity(self) -> bool:
        return self == AugmentPolicy(crop_ratio=self.crop_ratio)

    def apply(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> augmented (B, C, H, W) in [0, 1]; ``x`` is not modified."""
        if self.is_identity or len(x) == 0:
            return x
        B = x.shape[0]

        def uniform(lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(B, generator=gen, dtype=torch.float64)

        area = uniform(*self.crop_scale)
        log_ratio = uniform(math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1]))
        ratio = torch.minimum(torch.maximum(torch.exp(log_ratio), area), 1 / area)  # crop fits the image
        sx = torch.sqrt(area * ratio)  # kept width fraction, <= 1
        sy = torch.sqrt(area / ratio)  # kept height fraction, <= 1
        tx = (1 - sx) * uniform(-1.0, 1.0)  # crop centre within the image (normalised coords)
        ty = (1 - sy) * uniform(-1.0, 1.0)
        angle = torch.deg2rad(uniform(-self.rotate_deg, self.rotate_deg))
        fx, fy = (_signs(B, gen) if on else torch.ones(B, dtype=torch.float64)
                  for on in (self.hflip, self.vflip))
        cos, sin = torch.cos(angle), torch.sin(angle)
        # output (u, v) -> input: scale and flip, rotate, then shift to the crop centre
        theta = torch.stack([torch.stack([cos * sx * fx, -sin * sy * fy, tx], 1),
                             torch.stack([sin * sx * fx, cos * sy * fy, ty], 1)], 1)  # (B, 2, 3)
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        if self.contrast or self.brightness:
            c = uniform(1 - self.contrast, 1 + self.contrast).to(x.dtype).view(B, 1, 1, 1)
            b = uniform(-self.brightness, self.brightness).to(x.dtype).view(B, 1, 1, 1)
            mean = out.mean(dim=(1, 2, 3), keepdim=True)
            out = (out - mean) * c + mean + b
        return out.clamp(0.0, 1.0)


def _signs(n: int, gen: torch.Generator) -> torch.Tensor:
    """n random signs (a flip where -1), float64."""
    return torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()


NO_AUGMENT = AugmentPolicy()
ORIENTATION_FREE = ("microscopy", "pathology", "dermoscopy")  # no up, down, left or right
MIRROR_OK = ORIENTATION_FREE + ("fundus", "ultrasound", "oct")  # no anatomical side in the label
COLOUR_DIAGNOSTIC = ("microscopy", "pathology", "dermoscopy", "fundus")


def policy_for(modality: str, class_names: list[str] | tuple[str, ...], mode: str = "auto") -> AugmentPolicy:
    """The augmentation for a dataset: ``none``; ``flip`` (only the flips the rules allow); ``auto``
    (flips, random resized crop, rotation, brightness / contrast: the rules of the module docstring)."""
    if mode == "none":
        return NO_AUGMENT
    if mode not in ("flip", "auto"):
        raise ConfigError(f"augment must be one of {', '.join(AUGMENT_MODES)}, got {mode!r}")
    m = modality.lower()
    names = " ".join(class_names).lower()
    lateral = "left" in names or "right" in names or not any(k in m for k in MIRROR_OK)
    free = any(k in m for k in ORIENTATION_FREE)
    colour = any(k in m for k in COLOUR_DIAGNOSTIC)
    if mode == "flip":
        return AugmentPolicy(hflip=not lateral, vflip=free and not lateral)
    return AugmentPolicy(hflip=not lateral, vflip=free and not lateral, crop_scale=(0.7, 1.0),
                         rotate_deg=180.0 if free and not lateral else 10.0,
                         brightness=0.05 if colour else 0.15, contrast=0.05 if colour else 0.15)
