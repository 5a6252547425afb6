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
