"""Transformer building blocks shared by the ViT encoder and the MAE decoder.

Module and parameter names follow timm / MAE ``models_mae.py`` so that MAE, MedMAE and timm
checkpoints load by key: ``patch_embed.proj``, ``blocks.{i}.norm1``, ``blocks.{i}.attn.qkv``,
``blocks.{i}.attn.proj``, ``blocks.{i}.norm2``, ``blocks.{i}.mlp.fc1``, ``blocks.{i}.mlp.fc2``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from medveil.errors import DataError

LN_EPS = 1e-6


def layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=LN_EPS)


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, L, D) with L = (H/p) * (W/p); a stride-p convolution (key ``proj``).

    Computed as patchify + one matmul with the conv weight viewed as (D, C*p*p), which is the
    same arithmetic as the convolution and faster on CPU for small patches.
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        p = self.patch_size
        if H != self.img_size or W != self.img_size or C != self.in_chans:
            raise DataError(f"model expects images ({self.in_chans}, {self.img_size}, {self.img_size}), "
                            f"got ({C}, {H}, {W}); resize with medveil.data.to_tensor(size=, channels=)")
        h, w = H // p, W // p
        # (B, C, h, p, w, p) -> (B, h, w, C, p, p) -> (B, L, C*p*p): the conv weight's (C, p, p) order
        patches = x.reshape(B, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C * p * p)
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)  # (B, L, D)


class _ConvTokens(nn.Module):
    """What the convolutional stems share: the token grid of ``PatchEmbed`` and a forward of
    ``stem`` (convolutions) then ``stem_proj`` (to D), set by the subclass."""

    stem: nn.Sequential
    stem_proj: nn.Conv2d

    def _grid(self, img_size: int, patch_size: int, in_chans: int) -> tuple[int, int]:
        """Sets the grid attributes; returns (factors of 2 in p, what is left of p)."""
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        n_down = (patch_size & -patch_size).bit_length() - 1
        return n_down, patch_size >> n_down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, C, H, W = x.shape
        if H != self.img_size or W != self.img_size or C != self.in_chans:
            raise DataError(f"model expects images ({self.in_chans}, {self.img_size}, {self.img_size}), "
                            f"got ({C}, {H}, {W}); resize with medveil.data.to_tensor(size=, channels=)")
        x = self.stem_proj(self.stem(x))  # (B, D, h, w)
        return x.flatten(2).transpose(1, 2)  # (B, L, D), row-major like PatchEmbed


class ConvStem(_ConvTokens):
    """Overlapping-convolution patch embedding (Xiao et al. 2021, "Early convolutions help
    transformers see better"): (B, C, H, W) -> (B, L, D) on the same token grid as ``PatchEmbed``.

    One 3x3 convolution at full resolution, then one stride-2 3x3 convolution per factor 2 of the
    patch size p (channels doubling, e.g. 48, 96, 192 for D = 192, p = 4), each with GroupNorm and
    GELU, then a projection to D whose kernel and stride are what is left of p (1x1 for a power of
    two; 7x7 stride 7 for p = 7). The convolutions overlap neighbouring patches: that is the
    locality a ViT lacks on small data, and why MAE must blank masked patches in pixel space
    before this stem (``MaskedAutoencoderViT``).
    Keys are its own (``patch_embed.stem.{i}.conv`` / ``.norm``, ``patch_embed.stem_proj``), so a
    public checkpoint's ``patch_embed.proj`` never loads into it by mistake. GroupNorm, not
    BatchNorm: no running statistics to average across sites or to drift between train and eval.
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        n_down, rest = self._grid(img_size, patch_size, in_chans)
        base = max(embed_dim >> (patch_size.bit_length() - 1), 8)  # D / 2^floor(log2 p): D / 4 for p = 4
        widths = [base << i for i in range(n_down + 1)]  # e.g. 48, 96, 192 (D = 192, p = 4); 24 (D = 96, p = 7)
        layers, c_in = [], in_chans
        for i, width in enumerate(widths):
            layers.append(ConvNormAct(c_in, width, stride=1 if i == 0 else 2))
            c_in = width
        self.stem = nn.Sequential(*layers)
        self.stem_proj = nn.Conv2d(c_in, embed_dim, kernel_size=rest, stride=rest)


class CnnStem(_ConvTokens):
    """Convolutional trunk under the transformer (a hybrid ViT, as ViT-R50 of Dosovitskiy et al.
    2021 at CPU size): (B, C, H, W) -> (B, L, D) on the same token grid as ``PatchEmbed``.

    Per factor 2 of the patch size p, one stage of two 3x3 convolutions (GroupNorm, GELU) and a
    2x2 max pool, widths ``STEM_WIDTH`` doubling per stage (32 at full resolution, 64 at half for
    p = 4); then a projection to D whose kernel and stride are what is left of p (1x1 for a power
    of two; for p = 7 one stage without pooling, then a 7x7 stride-7 projection). It is the small
    CNN's inductive bias (local filters, pooling) under two or so transformer blocks: on a site's
    own 2000 images it learns what a patch-projection ViT does not (README, "Training recipe
    options"). Masked image modelling stays sound as with ``ConvStem``: masked patches are blanked
    in pixel space before it. Keys: ``patch_embed.stem.{i}.conv`` / ``.norm`` and
    ``patch_embed.stem_proj``, its own.
    """

    STEM_WIDTH = 32

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        n_down, rest = self._grid(img_size, patch_size, in_chans)
        layers: list[nn.Module] = []
        c_in = in_chans
        for i in range(max(n_down, 1)):  # (B, c_in, h, w) -> (B, width, h/2, w/2), no pool when p is odd
            width = self.STEM_WIDTH << i
            layers += [ConvNormAct(c_in, width, stride=1), ConvNormAct(width, width, stride=1)]
            if n_down:
                layers.append(nn.MaxPool2d(2))
            c_in = width
        self.stem = nn.Sequential(*layers)
        self.stem_proj = nn.Conv2d(c_in, embed_dim, kernel_size=rest, stride=rest)


class ConvNormAct(nn.Module):
    """3x3 convolution (padding 1, no bias) -> GroupNorm (8 groups, or 1) -> GELU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)
        self.norm = nn.GroupNorm(8 if c_out % 8 == 0 else 1, c_out)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection and SDPA."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        H = self.num_heads
        # (B, N, 3D) -> (3, B, H, N, D/H)
        q, k, v = self.qkv(x).view(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, D/H)
        x = x.transpose(1, 2).reshape(B, N, D)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)); x + mlp(norm2(x)).

    ``drop_path``: stochastic depth while training (each sample's residual branch is dropped with
    this probability and the kept ones scaled by 1 / (1 - p)); a plain attribute, not in the
    state dict, 0 by default (then no random number is drawn).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = layer_norm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = 0.0

    def _branch(self, y: torch.Tensor) -> torch.Tensor:  # (B, N, D), some samples zeroed
        if not self.training or self.drop_path <= 0.0:
            return y
        keep = 1.0 - self.drop_path
        mask = (torch.rand(y.shape[0], 1, 1, device=y.device) < keep).to(y.dtype)
        return y * mask / keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, N, D)
        x = x + self._branch(self.attn(self.norm1(x)))
        return x + self._branch(self.mlp(self.norm2(x)))


def sincos_pos_embed(embed_dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding as in MAE: (1, [1 +] grid_size**2, embed_dim).

    Half the channels encode the row, half the column; the cls slot (first) is zeros.
    """
    if embed_dim % 4:
        raise ValueError(f"embed dim {embed_dim} must be a multiple of 4 for 2D sin-cos embeddings")

    def one_axis(dim: int, pos: np.ndarray) -> np.ndarray:  # (M,) -> (M, dim)
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    coords = np.arange(grid_size, dtype=np.float64)
    grid_w, grid_h = np.meshgrid(coords, coords)  # MAE order: w first
    emb = np.concatenate([one_axis(embed_dim // 2, grid_w), one_axis(embed_dim // 2, grid_h)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, embed_dim)), emb], axis=0)
    return torch.from_numpy(emb).float().unsqueeze(0)


def init_weights_mae(module: nn.Module) -> None:
    """MAE init for one module: xavier-uniform Linear with zero bias, LayerNorm (1, 0)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
