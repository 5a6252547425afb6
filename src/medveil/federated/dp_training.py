"""DP-SGD for a site's local training, through Opacus (``GradSampleModule`` for per-example
gradients, ``DPOptimizer`` for clipping and noise).

What trains under DP (``[privacy] trainable``): ``all`` the backbone and head, ``last_block`` the
last transformer block + final norm + head, ``norms_head`` every LayerNorm + head, ``head`` the
head alone. Whatever the choice, three parts stay frozen under DP, said here plainly: the class
token (a bare parameter of the ViT itself, for which Opacus computes no per-example gradient),
the fixed sin-cos position table (never trained), and the linear patch projection of the
``patch`` stem (computed as one matmul on the patches, not through the module Opacus hooks); the
``conv`` and ``cnn`` stems train (convolutions and GroupNorm have per-example gradients).

Batches are Poisson samples (each image in with probability q = B / n, B the ``[privacy]
batch_size`` or else the ``[local]`` one; ``round(1 / q)``
steps per epoch; an empty batch still takes its noisy step), as the accountant assumes. The loss
is the plain mean of unweighted per-example losses, so one example's clipped gradient does not
depend on the others (class weights computed from the private labels are refused under DP).
Randomness (sampling, noise, augmentation) comes from 63-bit seeds hashed from the site's secret:
the server, which knows every public seed, cannot reproduce the noise. The generators are
PyTorch's, not a cryptographically secure one (Opacus' ``secure_mode``), which would make a
resumed stage differ from the uninterrupted one.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import replace

import torch
import torch.nn as nn

from medveil.data import Task
from medveil.data.augment import AugmentPolicy
from medveil.federated.privacy import PrivacyOptions
from medveil.federated.training import TrainRecipe, lr_schedule, param_groups, seeded, task_loss
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


def per_example_loss(logits: torch.Tensor, y: torch.Tensor, task: Task | str, label_smoothing: float) -> torch.Tensor:
    """(B,) losses, unweighted (class weights from the private labels are refused under DP)."""
    return task_loss(logits, y, task, smoothing=label_smoothing, reduction="none")


def wide_seed(secret: int, *tags: object) -> int:
    """A 63-bit seed from the site's secret and tags (a SHA-256 digest, not the 31-bit
    ``derive_seed`` of the public seeds)."""
    text = ":".join(str(t) for t in (secret, *tags)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big") & (2**63 - 1)


def dp_recipe(recipe: TrainRecipe, opts: PrivacyOptions) -> TrainRecipe:
    """The [local] recipe as DP-SGD runs it: learning rate times ``opts.lr_scale``, expected batch
    ``opts.batch_size`` (0: the [local] batch size)."""
    return replace(recipe, lr=recipe.lr * opts.lr_scale, batch_size=opts.batch_size or recipe.batch_size)


def dp_plan(n: int, recipe: TrainRecipe) -> tuple[float, int]:
    """(sampling rate q, DP-SGD steps of one stage) for a site holding n training images, with
    the recipe DP-SGD runs (:func:`dp_recipe`)."""
    q = min(1.0, recipe.batch_size / max(n, 1))
    return q, recipe.epochs * max(1, round(1 / q))


def dp_train_classifier(backbone: VisionTransformer, head: nn.Linear, x: torch.Tensor, y: torch.Tensor,
                        task: Task | str, recipe: TrainRecipe, opts: PrivacyOptions, noise_multiplier: float,
                        secret_seed: int, augment: AugmentPolicy | None = None) -> dict[str, float]:
    """Train in place with DP-SGD for ``recipe.epochs`` epochs (the recipe's optimiser groups,
    layer decay and schedule, as :func:`dp_recipe` changes it; no class weights, no
    FedProx: refused under DP); returns
    {"train_loss" (site-side only: not sent), "steps"}."""
    from opacus import GradSampleModule

    opts.check_recipe(recipe.class_weighting, recipe.fedprox_mu)
    recipe = dp_recipe(recipe, opts)
    q, steps = dp_plan(len(x), recipe)
    set_trainable(backbone, head, opts.trainable)
    model = GradSampleModule(_Classifier(backbone, head), loss_reduction="mean")
    _, groups = param_groups(backbone, head, recipe)
    base = torch.optim.AdamW(groups, lr=recipe.lr, weight_decay=recipe.weight_decay)
    use_aug = augment is not None and recipe.augment != "none" and not augment.is_identity
    model.train()
    backbone.set_drop_path(0.0)  # per-example gradients of one deterministic path
    loss = _dp_sgd(model, base, lr_schedule(base, recipe, max(1, round(1 / q))), x, y, task,
                   recipe.label_smoothing, q, steps, noise_multiplier, opts.max_grad_norm, secret_seed,
                   augment if use_aug else None)
    for p in list(backbone.parameters()) + list(head.parameters()):
        p.requires_grad_(True)
        p.grad = None
    backbone.pos_embed.requires_grad_(False)
    backbone.eval()
    head.eval()
    return {"train_loss": loss, "steps": float(steps)}


def dp_fit_head(head: nn.Linear, features: torch.Tensor, y: torch.Tensor, task: Task | str, recipe: TrainRecipe,
                opts: PrivacyOptions, noise_multiplier: float, secret_seed: int) -> dict[str, float]:
    """DP-SGD on a linear head alone, in place, over fixed features (N, D) of the private images
    (the received backbone's, in the server's public basis, :mod:`.feature_basis`: computing
    them spends nothing), from the head it starts with: ``opts.calibration_epochs`` epochs at the
    sampling rate and batch of the stages (:func:`dp_plan`), AdamW at ``opts.calibration_lr``,
    warm-up + cosine as the recipe schedules. Returns {"train_loss" (site-side only), "steps"}."""
    from opacus import GradSampleModule

    recipe = replace(dp_recipe(recipe, opts), epochs=opts.calibration_epochs)
    q, steps = dp_plan(len(features), recipe)
    for p in head.parameters():
        p.requires_grad_(True)
    model = GradSampleModule(head, loss_reduction="mean")
    base = torch.optim.AdamW(head.parameters(), lr=opts.calibration_lr, weight_decay=recipe.weight_decay)
    model.train()
    loss = _dp_sgd(model, base, lr_schedule(base, recipe, max(1, round(1 / q))), features, y, task,
                   recipe.label_smoothing, q, steps, noise_multiplier, opts.max_grad_norm, secret_seed, None)
    for p in head.parameters():
        p.grad = None
    head.eval()
    return {"train_loss": loss, "steps": float(steps)}


def _dp_sgd(model: nn.Module, base: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LambdaLR | None,
            x: torch.Tensor, y: torch.Tensor, task: Task | str, label_smoothing: float, q: float, steps: int,
            noise_multiplier: float, max_grad_norm: float, secret_seed: int,
            augment: AugmentPolicy | None) -> float:
    """``steps`` DP-SGD steps of ``model`` (an Opacus ``GradSampleModule``) through ``base``:
    Poisson batches of rate q, per-example gradients clipped to ``max_grad_norm``, Gaussian
    noise; sampling, noise and augmentation seeded from ``secret_seed``. Returns the mean
    training loss (site-side only). Unwraps the module's hooks when done."""
    from opacus.optimizers import DPOptimizer

    n = len(x)
    device = next(model.parameters()).device
    noise_gen = torch.Generator(device=device).manual_seed(wide_seed(secret_seed, "noise"))
    sample_gen = torch.Generator().manual_seed(wide_seed(secret_seed, "sample"))
    aug_gen = torch.Generator().manual_seed(wide_seed(secret_seed, "augment"))
    opt = DPOptimizer(base, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                      expected_batch_size=max(1, round(q * n)), generator=noise_gen)
    trained = [p for p in model.parameters() if p.requires_grad]
    total, count = 0.0, 0
    with seeded(wide_seed(secret_seed, "torch") & 0x7FFFFFFF):
        for _ in range(steps):
            idx = torch.nonzero(torch.rand(n, generator=sample_gen) < q).flatten()
            opt.zero_grad(set_to_none=True)
            if len(idx) == 0:  # an empty Poisson batch still takes its noisy step, as accounted
                for p in trained:
                    p.grad_sample = torch.zeros((0, *p.shape), device=p.device)
            else:
                xb = augment.apply(x[idx], aug_gen) if augment is not None else x[idx]
                losses = per_example_loss(model(xb.to(device)), y[idx].to(device), task, label_smoothing)
                with warnings.catch_warnings():  # Opacus' hook on a first layer whose input needs no gradient
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    losses.mean().backward()
                total += float(losses.detach().sum())
                count += len(idx)
            opt.step()
            if sched is not None:
                sched.step()
    model._close()
    return total / max(count, 1)
