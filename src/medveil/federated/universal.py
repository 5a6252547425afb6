"""The universal model as a file: one backbone, one head per task, and the task registry.

Two layouts hold the same model and both load with :func:`load_universal`:

- ``model.pt`` (what ``medveil federate`` and ``medveil adapt`` write): a regular MedVeil ViT
  checkpoint (:func:`medveil.models.checkpoint.save_checkpoint`), so any ViT loader reads its
  backbone; heads and registry live in ``extra``.
- ``model.safetensors`` (what ``medveil export`` writes, alone or in its folder): the backbone
  under timm / MAE key names plus ``heads.<task>.weight`` / ``.bias``; the ViT config and the
  registry are JSON strings in the safetensors metadata (no pickle anywhere).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from medveil.errors import MedVeilError
from medveil.io import atomic_file
from medveil.models import ViTConfig, VisionTransformer
from medveil.models.checkpoint import save_checkpoint

UNIVERSAL_FORMAT = "medveil-universal-1"
HEADS_PREFIX = "heads."


@dataclass
class TaskEntry:
    """Task registry row: what one head predicts."""

    name: str
    num_classes: int
    task: str
    class_names: list[str]


@dataclass
class UniversalModel:
    """A loaded universal model: backbone + heads + registry."""

    cfg: ViTConfig
    backbone: VisionTransformer
    heads: dict[str, nn.Linear]
    registry: dict[str, TaskEntry]

    @torch.no_grad()
    def predict(self, task: str, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, C) of one task's head for images (N, C_in, H, W) in [0, 1] (see ``to_tensor``)."""
        if task not in self.heads:
            raise MedVeilError(f"no task {task!r} in this universal model (tasks: {', '.join(self.heads)})")
        return self.heads[task](self.backbone.forward_features(x))

    def head_states(self) -> dict[str, dict[str, torch.Tensor]]:
        return {n: {k: v.detach().cpu().clone() for k, v in h.state_dict().items()} for n, h in self.heads.items()}

    def save(self, path: Path) -> Path:
        """``model.pt`` layout, atomically."""
        extra = {"universal": UNIVERSAL_FORMAT, "heads": self.head_states(),
                 "registry": {n: asdict(e) for n, e in self.registry.items()}}
        return save_checkpoint(path, self.backbone, self.cfg, extra=extra)

    def save_safetensors(self, path: Path) -> Path:
        """``model.safetensors`` layout (timm keys + ``heads.<task>.*``; config in metadata), atomically."""
        from safetensors.torch import save

        tensors = {k: v.detach().cpu().contiguous() for k, v in self.backbone.state_dict().items()}
        for name, state in self.head_states().items():
            tensors.update({f"{HEADS_PREFIX}{name}.{k}": v.contiguous() for k, v in state.items()})
        meta = {"format": UNIVERSAL_FORMAT, "cfg": json.dumps(self.cfg.to_dict()),
                "registry": json.dumps({n: asdict(e) for n, e in self.registry.items()})}
        with atomic_file(path, "wb") as fh:
            fh.write(save(tensors, metadata=meta))
        return path


def load_universal(path: Path) -> UniversalModel:
    """Read a universal model: ``model.pt``, an exported ``model.safetensors``, or its folder."""
    path = Path(path)
    if path.is_dir() and (path / "model.safetensors").is_file():
        path = path / "model.safetensors"
    if not path.is_file():
        raise MedVeilError(f"universal model not found: {path}")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise MedVeilError(f"{path}: not a readable universal model ({type(err).__name__})") from None
    extra = obj.get("extra") if isinstance(obj, dict) else None
    if not isinstance(extra, dict) or extra.get("universal") != UNIVERSAL_FORMAT:
        raise MedVeilError(f"{path}: not a MedVeil universal model ({UNIVERSAL_FORMAT})")
    return _assemble(path, obj["cfg"], obj["model"], extra["heads"], extra["registry"])


def _load_safetensors(path: Path) -> UniversalModel:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as err:
        raise MedVeilError(f"{path}: not a readable safetensors file ({type(err).__name__})") from None
    if meta.get("format") != UNIVERSAL_FORMAT:
        raise MedVeilError(f"{path}: not a MedVeil universal model ({UNIVERSAL_FORMAT} metadata missing)")
    heads: dict[str, dict[str, torch.Tensor]] = {}
    backbone = {}
    for key, value in tensors.items():
        if key.startswith(HEADS_PREFIX):
            task, _, param = key[len(HEADS_PREFIX):].rpartition(".")
            heads.setdefault(task, {})[param] = value
        else:
            backbone[key] = value
    return _assemble(path, json.loads(meta["cfg"]), backbone, heads, json.loads(meta["registry"]))


def _assemble(path: Path, cfg_dict: dict[str, Any], backbone_state: dict[str, torch.Tensor],
              heads_state: dict[str, dict[str, torch.Tensor]], registry_dict: dict[str, Any]) -> UniversalModel:
    try:
        cfg = ViTConfig.from_dict(cfg_dict)
        backbone = VisionTransformer(cfg, num_classes=0)
        backbone.load_state_dict(backbone_state, strict=True)
        registry = {n: TaskEntry(**e) for n, e in registry_dict.items()}
        heads = {}
        for n, e in registry.items():
            heads[n] = nn.Linear(cfg.feature_dim, e.num_classes)
            heads[n].load_state_dict(heads_state[n], strict=True)
    except (RuntimeError, KeyError, TypeError) as err:
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise MedVeilError(f"{path}: universal model does not fit its own config ({reason})") from None
    return UniversalModel(cfg, backbone.eval(), heads, registry)
