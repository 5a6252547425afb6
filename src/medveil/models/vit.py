"""Vision Transformer encoder (timm / MAE key layout) and its config.

Inputs are float (B, C, H, W) in [0, 1]; the model normalises them inside with ImageNet
mean/std (grey: their channel averages) held in non-persistent buffers, so the state dict has
exactly the timm / MAE keys and MAE or MedMAE checkpoints see the inputs they were trained on.
Position embeddings are the fixed 2D sin-cos table of MAE (stored, not trained).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn

from medveil.config_io import dataclass_from_dict
from medveil.errors import ConfigError
from medveil.models.layers import Block, CnnStem, ConvStem, PatchEmbed, init_weights_mae, layer_norm, sincos_pos_embed

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GREY_MEAN, GREY_STD = (0.449,), (0.226,)  # the ImageNet channel averages, for 1-channel models
STEMS = {"patch": PatchEmbed, "conv": ConvStem, "cnn": CnnStem}
GLOBAL_POOLS = ("token", "token+avg")


@dataclass
class ViTConfig:
    img_size: int = 32
    patch_size: int = 4
    in_chans: int = 3
    embed_dim: int = 192
    depth: int = 6
    num_heads: int = 3
    mlp_ratio: float = 4.0
    decoder_embed_dim: int = 128
    decoder_depth: int = 2
    decoder_num_heads: int = 4
    norm_pix_loss: bool = True
    # "patch": the timm / MAE linear patch projection (public checkpoints load into it);
    # "conv": overlapping 3x3 convolutions to the same token grid (layers.ConvStem, own keys),
    # the locality a ViT lacks when a site holds a few thousand images;
    # "cnn": a convolutional trunk (two 3x3 convolutions and a max pool per factor 2 of the patch,
    # layers.CnnStem, own keys) under fewer blocks: a hybrid ViT
    stem: str = "patch"
    # what a head reads: "token" the cls token after the final norm (timm's global_pool = "token");
    # "token+avg" the cls token and the mean of the patch tokens, both after the final norm,
    # concatenated (2 * embed_dim; our extension): the patch tokens carry what the cls token drops
    global_pool: str = "token"

    @classmethod
    def tiny(cls, img_size: int = 32, in_chans: int = 3) -> ViTConfig:
        """Small CPU model: dim 192, depth 6, 3 heads, patch 4 (a 7x7 grid at 28 px, 8x8 at 32)."""
        return cls(img_size=img_size, in_chans=in_chans)

    @classmethod
    def base16(cls, img_size: int = 224, in_chans: int = 3) -> ViTConfig:
        """ViT-B/16 with the MAE decoder (512 wide, 8 blocks, 16 heads): MAE / MedMAE checkpoints."""
        return cls(img_size=img_size, patch_size=16, in_chans=in_chans, embed_dim=768, depth=12,
                   num_heads=12, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def feature_dim(self) -> int:
        """Width of what ``forward_features`` returns and every head reads."""
        return self.embed_dim * (2 if self.global_pool == "token+avg" else 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ViTConfig:
        return dataclass_from_dict(cls, data, "ViT config")

    def validate(self) -> None:
        if self.img_size % self.patch_size:
            raise ConfigError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        for dim, heads, what in ((self.embed_dim, self.num_heads, "embed_dim"),
                                 (self.decoder_embed_dim, self.decoder_num_heads, "decoder_embed_dim")):
            if dim % heads or dim % 4:
                raise ConfigError(f"{what} {dim} must be divisible by its head count {heads} and by 4")
        if self.stem not in STEMS:
            raise ConfigError(f"stem must be one of {sorted(STEMS)}, got {self.stem!r}")
        if self.global_pool not in GLOBAL_POOLS:
            raise ConfigError(f"global_pool must be one of {', '.join(GLOBAL_POOLS)}, got {self.global_pool!r}")
        if self.in_chans not in (1, 3):
            raise ConfigError(f"in_chans must be 1 or 3, got {self.in_chans}")


class VisionTransformer(nn.Module):
    """ViT encoder: patch embed + cls token + fixed pos embed -> pre-norm blocks -> norm -> head."""

    def __init__(self, cfg: ViTConfig, num_classes: int = 0) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed_dim = cfg.embed_dim
        self.feature_dim = cfg.feature_dim  # what heads read: D, or 2D for global_pool = "token+avg"
        self.num_classes = num_classes
        D = cfg.embed_dim
        self.patch_embed = STEMS[cfg.stem](cfg.img_size, cfg.patch_size, cfg.in_chans, D)
        L = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        # fixed sin-cos table, stored in the state dict like MAE does
        self.pos_embed = nn.Parameter(sincos_pos_embed(D, cfg.grid_size), requires_grad=False)  # (1, 1+L, D)
        self.blocks = nn.ModuleList(Block(D, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = layer_norm(D)
        self.head: nn.Module = nn.Linear(self.feature_dim, num_classes) if num_classes > 0 else nn.Identity()

        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if cfg.in_chans == 3 else (GREY_MEAN, GREY_STD)
        self.register_buffer("input_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        assert self.pos_embed.shape[1] == 1 + L
        self._init_weights()

    def _init_weights(self) -> None:
        # patch projection initialised like a Linear on the flattened patch (MAE); the conv
        # stem keeps PyTorch's (Kaiming-uniform) convolution init
        if isinstance(self.patch_embed, PatchEmbed):
            nn.init.xavier_uniform_(self.patch_embed.proj.weight.view(self.embed_dim, -1))
            nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        self.apply(init_weights_mae)

    def set_drop_path(self, rate: float) -> None:
        """Stochastic depth for training: block i drops its branches with rate * i / (depth - 1)."""
        n = len(self.blocks)
        for i, blk in enumerate(self.blocks):
            blk.drop_path = rate * i / max(1, n - 1)

    def layer_of(self, name: str) -> int:
        """Depth of a parameter for layer-wise learning-rate decay: 0 for the embedding (patch
        projection, cls token, position table), i + 1 for ``blocks.i``, depth + 1 above them."""
        if name.startswith(("patch_embed", "cls_token", "pos_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return len(self.blocks) + 1

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels -> mean/std normalised pixels, (B, C, H, W)."""
        return (x - self.input_mean) / self.input_std

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised pixels (B, C, H, W) -> patch tokens with pos embed (B, L, D), no cls."""
        return self.patch_embed(x) + self.pos_embed[:, 1:, :]

    def prepend_cls(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, 1+N, D) with the cls token (plus its pos embed) first."""
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> blocks -> final norm, (B, N, D)."""
        for blk in self.blocks:
            tokens = blk(tokens)
        return self.norm(tokens)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> what a head reads: the cls token after the final norm, (B, D),
        or with global_pool = "token+avg" [cls, mean of the patch tokens], (B, 2D)."""
        tokens = self.encode(self.prepend_cls(self.embed(self.normalize(x))))  # (B, 1+L, D)
        if self.cfg.global_pool == "token+avg":
            return torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=1)  # (B, 2D)
        return tokens[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, num_classes) logits ((B, feature_dim) features when num_classes == 0)."""
        return self.head(self.forward_features(x))
