"""Pluggable, frozen feature networks for perceptual losses, style (Gram) losses and FID/KID.

ImageNet VGG / Inception / MoCo weights cannot be downloaded here, so every consumer takes a
:class:`FeatureNet` built from a spec string (:func:`build_feature_net`) and records its
:meth:`FeatureNet.describe` next to every result:

- ``random-conv:seed=0[,width=32]`` - :class:`ConvFeatureNet`, a small VGG-like CNN with a
  fixed-seed random init. Random conv features are a known-usable texture/style descriptor
  (Gram matrices of random filters still separate textures) and are exactly reproducible, but
  they are the weakest option: no notion of what matters in a medical image.
- ``conv:/path/file.pt`` - the same CNN with weights trained on the data
  (:func:`medveil.generative.feature_training.train_feature_net`) or supplied by the user.
- ``vit:/path/ckpt.pt`` - a MedVeil :class:`~medveil.models.vit.VisionTransformer` checkpoint
  (e.g. the federated universal backbone): embed = cls feature, maps = patch tokens of an early
  block on the patch grid.

All inputs are float (B, 3, H, W) in [0, 1] (1-channel inputs are repeated to 3 channels).
Networks are frozen: eval mode forever, ``requires_grad=False`` on every parameter; gradients
still flow to the *input* (that is what latent optimisation needs).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from medveil.errors import ConfigError, DataError
from medveil.models.vit import ViTConfig, VisionTransformer

CONV_FORMAT = "medveil.conv_feature_net/1"
DEFAULT_WIDTHS = (32, 64, 128, 256)
# Fixed input normalisation of the conv net (roughly the pixel statistics of natural/fundus images).
_MEAN, _STD = 0.45, 0.25


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def as_rgb(x: torch.Tensor) -> torch.Tensor:
    """(B, 1|3, H, W) -> (B, 3, H, W); any other channel count is a DataError."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise DataError(f"feature net expects images (B, 3, H, W) or (B, 1, H, W), got {tuple(x.shape)}")
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class FeatureNet(nn.Module):
    """Interface. Subclasses implement ``_embed`` and ``_feature_maps`` on (B, 3, H, W) in [0, 1]."""

    name: str = "feature-net"
    dim: int = 0  # embedding size D

    def freeze(self) -> FeatureNet:
        for p in self.parameters():
            p.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> FeatureNet:  # always stays in eval mode
        return super().train(False)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> global embedding (B, D)."""
        return self._embed(as_rgb(x))

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> early-layer feature maps (B, C, h, w) for Gram/style losses."""
        return self._feature_maps(as_rgb(x))

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(feature_maps(x), embed(x)) in one call; subclasses share the common layers."""
        x = as_rgb(x)
        return self._feature_maps(x), self._embed(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU())


class ConvFeatureNet(FeatureNet):
    """VGG-like CNN: blocks of (conv3x3-ReLU) x 2, 2x2 max-pool between blocks.

    feature_maps = output of block 1 (the analogue of VGG conv1_2): (B, widths[0], H, W).
    embed = concatenated global average pools of every block's output: (B, sum(widths)),
    so both fine texture and coarse structure count.
    """

    def __init__(self, widths: tuple[int, ...] = DEFAULT_WIDTHS, seed: int | None = 0,
                 source: str = "random-init", weights_path: str | None = None) -> None:
        super().__init__()
        self.widths = tuple(int(w) for w in widths)
        chans = (3, *self.widths)
        with torch.random.fork_rng(devices=[]):  # building must not move the caller's global RNG
            self.blocks = nn.ModuleList(_conv_block(a, b) for a, b in zip(chans[:-1], chans[1:]))
        self.dim = sum(self.widths)
        self.seed, self.source, self.weights_path = seed, source, weights_path
        self.weights_sha256 = sha256_file(weights_path) if weights_path else None
        if weights_path:
            self.name = f"conv:{Path(weights_path).name}"
        else:
            self.name = f"random-conv:seed={seed},width={self.widths[0]}" if source == "random-init" else source
        if seed is not None:
            self._random_init(seed)
        self.freeze()

    def _random_init(self, seed: int) -> None:
        # Own generator: reproducible and leaves the global RNG untouched.
        gen = torch.Generator().manual_seed(seed)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                with torch.no_grad():
                    m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                    m.bias.zero_()

    def block_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) in [0, 1] -> each block's output, [(B, widths[i], H/2^i, W/2^i)]."""
        h = (x - _MEAN) / _STD
        outs = []
        for i, block in enumerate(self.blocks):
            if i > 0:
                h = F.max_pool2d(h, 2) if min(h.shape[-2:]) >= 2 else h
            h = block(h)
            outs.append(h)
        return outs

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([o.mean(dim=(2, 3)) for o in self.block_outputs(x)], dim=1)  # (B, D)

    def _feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[0]((x - _MEAN) / _STD)  # (B, widths[0], H, W)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outs = self.block_outputs(as_rgb(x))  # one pass: block 1 is both the maps and part of the embedding
        return outs[0], torch.cat([o.mean(dim=(2, 3)) for o in outs], dim=1)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "ConvFeatureNet", "widths": list(self.widths),
                "embed_dim": self.dim, "source": self.source, "seed": self.seed,
                "weights_path": self.weights_path, "weights_sha256": self.weights_sha256,
                "note": ("random-init conv features: reproducible texture descriptor, weakest option"
                         if self.weights_path is None else "conv net with weights from file")}


def load_conv_feature_net(path: str | Path) -> ConvFeatureNet:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: feature-net weight file not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is a user error
        raise ConfigError(f"{path}: not a readable torch file ({type(err).__name__})") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != CONV_FORMAT:
        raise ConfigError(f"{path}: not a MedVeil conv feature-net file (expected format {CONV_FORMAT})")
    net = ConvFeatureNet(tuple(ckpt["widths"]), seed=None, source=str(ckpt.get("info", {}).get("source", "file")),
                         weights_path=str(path))
    try:
        net.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise ConfigError(f"{path}: weights do not match widths {ckpt['widths']}") from err
    return net.freeze()


class ViTFeatureNet(FeatureNet):
    """A MedVeil ViT as a feature net: embed = what its heads read (final-norm cls token (B, D), or
    [cls, mean of patch tokens] (B, 2D) with global_pool = "token+avg"); feature_maps = patch
    tokens after block ``map_block`` (early) reshaped to the patch grid (B, D, g, g).
    Inputs are resized to the ViT's img_size (and turned grey for 1-channel ViTs)."""

    def __init__(self, vit: VisionTransformer, map_block: int = 1, weights_path: str | None = None) -> None:
        super().__init__()
        self.vit = vit
        self.map_block = min(map_block, len(vit.blocks) - 1)
        self.dim = vit.feature_dim
        self.weights_path = weights_path
        self.weights_sha256 = sha256_file(weights_path) if weights_path else None
        self.name = f"vit:{Path(weights_path).name}" if weights_path else "vit"
        self.freeze()

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.vit.cfg
        if x.shape[-1] != cfg.img_size or x.shape[-2] != cfg.img_size:
            x = F.interpolate(x, size=(cfg.img_size, cfg.img_size), mode="bilinear", align_corners=False)
        if cfg.in_chans == 1:
            x = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
        return x

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_features(self._prepare(x))

    def _feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.prepend_cls(self.vit.embed(self.vit.normalize(self._prepare(x))))  # (B, 1+L, D)
        for blk in self.vit.blocks[: self.map_block + 1]:
            tokens = blk(tokens)
        patches = tokens[:, 1:]  # (B, L, D)
        g = self.vit.cfg.grid_size
        return patches.transpose(1, 2).reshape(x.shape[0], self.vit.embed_dim, g, g)  # (B, D, g, g)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "ViTFeatureNet", "vit_config": self.vit.cfg.to_dict(),
                "embed_dim": self.dim, "map_block": self.map_block, "weights_path": self.weights_path,
                "weights_sha256": self.weights_sha256}


def load_vit_feature_net(path: str | Path, map_block: int = 1) -> ViTFeatureNet:
    """Checkpoint = dict with a ViT config (key ``vit_config``, ``config`` or ``cfg``) and weights
    (``model``, ``state_dict`` or ``encoder``); MAE decoder keys and a classifier head are ignored."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: ViT checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"{path}: not a readable torch file ({type(err).__name__})") from err
    cfg_dict = next((ckpt[k] for k in ("vit_config", "config", "cfg") if isinstance(ckpt, dict) and k in ckpt), None)
    state = next((ckpt[k] for k in ("model", "state_dict", "encoder") if isinstance(ckpt, dict) and k in ckpt), None)
    if not isinstance(cfg_dict, dict) or not isinstance(state, dict):
        raise ConfigError(f"{path}: not a MedVeil ViT checkpoint (needs a ViT config and a state dict)")
    known = set(ViTConfig.__dataclass_fields__)
    vit = VisionTransformer(ViTConfig.from_dict({k: v for k, v in cfg_dict.items() if k in known}))
    wanted = vit.state_dict()
    state = {k: v for k, v in state.items() if k in wanted and not k.startswith("head.")}
    missing = sorted(k for k in wanted if k not in state and not k.startswith("head."))
    if missing:
        raise ConfigError(f"{path}: ViT weights lack {len(missing)} key(s), e.g. {missing[0]}")
    try:
        vit.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise ConfigError(f"{path}: ViT weights do not match its config") from err
    return ViTFeatureNet(vit, map_block=map_block, weights_path=str(path))


def _parse_options(text: str, spec: str) -> dict[str, str]:
    out = {}
    for item in filter(None, text.split(",")):
        if "=" not in item:
            raise ConfigError(f"feature net spec {spec!r}: option {item!r} is not key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def build_feature_net(spec: str) -> FeatureNet:
    """``random-conv[:seed=0,width=32]`` | ``conv:/path/file.pt`` | ``vit:/path/ckpt.pt[,block=1]``."""
    kind, _, rest = spec.partition(":")
    if kind == "random-conv":
        opts = _parse_options(rest, spec)
        bad = sorted(set(opts) - {"seed", "width"})
        if bad:
            raise ConfigError(f"feature net spec {spec!r}: unknown option(s) {', '.join(bad)}")
        try:
            seed, width = int(opts.get("seed", 0)), int(opts.get("width", DEFAULT_WIDTHS[0]))
        except ValueError as err:
            raise ConfigError(f"feature net spec {spec!r}: seed and width must be integers") from err
        return ConvFeatureNet(tuple(width * 2**i for i in range(len(DEFAULT_WIDTHS))), seed=seed)
    if kind == "conv" and rest:
        return load_conv_feature_net(rest)
    if kind == "vit" and rest:
        path, _, opt = rest.partition(",")
        block = int(_parse_options(opt, spec).get("block", 1)) if opt else 1
        return load_vit_feature_net(path, map_block=block)
    raise ConfigError(f"unknown feature net spec {spec!r} (use random-conv:seed=0, conv:FILE or vit:FILE)")
