"""Non-federated baselines on the same clients, data and budget as a federation.

Budget: a federation of R stages with E local epochs gives every client R*E passes over its
train split; the baselines below get the same R*E epochs (``recipe.epochs``), same optimiser.

- ``local_only``: each client alone, a ViT from random init (no pretraining, no collaboration).
- ``centralised``: the non-private upper bound: every client's labelled data pooled on one
  machine, one backbone (from the same stage-0 MIM backbone as the federation) with one head
  per client, each sample's loss on its own head, with the clients' recipe: heads at
  ``head_lr_scale`` x the backbone's learning rate and, for ``class_weighting = "balanced"``,
  each client's own inverse-frequency class weights (as its local training uses).
- MIM-only (the paper's baseline) is the stage-0 backbone itself, evaluated with the recipes of
  :mod:`medveil.evaluate.probe`; FedAvg / FedProx are federations with ``strategy = "fedavg"``
  (``[local] fedprox_mu > 0`` for FedProx).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from medveil.federated.messages import StateDict
from medveil.federated.sites import ClientData
from medveil.federated.training import (
    TrainRecipe,
    balanced_weights,
    batch_indices,
    derive_seed,
    lr_schedule,
    new_head,
    param_groups,
    predict_logits,
    seeded,
    task_loss,
    train_classifier,
)
from medveil.metrics import classification_metrics
from medveil.models import ViTConfig, VisionTransformer


def local_only(cfg: ViTConfig, clients: list[ClientData], recipe: TrainRecipe,
               seed: int) -> dict[str, dict[str, float]]:
    """Per client: a randomly initialised ViT + head trained on its own data; test metrics."""
    out = {}
    for data in clients:
        with seeded(derive_seed(seed, data.name, "local-init")):
            backbone = VisionTransformer(cfg, num_classes=0)
        head = new_head(cfg.feature_dim, data.num_classes, derive_seed(seed, data.name, "local-head"))
        train_classifier(backbone, head, data.x_train, data.y_train, data.task, recipe,
                         derive_seed(seed, data.name, "local-fit"), augment=data.augmentation(recipe.augment))
        logits = predict_logits(backbone, head, data.x_test)
        out[data.name] = classification_metrics(data.task.value, data.y_test.numpy(), logits.numpy())
    return out


def centralised(cfg: ViTConfig, backbone_state: StateDict, clients: list[ClientData],
                recipe: TrainRecipe, seed: int) -> dict[str, dict[str, float]]:
    """Pooled multi-task training (upper bound); per-client test metrics with their heads."""
    backbone = VisionTransformer(cfg, num_classes=0)
    backbone.load_state_dict(backbone_state, strict=True)
    heads = nn.ModuleList(new_head(cfg.feature_dim, d.num_classes, derive_seed(seed, d.name, "central-head"))
                          for d in clients)
    owner = torch.cat([torch.full((len(d.x_train),), i) for i, d in enumerate(clients)])
    offsets = torch.tensor([0] + [len(d.x_train) for d in clients]).cumsum(0)
    recipe.check()
    _, groups = param_groups(backbone, heads, recipe)
    opt = torch.optim.AdamW(groups, lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = lr_schedule(opt, recipe, math.ceil(len(owner) / recipe.batch_size))
    weights = [balanced_weights(d.y_train, d.num_classes, d.task) if recipe.class_weighting == "balanced"
               else None for d in clients]
    policies = [d.augmentation(recipe.augment) for d in clients]  # each client's images, its own policy
    gen = torch.Generator().manual_seed(derive_seed(seed, "central-order"))
    aug_gen = torch.Generator().manual_seed(derive_seed(seed, "central-augment"))
    backbone.set_drop_path(recipe.drop_path)
    backbone.train()
    with seeded(derive_seed(seed, "central-fit")):
        for _ in range(recipe.epochs):
            for idx in batch_indices(len(owner), recipe.batch_size, gen):
                who = owner[idx]
                parts = [(i, idx[who == i] - offsets[i]) for i in who.unique().tolist()]
                feats = backbone.forward_features(torch.cat([policies[i].apply(clients[i].x_train[loc], aug_gen)
                                                             for i, loc in parts]))
                loss, start = torch.zeros(()), 0
                for i, loc in parts:  # each sample's loss on its own client's head
                    f = feats[start:start + len(loc)]
                    start += len(loc)
                    d = clients[i]
                    loss = loss + task_loss(heads[i](f), d.y_train[loc], d.task, weights[i],
                                            recipe.label_smoothing) * len(loc) / len(idx)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
    backbone.set_drop_path(0.0)
    backbone.eval()
    out = {}
    for i, data in enumerate(clients):
        logits = predict_logits(backbone, heads[i], data.x_test)
        out[data.name] = classification_metrics(data.task.value, data.y_test.numpy(), logits.numpy())
    return out
