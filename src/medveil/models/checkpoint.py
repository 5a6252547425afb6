"""Load MAE / MedMAE / timm ViT checkpoints into our models; save ours atomically.

Accepted files: ``.pth`` / ``.pt`` (``torch.load`` with ``weights_only=True``) or
``.safetensors``, holding a state dict directly or wrapped as ``{'model': sd}`` /
``{'state_dict': sd}``; keys may carry a ``module.`` (DataParallel / DDP) prefix. A folder
written by ``transformers`` (``save_pretrained``: ``model.safetensors`` or ``pytorch_model.bin``)
is accepted too, and a state dict in transformers' ViT / ViT-MAE names is mapped to timm / MAE
names (:mod:`medveil.models.hf_layout`).
Adaptations, each reported as a note: position-embedding grids resized (bicubic, as MAE's
``interpolate_pos_embed``) when the image size differs; an RGB patch projection summed over
channels for grey models; decoder keys dropped when loading into a plain encoder; a head of the
wrong size skipped. Anything else that does not fit raises a one-line :class:`MedVeilError`.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from medveil.errors import MedVeilError
from medveil.io import save_torch_atomic
from medveil.models.hf_layout import from_hf, is_hf_layout, vit_config_from_hf
from medveil.models.vit import ViTConfig, VisionTransformer

CHECKPOINT_FORMAT = "medveil-vit-1"
WRAPPER_KEYS = ("model", "state_dict", "model_state", "module")
DECODER_PREFIXES = ("mask_token", "decoder_")
HEAD_PREFIXES = ("head.", "heads.")  # heads.<task>.*: an exported universal model
POS_EMBED_KEYS = ("pos_embed", "decoder_pos_embed")


@dataclass
class LoadReport:
    """What a checkpoint load did. ``loaded`` keys were copied into the model."""

    path: str
    loaded: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # in the checkpoint, not used
    missing: list[str] = field(default_factory=list)  # in the model, left at their init
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"checkpoint: {self.path}",
            f"loaded {len(self.loaded)} tensors; dropped {len(self.dropped)}; "
            f"left at init {len(self.missing)}",
        ]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Read a checkpoint file (or transformers folder) -> (state dict with plain timm/MAE keys,
    stored ViT config or None)."""
    sd, cfg, _ = _read(Path(path))
    return sd, cfg


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, str]:
    """(state dict in timm/MAE names, stored ViT config or None, "timm" or "transformers")."""
    hf_cfg: dict[str, Any] | None = None
    if path.is_dir():
        found = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()]
        if not found:
            raise MedVeilError(f"{path}: a folder without model.safetensors or pytorch_model.bin")
        if (path / "config.json").is_file():
            try:
                hf_cfg = vit_config_from_hf(json.loads((path / "config.json").read_text()))
            except (ValueError, TypeError, KeyError) as err:
                raise MedVeilError(f"{path / 'config.json'}: not a transformers ViT config ({err})") from err
        path = found[0]
    if not path.is_file():
        raise MedVeilError(f"checkpoint not found: {path}")
    obj = _load_file(path)
    cfg = obj.get("cfg") if isinstance(obj, Mapping) and isinstance(obj.get("cfg"), Mapping) else None
    sd = _unwrap(obj, path)
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}
    if is_hf_layout(sd):
        return from_hf(sd), hf_cfg, "transformers"
    return sd, (dict(cfg) if cfg is not None else None), "timm"


def _load_file(path: Path) -> Any:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                sd = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
                meta = fh.metadata() or {}
        except Exception as err:
            raise MedVeilError(f"{path}: not a readable safetensors file ({type(err).__name__})") from err
        # an export of ours carries its ViT config as JSON metadata (medveil.federated.universal)
        if "cfg" not in meta:
            return sd
        try:
            return {"model": sd, "cfg": json.loads(meta["cfg"])}
        except ValueError:
            raise MedVeilError(f"{path}: its 'cfg' metadata is not JSON") from None
    try:
        # MAE training checkpoints also pickle their argparse.Namespace of arguments
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise MedVeilError(f"{path}: not a PyTorch checkpoint that can be read safely ({reason})") from err


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):  # {'model': {'state_dict': sd}} at worst
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    raise MedVeilError(f"{path}: no state dict found (expected tensors, or a 'model' / 'state_dict' entry)")


def resize_pos_embed(pos_embed: torch.Tensor, num_patches: int) -> torch.Tensor:
    """(1, 1+L_old, D) -> (1, 1+num_patches, D): bicubic resize of the square patch grid, cls kept."""
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    old, new = int(grid.shape[1] ** 0.5), int(num_patches**0.5)
    if old * old != grid.shape[1] or new * new != num_patches:
        raise MedVeilError(f"cannot resize a {grid.shape[1]}-patch position embedding to {num_patches} patches")
    D = grid.shape[-1]
    grid = grid.reshape(1, old, old, D).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new * new, D).to(pos_embed.dtype)
    return torch.cat([cls, grid], dim=1)


def _is_backbone(key: str) -> bool:
    return not key.startswith(DECODER_PREFIXES + HEAD_PREFIXES)


def load_vit_checkpoint(
    path: str | os.PathLike[str], model: VisionTransformer, strict_backbone: bool = True
) -> LoadReport:
    """Copy a checkpoint's weights into ``model`` (a VisionTransformer or MaskedAutoencoderViT).

    strict_backbone: every encoder tensor of the model must be present in the checkpoint
    (head and decoder may be absent and stay at their init).
    """
    sd, _, layout = _read(Path(path))
    report = LoadReport(path=str(path))
    if layout == "transformers":
        report.notes.append("transformers ViT names mapped to timm / MAE names (query, key, value fused)")
    target = model.state_dict()
    if not any(k in target and _is_backbone(k) for k in sd):
        sample = ", ".join(sorted(sd)[:2])
        raise MedVeilError(f"{path}: no ViT weights with timm/MAE key names (found e.g. {sample}; "
                           f"expected e.g. blocks.0.attn.qkv.weight)")
    new_sd: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key not in target:
            report.dropped.append(key)
            continue
        want = target[key].shape
        if value.shape != want:
            value = _adapt(key, value, want, report, path)
            if value is None:
                continue
        new_sd[key] = value.to(target[key].dtype)
    dropped_decoder = [k for k in report.dropped if k.startswith(DECODER_PREFIXES)]
    if dropped_decoder:
        report.notes.append(f"dropped {len(dropped_decoder)} MAE decoder tensors (encoder only)")
    if any(k.startswith(HEAD_PREFIXES) and k not in target for k in report.dropped):
        report.notes.append("checkpoint head dropped (the model has no classification head)")
    other = [k for k in report.dropped if not k.startswith(DECODER_PREFIXES + HEAD_PREFIXES)]
    if other and strict_backbone:
        raise MedVeilError(f"{path}: unexpected key {other[0]} (and {len(other) - 1} more) for this ViT")
    if other:
        report.notes.append(f"ignored {len(other)} unknown tensors, e.g. {other[0]}")
    report.missing = [k for k in target if k not in new_sd]
    missing_backbone = [k for k in report.missing if _is_backbone(k)]
    if missing_backbone and strict_backbone:
        raise MedVeilError(f"{path}: missing key {missing_backbone[0]} "
                           f"(and {len(missing_backbone) - 1} more) for this ViT")
    if any(k.startswith(DECODER_PREFIXES) for k in report.missing):
        report.notes.append("checkpoint has no MAE decoder: decoder left at its random init")
    if any(k.startswith(HEAD_PREFIXES) for k in report.missing):
        report.notes.append("classification head left at its random init")
    model.load_state_dict(new_sd, strict=False)
    report.loaded = sorted(new_sd)
    return report


def _adapt(key: str, value: torch.Tensor, want: torch.Size, report: LoadReport, path: Any) -> torch.Tensor | None:
    """Make ``value`` fit ``want`` where that is meaningful; None = skip (head); else raise."""
    if key in POS_EMBED_KEYS and value.ndim == 3 and value.shape[-1] == want[-1]:
        report.notes.append(f"{key}: resized grid {value.shape[1] - 1} -> {want[1] - 1} patches (bicubic)")
        return resize_pos_embed(value, want[1] - 1)
    if key == "patch_embed.proj.weight" and value.shape[1] == 3 and want[1] == 1 and \
            value.shape[0] == want[0] and value.shape[2:] == want[2:]:
        report.notes.append("patch_embed.proj.weight: RGB filters summed over channels for grey input")
        return value.sum(dim=1, keepdim=True)
    if key.startswith(HEAD_PREFIXES) or key == "decoder_pred.weight" or key == "decoder_pred.bias":
        report.dropped.append(key)
        report.notes.append(f"{key}: shape {tuple(value.shape)} != model {tuple(want)}, skipped (left at init)")
        return None
    raise MedVeilError(f"{path}: shape mismatch for {key}: checkpoint {tuple(value.shape)} vs model {tuple(want)}")


def save_checkpoint(
    path: str | os.PathLike[str], model: nn.Module, cfg: ViTConfig, extra: dict[str, Any] | None = None
) -> Path:
    """Write ``{'model': state_dict, 'cfg': cfg dict, 'format', 'extra'}`` atomically (tmp + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "cfg": cfg.to_dict(),
               "extra": dict(extra or {})}
    save_torch_atomic(path, payload)
    return path
