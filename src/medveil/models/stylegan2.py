"""A small, readable StyleGAN2 (Karras et al. 2020) in plain PyTorch.

Generator = mapping network (PixelNorm + equalised-lr MLP, lr multiplier 0.01) that turns
z into w, and a synthesis network that starts from a learned constant 4x4 tensor and grows to
``resolution`` with modulated/demodulated 3x3 convolutions, per-layer noise and skip toRGB
outputs. The discriminator (residual ResNet with a minibatch-std epilogue) is
:mod:`medveil.models.stylegan2_discriminator`; both share the building blocks of this file.

W+ convention: every synthesis layer, toRGB layers included, reads its own style vector, so
``num_ws = 2 (4x4 block: conv + toRGB) + 3 per further block (up-conv, conv, toRGB)``;
e.g. 11 at 32 px, 14 at 64 px. ``mapping`` returns one w; ``forward`` broadcasts it.

Simplifications against the official code (documented, no custom CUDA ops):
- up/down sampling is bilinear interpolation / 2x2 average pooling, not upfirdn2d with a
  [1,3,3,1] FIR filter (slightly more aliasing, fine at <= 256 px);
- the modulated convolution has the grouped-conv form (one group per sample, used on CUDA)
  and the equivalent unfused form (used on CPU, where it is faster);
- no fp16 / conv clamping.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from medveil.config_io import dataclass_from_dict
from medveil.errors import ConfigError

NOISE_MODES = ("const", "random", "none")
LRELU_GAIN = math.sqrt(2.0)


@dataclass
class GANConfig:
    """Architecture of generator and discriminator (not training hyper-parameters)."""

    resolution: int = 64
    z_dim: int = 128
    w_dim: int = 128
    mapping_layers: int = 4
    channel_base: int = 4096  # channels at resolution r = min(channel_base // r, channel_max)
    channel_max: int = 256
    img_channels: int = 3
    mapping_lr_mul: float = 0.01
    w_avg_beta: float = 0.995  # EMA decay of the tracked average w (truncation centre)
    mbstd_group: int = 4  # minibatch-std group size in the discriminator

    def __post_init__(self) -> None:
        r = self.resolution
        if not isinstance(r, int) or r < 32 or r > 256 or r & (r - 1):
            raise ConfigError(f"GAN resolution must be a power of two in [32, 256], got {r!r}")
        for name in ("z_dim", "w_dim", "mapping_layers", "channel_base", "channel_max",
                     "img_channels", "mbstd_group"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"GAN config: {name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("mapping_lr_mul", "w_avg_beta"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) <= 0:
                raise ConfigError(f"GAN config: {name} must be a positive number")
        if self.img_channels not in (1, 3):
            raise ConfigError(f"GAN config: img_channels must be 1 or 3, got {self.img_channels}")

    def channels(self, res: int) -> int:
        """Feature channels of the block working at ``res`` x ``res``."""
        return max(1, min(self.channel_base // res, self.channel_max))

    @property
    def block_resolutions(self) -> list[int]:
        """[4, 8, ..., resolution]."""
        return [2**i for i in range(2, int(math.log2(self.resolution)) + 1)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GANConfig:
        return dataclass_from_dict(cls, d, "GAN config")


# --------------------------------------------------------------------------- building blocks


class EqualLinear(nn.Module):
    """Fully connected layer with equalised learning rate: weights stored ~N(0, 1/lr_mul^2) and
    scaled at run time by lr_mul / sqrt(fan_in); optional leaky ReLU (gain sqrt 2)."""

    def __init__(self, in_dim: int, out_dim: int, lr_mul: float = 1.0, bias_init: float = 0.0,
                 activation: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init) / lr_mul))
        self.weight_gain = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in) -> (B, out)
        x = F.linear(x, self.weight * self.weight_gain, self.bias * self.lr_mul)
        return F.leaky_relu(x, 0.2) * LRELU_GAIN if self.activation else x


class EqualConv2d(nn.Module):
    """Conv with equalised learning rate; ``down`` halves the resolution (2x2 average pool
    after the convolution); optional leaky ReLU (gain sqrt 2)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, bias: bool = True,
                 activation: bool = False, down: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_ch)) if bias else None
        self.weight_gain = 1.0 / math.sqrt(in_ch * kernel * kernel)
        self.activation, self.down, self.padding = activation, down, kernel // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in, H, W) -> (B, out, H', W')
        x = F.conv2d(x, self.weight * self.weight_gain, padding=self.padding)
        if self.down:
            x = F.avg_pool2d(x, 2)
        if self.bias is not None:
            x = x + self.bias.view(1, -1, 1, 1)
        return F.leaky_relu(x, 0.2) * LRELU_GAIN if self.activation else x


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, 2H, 2W), bilinear (stands in for upfirdn2d)."""
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


class ModulatedConv2d(nn.Module):
    """Style-modulated convolution: per-sample weights w' = w * s (s = affine(style)),
    optionally demodulated to unit norm per output channel. ``up`` upsamples the input 2x
    (bilinear) before the convolution.

    Two equivalent forms (as in the reference implementation):
    - fused (grouped conv): build the (B*out, in, k, k) per-sample weights and run one conv with
      B groups;
    - unfused: scale the input channels by s, run the shared-weight conv over the batch, scale
      the output channels by the demodulation coefficients. Same maths, faster on CPU when
      channels are wide (one large convolution instead of B small ones), so ``fused=None`` uses
      it on CPU (training, sampling, latent optimisation) and the grouped form on CUDA, where it
      is the usual fast path.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, w_dim: int,
                 demodulate: bool = True, up: bool = False) -> None:
        super().__init__()
        self.affine = EqualLinear(w_dim, in_ch, bias_init=1.0)  # style starts at 1
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel, kernel))
        self.weight_gain = 1.0 / math.sqrt(in_ch * kernel * kernel)
        self.in_ch, self.out_ch, self.kernel = in_ch, out_ch, kernel
        self.demodulate, self.up = demodulate, up
        self.fused: bool | None = None  # None: grouped form on CUDA, unfused on CPU

    def forward(self, x: torch.Tensor, w: torch.Tensor, fused: bool | None = None) -> torch.Tensor:
        # x: (B, in, H, W); w: (B, w_dim) -> (B, out, H or 2H, W or 2W)
        b = x.shape[0]
        styles = self.affine(w)  # (B, in)
        if self.up:
            x = upsample2x(x)
        h, wd = x.shape[2], x.shape[3]
        weight = self.weight * self.weight_gain  # (out, in, k, k)
        fused = self.fused if fused is None else fused
        if fused if fused is not None else x.is_cuda:
            wb = weight[None] * styles[:, None, :, None, None]  # (B, out, in, k, k)
            if self.demodulate:
                dcoef = torch.rsqrt(wb.square().sum(dim=(2, 3, 4)) + 1e-8)  # (B, out)
                wb = wb * dcoef[:, :, None, None, None]
            x = x.reshape(1, b * self.in_ch, h, wd)  # (1, B*in, H, W)
            wb = wb.reshape(b * self.out_ch, self.in_ch, self.kernel, self.kernel)
            x = F.conv2d(x, wb, padding=self.kernel // 2, groups=b)  # (1, B*out, H, W)
            return x.reshape(b, self.out_ch, h, wd)
        x = F.conv2d(x * styles[:, :, None, None], weight, padding=self.kernel // 2)  # (B, out, H, W)
        if self.demodulate:
            # sum_{in,k,k} (w * s)^2 = s^2 @ (sum_{k,k} w^2)^T
            dcoef = torch.rsqrt(styles.square() @ weight.square().sum(dim=(2, 3)).t() + 1e-8)
            x = x * dcoef[:, :, None, None]  # (B, out)
        return x


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv + scaled per-pixel noise + bias + leaky ReLU.

    Noise: "const" uses the fixed buffer ``noise_const`` (deterministic output), "random" draws
    fresh noise, "none" adds nothing. ``noise_strength`` is learned (starts at 0)."""

    def __init__(self, in_ch: int, out_ch: int, w_dim: int, resolution: int, up: bool) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(in_ch, out_ch, 3, w_dim, demodulate=True, up=up)
        self.register_buffer("noise_const", torch.randn(resolution, resolution))  # (R, R)
        self.noise_strength = nn.Parameter(torch.zeros(()))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.resolution = resolution

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str) -> torch.Tensor:
        x = self.conv(x, w)  # (B, out, R, R)
        if noise_mode == "random":
            noise = torch.randn(x.shape[0], 1, self.resolution, self.resolution,
                                device=x.device, dtype=x.dtype)
            x = x + noise * self.noise_strength
        elif noise_mode == "const":
            x = x + self.noise_const * self.noise_strength
        return F.leaky_relu(x + self.bias.view(1, -1, 1, 1), 0.2) * LRELU_GAIN


class ToRGB(nn.Module):
    """Modulated 1x1 conv (no demodulation) to image channels."""

    def __init__(self, in_ch: int, img_channels: int, w_dim: int) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(in_ch, img_channels, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(img_channels))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # -> (B, C, R, R)
        return self.conv(x, w) + self.bias.view(1, -1, 1, 1)


class SynthesisBlock(nn.Module):
    """One resolution of the synthesis network.

    4x4 block: const input -> conv1 -> toRGB (2 styles). Others: up-conv0 -> conv1 -> toRGB
    (3 styles); the image so far is upsampled and the new toRGB output added (skip
    architecture)."""

    def __init__(self, in_ch: int, out_ch: int, w_dim: int, resolution: int,
                 img_channels: int) -> None:
        super().__init__()
        self.first = resolution == 4
        if self.first:
            self.const = nn.Parameter(torch.randn(out_ch, 4, 4))
        else:
            self.conv0 = SynthesisLayer(in_ch, out_ch, w_dim, resolution, up=True)
        self.conv1 = SynthesisLayer(out_ch, out_ch, w_dim, resolution, up=False)
        self.torgb = ToRGB(out_ch, img_channels, w_dim)
        self.num_ws = 2 if self.first else 3

    def forward(self, x: torch.Tensor | None, img: torch.Tensor | None, ws: torch.Tensor,
                noise_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        # ws: (B, num_ws, w_dim) for this block; x: (B, in, R/2, R/2); img: (B, C, R/2, R/2)
        i = 0
        if self.first:
            x = self.const[None].repeat(ws.shape[0], 1, 1, 1)  # (B, out, 4, 4); a copy, not a view
        else:
            x = self.conv0(x, ws[:, 0], noise_mode)  # (B, out, R, R)
            i = 1
        x = self.conv1(x, ws[:, i], noise_mode)
        y = self.torgb(x, ws[:, i + 1])  # (B, C, R, R)
        img = y if img is None else upsample2x(img) + y
        return x, img


class SynthesisNetwork(nn.Module):
    def __init__(self, cfg: GANConfig) -> None:
        super().__init__()
        blocks = []
        in_ch = 0
        for res in cfg.block_resolutions:
            out_ch = cfg.channels(res)
            blocks.append(SynthesisBlock(in_ch, out_ch, cfg.w_dim, res, cfg.img_channels))
            in_ch = out_ch
        self.blocks = nn.ModuleList(blocks)
        self.num_ws = sum(b.num_ws for b in self.blocks)

    def forward(self, ws: torch.Tensor, noise_mode: str = "const") -> torch.Tensor:
        if noise_mode not in NOISE_MODES:
            raise ConfigError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        if ws.ndim != 3 or ws.shape[1] != self.num_ws:
            raise ConfigError(f"synthesis expects ws (B, {self.num_ws}, w_dim), got {tuple(ws.shape)}")
        x = img = None
        i = 0
        for block in self.blocks:
            x, img = block(x, img, ws[:, i:i + block.num_ws], noise_mode)
            i += block.num_ws
        return img  # (B, C, R, R)


class MappingNetwork(nn.Module):
    """z (B, z_dim) -> PixelNorm -> mapping_layers x [EqualLinear + lrelu] -> w (B, w_dim).
    Keeps ``w_avg``, an EMA of w over training batches (the truncation centre)."""

    def __init__(self, cfg: GANConfig) -> None:
        super().__init__()
        dims = [cfg.z_dim] + [cfg.w_dim] * cfg.mapping_layers
        self.layers = nn.ModuleList(
            EqualLinear(dims[i], dims[i + 1], lr_mul=cfg.mapping_lr_mul, activation=True)
            for i in range(cfg.mapping_layers)
        )
        self.register_buffer("w_avg", torch.zeros(cfg.w_dim))
        self.w_avg_beta = cfg.w_avg_beta

    def forward(self, z: torch.Tensor, truncation_psi: float = 1.0) -> torch.Tensor:
        x = z * torch.rsqrt(z.square().mean(dim=1, keepdim=True) + 1e-8)  # PixelNorm
        for layer in self.layers:
            x = layer(x)
        if self.training:  # track the average w; not part of the graph
            with torch.no_grad():
                batch_mean = x.detach().mean(dim=0)
                self.w_avg.copy_(batch_mean.lerp(self.w_avg, self.w_avg_beta))
        if truncation_psi != 1.0:
            x = self.w_avg.lerp(x, truncation_psi)  # w_avg + psi * (w - w_avg)
        return x


class Generator(nn.Module):
    """StyleGAN2 generator. See the module docstring for the W+ layout."""

    def __init__(self, cfg: GANConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.z_dim, self.w_dim = cfg.z_dim, cfg.w_dim
        self.img_channels, self.resolution = cfg.img_channels, cfg.resolution
        self.mapping_net = MappingNetwork(cfg)
        self.synthesis_net = SynthesisNetwork(cfg)
        self.num_ws = self.synthesis_net.num_ws

    def mapping(self, z: torch.Tensor, truncation_psi: float = 1.0) -> torch.Tensor:
        """z (B, z_dim) -> w (B, w_dim)."""
        return self.mapping_net(z, truncation_psi)

    def synthesis(self, ws: torch.Tensor, noise_mode: str = "const") -> torch.Tensor:
        """ws (B, num_ws, w_dim) -> image (B, C, R, R), roughly in [-1, 1]."""
        return self.synthesis_net(ws, noise_mode)

    def set_modconv_form(self, fused: bool | None) -> Generator:
        """Force the grouped (True) or unfused (False) modulated conv; None: by device.
        Same results either way; unfused is usually faster on CPU (e.g. for latent optimisation)."""
        for m in self.modules():
            if isinstance(m, ModulatedConv2d):
                m.fused = fused
        return self

    def broadcast(self, w: torch.Tensor) -> torch.Tensor:
        """w (B, w_dim) -> ws (B, num_ws, w_dim)."""
        return w[:, None, :].expand(-1, self.num_ws, -1)

    def forward(self, z: torch.Tensor, truncation_psi: float = 1.0,
                noise_mode: str = "const") -> torch.Tensor:
        return self.synthesis(self.broadcast(self.mapping(z, truncation_psi)), noise_mode)

    @torch.no_grad()
    def mean_latent(self, n: int = 4096, seed: int = 0) -> torch.Tensor:
        """Mean of w over n random z (fixed seed), broadcast to W+: (1, num_ws, w_dim).
        Does not touch ``w_avg`` (the mapping runs in eval mode)."""
        device = self.mapping_net.w_avg.device
        gen = torch.Generator(device="cpu").manual_seed(seed)
        z = torch.randn(n, self.z_dim, generator=gen).to(device)
        was_training = self.mapping_net.training
        self.mapping_net.eval()
        try:
            w = torch.cat([self.mapping_net(chunk) for chunk in z.split(1024)]).mean(dim=0)
        finally:
            self.mapping_net.train(was_training)
        return w[None, None, :].expand(1, self.num_ws, -1).clone()
