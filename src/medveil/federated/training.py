"""The one supervised training loop (backbone + linear head) used by clients, baselines and the
fine-tuning evaluation, plus batched inference and seeding helpers.

Loss: cross-entropy for multi-class / binary / ordinal tasks, BCE-with-logits for multi-label,
optionally with label smoothing. Optimiser: AdamW; learning rate constant (the default) or
linear warm-up + cosine decay per step; layer-wise learning-rate decay (``layer_decay`` < 1: a
block's rate is ``lr * layer_decay ** (depth + 1 - layer)``, the head's ``lr * head_lr_scale``);
stochastic depth (``drop_path``); per-modality augmentation (``augment = "auto"``,
:mod:`medveil.data.augment`); optional FedProx proximal term ``mu / 2 * ||w - w_ref||^2`` over
every trained parameter. Every default leaves training as it was before these options existed.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from medveil.data import Task
from medveil.data.augment import AUGMENT_MODES, AugmentPolicy
from medveil.errors import ConfigError
from medveil.models import VisionTransformer


@dataclass
class TrainRecipe:
    """Local / fine-tuning recipe (the ``[local]`` config section)."""

    epochs: int = 1
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.05
    head_lr_scale: float = 10.0  # the fresh linear head learns this much faster than the backbone
    class_weighting: str = "none"  # "balanced": loss weights n / (C * n_c) from the local labels
    fedprox_mu: float = 0.0  # > 0 turns local training into FedProx
    augment: str = "none"  # "auto": the dataset's modality decides (medveil.data.augment)
    schedule: str = "constant"  # "cosine": linear warm-up over warmup_epochs, cosine decay to 0
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    layer_decay: float = 1.0  # < 1: layer-wise learning-rate decay of the backbone
    drop_path: float = 0.0  # stochastic depth rate of the last block (0 at the first)

    def check(self) -> None:
        """One ConfigError line for a recipe that cannot be honoured."""
        if self.class_weighting not in ("none", "balanced"):
            raise ConfigError(f"class_weighting must be 'none' or 'balanced', got {self.class_weighting!r}")
        if self.augment not in AUGMENT_MODES:
            raise ConfigError(f"augment must be one of {', '.join(AUGMENT_MODES)}, got {self.augment!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not (0.0 <= self.label_smoothing < 1.0 and 0.0 <= self.drop_path < 1.0 and 0.0 < self.layer_decay <= 1.0
                and self.warmup_epochs >= 0):
            raise ConfigError("label_smoothing and drop_path must be in [0, 1), layer_decay in (0, 1], "
                              "warmup_epochs >= 0")


SCHEDULES = ("constant", "cosine")


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor of 0-based ``step`` of ``total``: linear warm-up over ``warmup``
    steps, then cosine decay from 1 to 0 over the rest."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def derive_seed(seed: int, *tags: int | str) -> int:
    """A 31-bit seed from a base seed and tags (stage number, client name ...), order-sensitive."""
    words = [t if isinstance(t, int) else zlib.crc32(t.encode()) for t in tags]
    return int(np.random.SeedSequence([seed, *words]).generate_state(1)[0] & 0x7FFFFFFF)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with torch's CPU RNG seeded, restoring the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def lr_schedule(opt: torch.optim.Optimizer, recipe: TrainRecipe,
                steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR | None:
    """The recipe's per-step schedule over ``recipe.epochs`` (None for a constant rate)."""
    if recipe.schedule != "cosine":
        return None
    total, warm = recipe.epochs * steps_per_epoch, round(recipe.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, total, warm))


def task_loss(logits: torch.Tensor, y: torch.Tensor, task: Task | str,
              weight: torch.Tensor | None = None, smoothing: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """logits (B, C); y (B,) int or (B, C) {0,1} for multi-label -> scalar loss, or with
    ``reduction="none"`` one loss per example (B,) (multi-label: the mean over labels).

    weight: (C,) class weights (cross-entropy) or positive-class weights (multi-label BCE).
    smoothing: label smoothing (multi-label: targets pulled towards 1/2 by smoothing / 2).
    """
    if Task(task) is Task.MULTILABEL:
        target = y.float() * (1 - smoothing) + smoothing / 2 if smoothing else y.float()
        loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=weight, reduction=reduction)
        return loss.mean(dim=1) if reduction == "none" else loss
    return F.cross_entropy(logits, y, weight=weight, label_smoothing=smoothing, reduction=reduction)


def balanced_weights(y: torch.Tensor, num_classes: int, task: Task | str) -> torch.Tensor:
    """Inverse-frequency class weights n / (C * n_c) (multi-label: n_neg / n_pos per class),
    computed from a client's own labels; classes without samples get weight 1."""
    if Task(task) is Task.MULTILABEL:
        pos = y.float().sum(0)
        return torch.where(pos > 0, (len(y) - pos) / pos.clamp(min=1), torch.ones_like(pos))
    counts = torch.bincount(y, minlength=num_classes).float()
    return torch.where(counts > 0, len(y) / (num_classes * counts.clamp(min=1)), torch.ones_like(counts))


def batch_indices(n: int, batch_size: int, generator: torch.Generator | None) -> list[torch.Tensor]:
    """Shuffled (generator given) or ordered index batches covering 0..n-1."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return list(order.split(batch_size))


def param_groups(backbone: VisionTransformer, head: nn.Module, recipe: TrainRecipe,
                 train_backbone: bool = True) -> tuple[list[nn.Parameter], list[dict]]:
    """(every trained parameter, backbone first then head: the FedProx order; the optimiser's
    groups). Without layer decay: one backbone group at ``lr`` (as before it existed); with it,
    one group per layer at ``lr * layer_decay ** (depth + 1 - layer)``. The head: ``lr * head_lr_scale``."""
    named = [(n, p) for n, p in backbone.named_parameters() if p.requires_grad] if train_backbone else []
    params = [p for _, p in named] + list(head.parameters())
    if recipe.layer_decay == 1.0:
        groups = [{"params": [p for _, p in named]}]
    else:
        top = len(backbone.blocks) + 1
        by_layer: dict[int, list[nn.Parameter]] = {}
        for n, p in named:
            by_layer.setdefault(backbone.layer_of(n), []).append(p)
        groups = [{"params": ps, "lr": recipe.lr * recipe.layer_decay ** (top - layer)}
                  for layer, ps in sorted(by_layer.items())]
    groups.append({"params": list(head.parameters()), "lr": recipe.lr * recipe.head_lr_scale})
    return params, [g for g in groups if g["params"]]


def train_classifier(
    backbone: VisionTransformer,
    head: nn.Linear,
    x: torch.Tensor,
    y: torch.Tensor,
    task: Task | str,
    recipe: TrainRecipe,
    seed: int,
    train_backbone: bool = True,
    prox_ref: list[torch.Tensor] | None = None,
    augment: AugmentPolicy | None = None,
) -> dict[str, float]:
    """Train ``backbone`` + ``head`` in place on (x (N, C, H, W) in [0, 1], y) for recipe.epochs.

    prox_ref: reference tensors, one per trained parameter in order (backbone then head), for the
    FedProx term when ``recipe.fedprox_mu > 0``. augment: the batches' augmentation (the caller
    picks it for its data with :func:`medveil.data.augment.policy_for`; used when
    ``recipe.augment != "none"``). Returns the mean training loss of the last epoch.
    """
    recipe.check()
    device = next(head.parameters()).device
    params, groups = param_groups(backbone, head, recipe, train_backbone)
    if recipe.fedprox_mu > 0 and prox_ref is None:
        prox_ref = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(groups, lr=recipe.lr, weight_decay=recipe.weight_decay)
    weight = (balanced_weights(y, head.out_features, task).to(device)
              if recipe.class_weighting == "balanced" else None)
    gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator().manual_seed(derive_seed(seed, "augment"))
    use_aug = augment is not None and recipe.augment != "none" and not augment.is_identity
    sched = lr_schedule(opt, recipe, math.ceil(len(x) / recipe.batch_size))
    backbone.set_drop_path(recipe.drop_path if train_backbone else 0.0)
    backbone.train(train_backbone)
    head.train()
    last = float("nan")
    with seeded(seed):
        for _ in range(recipe.epochs):
            total_loss, count = 0.0, 0
            for idx in batch_indices(len(x), recipe.batch_size, gen):
                xb, yb = x[idx], y[idx].to(device)
                xb = (augment.apply(xb, aug_gen) if use_aug else xb).to(device)
                if train_backbone:
                    feats = backbone.forward_features(xb)
                else:
                    with torch.no_grad():
                        feats = backbone.forward_features(xb)
                loss = task_loss(head(feats), yb, task, weight, recipe.label_smoothing)
                if recipe.fedprox_mu > 0:
                    assert prox_ref is not None
                    prox = sum(((p - r) ** 2).sum() for p, r in zip(params, prox_ref, strict=True))
                    loss = loss + 0.5 * recipe.fedprox_mu * prox
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                total_loss += float(loss.detach()) * len(idx)
                count += len(idx)
            last = total_loss / max(count, 1)
    backbone.set_drop_path(0.0)
    backbone.eval()
    head.eval()
    return {"train_loss": last}


@torch.no_grad()
def extract_features(backbone: VisionTransformer, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, C, H, W) -> (N, D) cls features, in eval mode, on the CPU."""
    backbone.eval()
    device = next(backbone.parameters()).device
    out = [backbone.forward_features(x[i:i + batch_size].to(device)).cpu()
           for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.empty(0, backbone.feature_dim)


@torch.no_grad()
def predict_logits(backbone: VisionTransformer, head: nn.Module, x: torch.Tensor,
                   batch_size: int = 256) -> torch.Tensor:
    """(N, C, H, W) -> (N, num_classes) logits on the CPU."""
    head.eval()
    feats = extract_features(backbone, x, batch_size)
    device = next(head.parameters()).device
    return head(feats.to(device)).cpu()


def new_head(embed_dim: int, num_classes: int, seed: int) -> nn.Linear:
    """A freshly initialised linear head (weights N(0, 0.01^2), zero bias), reproducible by seed."""
    head = nn.Linear(embed_dim, num_classes)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.01)
        head.bias.zero_()
    return head
