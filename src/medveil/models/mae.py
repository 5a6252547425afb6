"""Masked autoencoder (He et al. 2022) on our ViT encoder, key layout of MAE ``models_mae.py``.

Random ``mask_ratio`` of the patches are dropped, the encoder sees only the visible ones, a light
decoder reconstructs every patch, and the loss is the MSE on the masked patches only (targets
normalised per patch when ``cfg.norm_pix_loss``).

Masked patches are blanked in pixel space (set to 0, the mean colour after normalisation)
before the patch embedding, so that an overlapping stem (``ViTConfig.stem = "conv"`` or ``"cnn"``) cannot
carry a masked pixel into a visible token (SimMIM-style blanking, MAE-style encoder on the
visible tokens only). With the linear patch stem each token sees its own patch only and the
blanking changes nothing (x * 1 is exact).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from medveil.models.layers import Block, init_weights_mae, layer_norm, sincos_pos_embed
from medveil.models.vit import ViTConfig, VisionTransformer

# State-dict prefixes that belong to the decoder (everything else is the encoder).
DECODER_PREFIXES = ("mask_token", "decoder_")


class MaskedAutoencoderViT(VisionTransformer):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__(cfg, num_classes=0)
        Dd = cfg.decoder_embed_dim
        p, C = cfg.patch_size, cfg.in_chans
        self.decoder_embed = nn.Linear(cfg.embed_dim, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(Dd, cfg.grid_size), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(Dd, cfg.decoder_num_heads, cfg.mlp_ratio) for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = layer_norm(Dd)
        self.decoder_pred = nn.Linear(Dd, p * p * C)  # one patch's pixels, MAE order (p, p, C)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            module.apply(init_weights_mae)

    # ---- patches -------------------------------------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, p*p*C), each patch in MAE's (p, p, C) order."""
        B, C, H, W = imgs.shape
        p = self.cfg.patch_size
        h, w = H // p, W // p
        x = imgs.reshape(B, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, C)
        return x.reshape(B, h * w, p * p * C)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, p*p*C) -> (B, C, H, W)."""
        B, L, _ = x.shape
        p, C = self.cfg.patch_size, self.cfg.in_chans
        h = w = int(L**0.5)
        x = x.reshape(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
        return x.reshape(B, C, h * p, w * p)

    @staticmethod
    def random_masking(
        x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep a random (1 - mask_ratio) of the tokens of each sample (per-sample shuffle).

        x: (B, L, D); noise: optional (B, L) uniform scores (lowest are kept).
        Returns visible tokens (B, L_keep, D), mask (B, L) with 1 = masked, ids_restore (B, L).
        """
        B, L, _ = x.shape
        if noise is None:
            noise = torch.rand(B, L, device=x.device)
        ids_keep, ids_restore, mask = MaskedAutoencoderViT.mask_from_noise(noise, mask_ratio)
        return MaskedAutoencoderViT.keep(x, ids_keep), mask, ids_restore

    @staticmethod
    def mask_from_noise(noise: torch.Tensor, mask_ratio: float
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """noise (B, L) -> ids_keep (B, L_keep), ids_restore (B, L), mask (B, L) with 1 = masked."""
        B, L = noise.shape
        len_keep = int(L * (1 - mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        mask = torch.ones(B, L, device=noise.device)
        mask[:, :len_keep] = 0
        return ids_shuffle[:, :len_keep], ids_restore, torch.gather(mask, 1, ids_restore)

    @staticmethod
    def keep(x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """(B, L, D) tokens -> the kept ones (B, L_keep, D), in ``ids_keep`` order."""
        return torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

    def blank_masked(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Normalised pixels (B, C, H, W) with every masked patch (mask (B, L), 1 = masked) set to 0."""
        p, h = self.cfg.patch_size, self.cfg.grid_size
        keep = (1.0 - mask).view(-1, 1, h, 1, h, 1).expand(-1, 1, h, p, h, p)
        return x * keep.reshape(x.shape[0], 1, h * p, h * p)

    # ---- encoder / decoder ---------------------------------------------------------------
    def forward_encoder(
        self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised pixels (B, C, H, W) -> latent (B, 1+L_keep, D), mask (B, L), ids_restore (B, L)."""
        if noise is None:
            noise = torch.rand(x.shape[0], self.cfg.num_patches, device=x.device)
        ids_keep, ids_restore, mask = self.mask_from_noise(noise, mask_ratio)
        tokens = self.embed(self.blank_masked(x, mask))  # (B, L, D), no masked pixel in any token
        tokens = self.keep(tokens, ids_keep)  # (B, L_keep, D)
        latent = self.encode(self.prepend_cls(tokens))
        return latent, mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (B, 1+L_keep, D) -> per-patch pixel predictions (B, L, p*p*C)."""
        x = self.decoder_embed(latent)  # (B, 1+L_keep, Dd)
        B, n_vis, Dd = x.shape
        L = ids_restore.shape[1]
        mask_tokens = self.mask_token.expand(B, L + 1 - n_vis, -1)
        patches = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # (B, L, Dd), shuffled order
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, Dd))  # unshuffle
        x = torch.cat([x[:, :1, :], patches], dim=1) + self.decoder_pos_embed  # (B, 1+L, Dd)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]  # drop cls

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE between pred and the (per-patch normalised) target, averaged over masked patches."""
        target = self.patchify(imgs)  # (B, L, p*p*C)
        if self.cfg.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = (pred - target).pow(2).mean(dim=-1)  # (B, L) per-patch loss
        return (loss * mask).sum() / mask.sum()

    def forward(  # type: ignore[override]
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs (B, C, H, W) in [0, 1] -> (loss, pred (B, L, p*p*C), mask (B, L), 1 = masked)."""
        x = self.normalize(imgs)
        latent, mask, ids_restore = self.forward_encoder(x, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(x, pred, mask), pred, mask

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder weights only: loads into ``VisionTransformer(cfg)`` (no head keys)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(DECODER_PREFIXES)}
