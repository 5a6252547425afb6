"""DP-SGD for a site's local training, through Opacus (``GradSampleModule`` for per-example
gradients, ``DPOptimizer`` for clipping and noise).

What trains under DP (``[privacy] trainable``): ``all`` the backbone and head, ``last_block`` the
last transformer block + final norm + head, ``norms_head`` every LayerNorm + head, ``head`` the
head alone. Whatever the choice, three parts stay frozen under DP, said here plainly: the class
token (a bare parameter of the ViT itself, for which Opacus computes no per-example gradient),
the fixed sin-cos position table (never trained), and the linear patch projection of the
``patch`` stem (computed as one matmul on the patches, not through the module Opacus hooks); the
``conv`` stem trains (convolutions and GroupNorm have per-example gradients).

Batches are Poisson samples (each image in with probability q = batch_size / n, ``round(1 / q)``
steps per epoch), as the accountant assumes. The loss is the plain mean of per-example losses
(class weights are fixed per class, never renormalised over the batch, so one example's clipped
gradient does not depend on the others). Randomness (sampling, noise, augmentation) comes from a
seed the site derives from its own secret: the server cannot reproduce the noise.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from medveil.data import Task
from medveil.data.augment import AugmentPolicy
from medveil.errors import ConfigError
from medveil.federated.privacy import PrivacyOptions
from medveil.federated.training import TrainRecipe, balanced_weights, derive_seed, seeded
from medveil.models import VisionTransformer


class _Classifier(nn.Module):
    def __init__(self, backbone: VisionTransformer, head: nn.Linear) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.forward_features(x))


def set_trainable(backbone: VisionTransformer, head: nn.Linear, trainable: str) -> list[str]:
    """Freeze what does not train under DP; returns the names of the backbone parameters that do."""
    last = len(backbone.blocks) - 1
    choose = {
        "all": lambda n: True,
        "last_block": lambda n: n.startswith((f"blocks.{last}.", "norm.")),
        "norms_head": lambda n: ".norm" in f".{n}" and not n.startswith("patch_embed"),
        "head": lambda n: False,
    }[trainable]
    never = ("cls_token", "pos_embed") + (("patch_embed.",) if backbone.cfg.stem == "patch" else ())
    names = []
    for name, p in backbone.named_parameters():
        p.requires_grad_(choose(name) and not name.startswith(never))
        if p.requires_grad:
            names.append(name)
    for p in head.parameters():
        p.requires_grad_(True)
    return names


def per_example_loss(logits: torch.Tensor, y: torch.Tensor, task: Task | str,
                     weight: torch.Tensor | None, label_smoothing: float) -> torch.Tensor:
    """(B,) losses; class weights multiply each example's loss (no batch renormalisation)."""
    if Task(task) is Task.MULTILABEL:
        loss = F.binary_cross_entropy_with_logits(logits, y.float(), pos_weight=weight, reduction="none")
        return loss.mean(dim=1)
    loss = F.cross_entropy(logits, y.long(), reduction="none", label_smoothing=label_smoothing)
    return loss * weight[y.long()] if weight is not None else loss


def dp_plan(n: int, recipe: TrainRecipe) -> tuple[float, int]:
    """(sampling rate q, DP-SGD steps of one stage) for a site holding n training images."""
    q = min(1.0, recipe.batch_size / max(n, 1))
    return q, recipe.epochs * max(1, round(1 / q))


def dp_train_classifier(backbone: VisionTransformer, head: nn.Linear, x: torch.Tensor, y: torch.Tensor,
                        task: Task | str, recipe: TrainRecipe, opts: PrivacyOptions, noise_multiplier: float,
                        secret_seed: int, augment: AugmentPolicy | None = None) -> dict[str, float]:
    """Train in place with DP-SGD for ``recipe.epochs`` epochs; returns {"train_loss", "steps"}."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    if recipe.fedprox_mu > 0:
        raise ConfigError("[privacy] dp = true cannot be combined with FedProx ([local] fedprox_mu > 0)")
    n = len(x)
    q, steps = dp_plan(n, recipe)
    set_trainable(backbone, head, opts.trainable)
    model = GradSampleModule(_Classifier(backbone, head), loss_reduction="mean")
    backbone_params = [p for p in backbone.parameters() if p.requires_grad]
    groups = [g for g in ({"params": backbone_params},
                          {"params": list(head.parameters()), "lr": recipe.lr * recipe.head_lr_scale})
              if g["params"]]
    base = torch.optim.AdamW(groups, lr=recipe.lr, weight_decay=recipe.weight_decay)
    noise_gen = torch.Generator().manual_seed(derive_seed(secret_seed, "noise"))
    sample_gen = torch.Generator().manual_seed(derive_seed(secret_seed, "sample"))
    aug_gen = torch.Generator().manual_seed(derive_seed(secret_seed, "augment"))
    opt = DPOptimizer(base, noise_multiplier=noise_multiplier, max_grad_norm=opts.max_grad_norm,
                      expected_batch_size=max(1, round(q * n)), generator=noise_gen)
    weight = balanced_weights(y, head.out_features, task) if recipe.class_weighting == "balanced" else None
    use_aug = augment is not None and recipe.augment != "none" and not augment.is_identity
    model.train()
    backbone.set_drop_path(0.0)  # per-example gradients of one deterministic path
    total, count = 0.0, 0
    with seeded(derive_seed(secret_seed, "torch")):
        for _ in range(steps):
            idx = torch.nonzero(torch.rand(n, generator=sample_gen) < q).flatten()
            opt.zero_grad(set_to_none=True)
            if len(idx) == 0:  # an empty Poisson batch: the step is counted, nothing is released
                continue
            xb = augment.apply(x[idx], aug_gen) if use_aug else x[idx]
            losses = per_example_loss(model(xb), y[idx], task, weight, recipe.label_smoothing)
            with warnings.catch_warnings():  # Opacus' hook on a first layer whose input needs no gradient
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                losses.mean().backward()
            opt.step()
            total += float(losses.detach().sum())
            count += len(idx)
    model._close()
    for p in list(backbone.parameters()) + list(head.parameters()):
        p.requires_grad_(True)
        p.grad = None
    backbone.pos_embed.requires_grad_(False)
    backbone.eval()
    head.eval()
    return {"train_loss": total / max(count, 1), "steps": float(steps),
            "noise_multiplier": noise_multiplier, "sample_rate": q}
