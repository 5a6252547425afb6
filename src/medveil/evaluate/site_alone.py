"""What a hospital reaches alone: a CNN trained from scratch on exactly its own train images,
tested on the same test images as every other method, and the published figures it would quote.

Recipe (:class:`SiteAloneRecipe`, the same for every site and both networks): AdamW with a
one-cycle learning rate (``torch.optim.lr_scheduler.OneCycleLR``), the site's own
inverse-frequency class weights, the flips of :mod:`medveil.data.augment` that the modality
allows (none where left and right carry meaning; flips beat both no augmentation and the full
per-modality policy on the validation splits, ``benchmarks/recipe_validation.py --model
small_cnn``), 10 epochs, batch 64. Cost is reported as
CPU-seconds of this process (all threads), so rows of a table compare work, not wall time.

Published reference: MedMNIST v2 (Yang et al., Scientific Data 2023, Table 3), ResNet-18 at
28 px trained on *all* train images of each dataset on a GPU, test accuracy.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from medveil.data.augment import policy_for
from medveil.federated.sites import ClientData
from medveil.federated.training import balanced_weights, batch_indices, derive_seed, seeded, task_loss
from medveil.metrics import classification_metrics
from medveil.models.cnn import CNN_ARCHS, build_cnn

# MedMNIST v2, Table 3: ResNet-18 (28) test accuracy (all train images, GPU)
PUBLISHED_RESNET18_28 = {"bloodmnist": 0.958, "organamnist": 0.935, "retinamnist": 0.524,
                         "breastmnist": 0.863, "pneumoniamnist": 0.854}
PUBLISHED_NOTE = "MedMNIST v2 ResNet-18 (28), all train images, GPU (Yang et al. 2023)"


@dataclass
class SiteAloneRecipe:
    epochs: int = 10
    batch_size: int = 64
    max_lr: float = 3e-3
    weight_decay: float = 5e-4
    augment: str = "flip"  # chosen on validation splits (benchmarks/recipe_validation.py --model small_cnn)
    class_weighting: str = "balanced"


def train_site_alone(arch: str, data: ClientData, recipe: SiteAloneRecipe, seed: int) -> dict[str, Any]:
    """Train ``arch`` on ``data``'s train split alone; test metrics plus ``cpu_seconds``."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    model = fit_site_alone(arch, data, recipe, seed)
    metrics = classification_metrics(data.task.value, data.y_test.numpy(), predict(model, data.x_test).numpy())
    return {**metrics, "cpu_seconds": time.process_time() - cpu0, "wall_seconds": time.perf_counter() - wall0,
            "n_train": len(data.x_train)}


def fit_site_alone(arch: str, data: ClientData, recipe: SiteAloneRecipe, seed: int) -> torch.nn.Module:
    """``arch`` trained on ``data``'s train split with ``recipe``; returned in eval mode."""
    with seeded(derive_seed(seed, data.name, arch, "init")):
        model = build_cnn(arch, data.x_train.shape[1], data.num_classes)
    steps = recipe.epochs * math.ceil(len(data.x_train) / recipe.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.max_lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.max_lr, total_steps=steps)
    weight = (balanced_weights(data.y_train, data.num_classes, data.task)
              if recipe.class_weighting == "balanced" else None)
    policy = policy_for(data.modality, data.class_names, recipe.augment)
    gen = torch.Generator().manual_seed(derive_seed(seed, data.name, arch, "order"))
    aug_gen = torch.Generator().manual_seed(derive_seed(seed, data.name, arch, "augment"))
    model.train()
    with seeded(derive_seed(seed, data.name, arch, "fit")):
        for _ in range(recipe.epochs):
            for idx in batch_indices(len(data.x_train), recipe.batch_size, gen):
                if len(idx) < 2:  # batch norm needs two samples
                    continue
                xb = policy.apply(data.x_train[idx], aug_gen)
                loss = task_loss(model(xb), data.y_train[idx], data.task, weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return model.eval()


def predict(model: torch.nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Logits (N, num_classes) of a site-alone CNN in eval mode, ``batch`` images at a time."""
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


def site_alone(clients: list[ClientData], seed: int, archs: tuple[str, ...] = CNN_ARCHS,
               recipe: SiteAloneRecipe = SiteAloneRecipe()) -> dict[str, Any]:
    """{arch: {client: metrics}} for every client alone, plus the recipe used."""
    out: dict[str, Any] = {"recipe": asdict(recipe)}
    for arch in archs:
        out[arch] = {c.name: train_site_alone(arch, c, recipe, seed) for c in clients}
    return out


def published_row(client: ClientData) -> float | None:
    """The published ResNet-18 (28) accuracy for this client's dataset, when there is one."""
    stem = client.source.replace("\\", "/").rsplit("/", 1)[-1].split(".")[0].split("_")[0].lower()
    return PUBLISHED_RESNET18_28.get(stem)
