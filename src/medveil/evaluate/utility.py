"""Utility of a (synthetic) training set: train the same small CNN on it, test on real images.

Recipe (fixed, no model selection on the test set): :class:`~medveil.models.small_cnn.SmallCNN`,
AdamW, cross-entropy, a fixed number of epochs with cosine learning-rate decay, random
horizontal/vertical flips; the final weights are tested. Several seeds; mean and std of
accuracy and quadratic-weighted kappa (:mod:`medveil.metrics`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medveil.data.tensors import to_tensor
from medveil.metrics import accuracy, quadratic_kappa
from medveil.models.small_cnn import SmallCNN
from medveil.progress import bar as progress_bar


@dataclass(frozen=True)
class UtilityConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    width: int = 16
    seeds: tuple[int, ...] = (0, 1, 2)
    flips: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train_classifier(x: torch.Tensor, y: np.ndarray, num_classes: int, cfg: UtilityConfig,
                     seed: int) -> SmallCNN:
    """x (N, C, H, W) in [0, 1], y (N,) int -> a trained SmallCNN (eval mode).
    All randomness (init, order, flips, dropout) comes from ``seed``; the global RNG is untouched."""
    targets = torch.as_tensor(np.asarray(y), dtype=torch.long)
    total = cfg.epochs * max(1, math.ceil(len(x) / cfg.batch_size))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallCNN(x.shape[1], num_classes, cfg.width)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
        model.train()
        for _ in range(cfg.epochs):
            for idx in torch.randperm(len(x)).split(cfg.batch_size):
                if len(idx) < 2:  # BatchNorm needs two samples
                    continue
                xb = x[idx]
                if cfg.flips:
                    flip = torch.rand(2) < 0.5
                    xb = xb.flip(-1) if flip[0] else xb
                    xb = xb.flip(-2) if flip[1] else xb
                loss = F.cross_entropy(model(xb), targets[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return model.eval()


@torch.no_grad()
def predict(model: SmallCNN, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """(N, num_classes) logits."""
    return torch.cat([model(b) for b in x.split(batch_size)]).numpy()


def utility_scores(
    train_sets: Mapping[str, tuple[np.ndarray, np.ndarray]], test_images: np.ndarray,
    test_labels: np.ndarray, num_classes: int, cfg: UtilityConfig = UtilityConfig(),
    progress: bool | None = None,
) -> dict[str, dict[str, Any]]:
    """{name: (uint8 images (N, H, W, C), labels (N,))} -> per set: acc/qwk mean, std, per seed.

    Test images are resized to each training set's image size (the synthetic resolution).
    """
    results: dict[str, dict[str, Any]] = {}
    jobs = [(name, seed) for name in train_sets for seed in cfg.seeds]
    bar = progress_bar(total=len(jobs), desc="utility", unit="model", disable=progress is False)
    test_cache: dict[tuple[int, int], torch.Tensor] = {}
    for name, (images, labels) in train_sets.items():
        size, channels = images.shape[1], images.shape[3]
        x = to_tensor(images, channels=channels)
        if (size, channels) not in test_cache:
            test_cache[(size, channels)] = to_tensor(test_images, size=size, channels=channels)
        x_test = test_cache[(size, channels)]
        accs, kappas = [], []
        for seed in cfg.seeds:
            model = train_classifier(x, labels, num_classes, cfg, seed)
            pred = predict(model, x_test).argmax(axis=1)
            accs.append(accuracy(test_labels, pred))
            kappas.append(quadratic_kappa(test_labels, pred))
            bar.update(1)
        results[name] = _summary(accs, kappas, len(images))
    bar.close()
    return results


def _summary(accs: Sequence[float], kappas: Sequence[float], n_train: int) -> dict[str, Any]:
    a, q = np.asarray(accs), np.asarray(kappas)
    return {"acc_mean": float(a.mean()), "acc_std": float(a.std()),
            "qwk_mean": float(np.nanmean(q)) if np.isfinite(q).any() else float("nan"),
            "qwk_std": float(np.nanstd(q)) if np.isfinite(q).any() else float("nan"),
            "acc": a.tolist(), "qwk": q.tolist(), "n_train": int(n_train)}
