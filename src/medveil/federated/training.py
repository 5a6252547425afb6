"""The one supervised training loop (backbone + linear head) used by clients, baselines and the
fine-tuning evaluation, plus batched inference and seeding helpers.

Loss: cross-entropy for multi-class / binary / ordinal tasks, BCE-with-logits for multi-label.
Optimiser: AdamW, constant learning rate (short local runs), optional FedProx proximal term
``mu / 2 * ||w - w_ref||^2`` over every trained parameter.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from medveil.data import Task
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


def task_loss(logits: torch.Tensor, y: torch.Tensor, task: Task | str,
              weight: torch.Tensor | None = None) -> torch.Tensor:
    """logits (B, C); y (B,) int or (B, C) {0,1} for multi-label -> scalar loss.

    weight: (C,) class weights (cross-entropy) or positive-class weights (multi-label BCE).
    """
    if Task(task) is Task.MULTILABEL:
        return F.binary_cross_entropy_with_logits(logits, y.float(), pos_weight=weight)
    return F.cross_entropy(logits, y, weight=weight)


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
) -> dict[str, float]:
    """Train ``backbone`` + ``head`` in place on (x (N, C, H, W) in [0, 1], y) for recipe.epochs.

    prox_ref: reference tensors, one per trained parameter in order (backbone then head), for the
    FedProx term when ``recipe.fedprox_mu > 0``. Returns the mean training loss of the last epoch.
    """
    device = next(head.parameters()).device
    params = [p for p in backbone.parameters() if p.requires_grad] if train_backbone else []
    n_backbone = len(params)
    params += list(head.parameters())
    if recipe.fedprox_mu > 0 and prox_ref is None:
        prox_ref = [p.detach().clone() for p in params]
    groups = [{"params": params[:n_backbone]},
              {"params": params[n_backbone:], "lr": recipe.lr * recipe.head_lr_scale}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=recipe.lr, weight_decay=recipe.weight_decay)
    if recipe.class_weighting not in ("none", "balanced"):
        raise ConfigError(f"class_weighting must be 'none' or 'balanced', got {recipe.class_weighting!r}")
    weight = (balanced_weights(y, head.out_features, task).to(device)
              if recipe.class_weighting == "balanced" else None)
    gen = torch.Generator().manual_seed(seed)
    backbone.train(train_backbone)
    head.train()
    last = float("nan")
    with seeded(seed):
        for _ in range(recipe.epochs):
            total, count = 0.0, 0
            for idx in batch_indices(len(x), recipe.batch_size, gen):
                xb, yb = x[idx].to(device), y[idx].to(device)
                if train_backbone:
                    feats = backbone.forward_features(xb)
                else:
                    with torch.no_grad():
                        feats = backbone.forward_features(xb)
                loss = task_loss(head(feats), yb, task, weight)
                if recipe.fedprox_mu > 0:
                    assert prox_ref is not None
                    prox = sum(((p - r) ** 2).sum() for p, r in zip(params, prox_ref, strict=True))
                    loss = loss + 0.5 * recipe.fedprox_mu * prox
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
                count += len(idx)
            last = total / max(count, 1)
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
    return torch.cat(out) if out else torch.empty(0, backbone.embed_dim)


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
