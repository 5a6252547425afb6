"""Server side: masked-image-modelling pretraining on its unlabelled pool (stage 0), the join
protocol, and the universal model it curates: one global backbone plus one head per client,
with a task registry (client/task name -> head, class names, task type).

The server never sees a labelled image: it holds only its pool (labels stripped, never given to
any client) and what clients send (weights, counts, metrics).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from medveil.errors import DataError, MedVeilError
from medveil.federated.messages import FitInstructions, JoinRequest, StateDict
from medveil.federated.training import batch_indices, new_head, seeded, warmup_cosine
from medveil.federated.universal import TaskEntry, UniversalModel
from medveil.federated.updates import Spec, state_spec
from medveil.models import MaskedAutoencoderViT, ViTConfig, VisionTransformer
from medveil.progress import bar as progress_bar

@dataclass
class PretrainRecipe:
    """The ``[pretrain]`` config section: MAE on the server pool (AdamW, warmup + cosine)."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    mask_ratio: float = 0.75
    warmup_epochs: int = 1


def clone_state(state: StateDict) -> StateDict:
    """Detached CPU copies (what goes into messages and checkpoints)."""
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def require_pool(pool: torch.Tensor, what: str) -> None:
    if pool is None or len(pool) == 0:
        raise DataError(f"{what} needs the server's unlabelled pool, but it is empty "
                        f"(raise [data] pool_fraction or set [data] pool_path)")


class Server:
    """Holds the MAE model (its encoder is the global backbone), the heads and the registry."""

    def __init__(self, cfg: ViTConfig, pool: torch.Tensor, seed: int = 0) -> None:
        self.cfg = cfg
        self.pool = pool  # (M, C, H, W) float in [0, 1], unlabelled
        self.pool_groups: torch.Tensor | None = None  # (M,) source dataset of each pool image, if known
        self.pool_sources: list[str] = []  # the client whose dataset each group index came from, if known
        with seeded(seed):
            self.model = MaskedAutoencoderViT(cfg)
        self.heads = nn.ModuleDict()
        self.registry: dict[str, TaskEntry] = {}

    # ---- stage 0 -------------------------------------------------------------------------
    def pretrain(self, recipe: PretrainRecipe, seed: int, progress: bool = True) -> dict[str, Any]:
        """MAE pretraining on the pool; returns per-epoch mean losses."""
        if recipe.epochs <= 0:
            return {"mim_loss": []}
        require_pool(self.pool, "MIM pretraining")
        model = self.model
        device = next(model.parameters()).device
        steps_per_epoch = math.ceil(len(self.pool) / recipe.batch_size)
        total, warm = recipe.epochs * steps_per_epoch, recipe.warmup_epochs * steps_per_epoch
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.lr,
                                betas=(0.9, 0.95), weight_decay=recipe.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, total, warm))
        gen = torch.Generator().manual_seed(seed)
        losses: list[float] = []
        model.train()
        with seeded(seed):
            for _ in progress_bar(range(recipe.epochs), desc="stage 0: MIM pretraining", leave=False,
                                  disable=not progress):
                total_loss, count = 0.0, 0
                for idx in batch_indices(len(self.pool), recipe.batch_size, gen):
                    loss, _, _ = model(self.pool[idx].to(device), mask_ratio=recipe.mask_ratio)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    total_loss += float(loss.detach()) * len(idx)
                    count += len(idx)
                losses.append(total_loss / count)
        model.eval()
        return {"mim_loss": losses}

    # ---- join protocol -------------------------------------------------------------------
    def join(self, request: JoinRequest, stage: int, seed: int) -> FitInstructions:
        """Register a client (fresh random head with C_k outputs) or re-admit a known one."""
        name, c = request.client_name, int(request.num_classes)
        if c < 1:
            raise DataError(f"client {name!r}: cannot join with {c} classes")
        known = self.registry.get(name)
        if known is not None and known.num_classes != c:
            raise DataError(f"client {name!r}: the dataset has {c} classes but its head has "
                            f"{known.num_classes} outputs")
        if known is None:
            class_names = list(request.class_names) if request.class_names else [str(i) for i in range(c)]
            if len(class_names) != c:
                raise DataError(f"client {name!r}: {len(class_names)} class names for {c} classes")
            self.registry[name] = TaskEntry(name, c, request.task, class_names)
            self.heads[name] = new_head(self.cfg.feature_dim, c, seed).to(self.device)
        return self.instructions(name, stage)

    def instructions(self, name: str, stage: int) -> FitInstructions:
        """Current base backbone + this client's head (copies: nothing shares memory)."""
        if name not in self.registry:
            raise MedVeilError(f"client {name!r} has not joined")
        return FitInstructions(client_name=name, stage=stage, model_config=self.cfg.to_dict(),
                               backbone=self.backbone_state(), head=clone_state(self.heads[name].state_dict()))

    # ---- the universal model -------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def backbone_state(self) -> StateDict:
        return clone_state(self.model.encoder_state_dict())

    def load_backbone(self, state: StateDict) -> None:
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith(("mask_token", "decoder_")) for k in missing):
            raise MedVeilError(f"backbone state does not fit the model (missing {missing[:2]}, "
                               f"unexpected {unexpected[:2]})")

    def set_head(self, name: str, state: StateDict) -> None:
        self.heads[name].load_state_dict(state, strict=True)

    def backbone_spec(self) -> Spec:
        return state_spec(self.model.encoder_state_dict())

    def head_specs(self) -> dict[str, Spec]:
        return {name: state_spec(head.state_dict()) for name, head in self.heads.items()}

    def state_dict(self) -> dict[str, Any]:
        """Everything a checkpoint needs (the pool is rebuilt from the config)."""
        return {"model": clone_state(self.model.state_dict()),
                "heads": {n: clone_state(h.state_dict()) for n, h in self.heads.items()},
                "registry": {n: asdict(e) for n, e in self.registry.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"], strict=True)
        self.registry = {n: TaskEntry(**e) for n, e in state["registry"].items()}
        self.heads = nn.ModuleDict({n: nn.Linear(self.cfg.feature_dim, e.num_classes)
                                    for n, e in self.registry.items()}).to(self.device)
        for n, head_state in state["heads"].items():
            self.heads[n].load_state_dict(head_state, strict=True)

    def save_universal(self, path: Path) -> Path:
        """Write the universal model (backbone, heads, registry; no decoder, no pool) atomically
        in the ``model.pt`` layout of :mod:`medveil.federated.universal`."""
        backbone = VisionTransformer(self.cfg, num_classes=0)
        backbone.load_state_dict(self.model.encoder_state_dict(), strict=True)
        return UniversalModel(self.cfg, backbone, dict(self.heads.items()), dict(self.registry)).save(path)
