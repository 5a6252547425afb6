"""Small helpers shared by every optimisation in latent space (projector, style alignment):
the warm-up / cosine-decay learning-rate schedule and a context that freezes networks."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch.nn as nn


def warmup_cosine_lr(step: int, steps: int, lr: float, warmup_frac: float = 0.05,
                     decay_frac: float = 0.25) -> float:
    """Learning rate of 0-based ``step`` of ``steps``: linear warm-up over the first
    ``warmup_frac``, constant, then cosine decay to 0 over the last ``decay_frac``."""
    warm = max(1, round(warmup_frac * steps))
    decay_start = steps - round(decay_frac * steps)
    if step < warm:
        return lr * (step + 1) / warm
    if step >= decay_start:
        t = (step - decay_start) / max(1, steps - decay_start)
        return lr * 0.5 * (1.0 + math.cos(math.pi * t))
    return lr


@contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients inside; restores the previous flags after."""
    saved = [(m, m.training, [p.requires_grad for p in m.parameters()]) for m in modules]
    for m in modules:
        m.eval()
        m.requires_grad_(False)
    try:
        yield
    finally:
        for m, training, flags in saved:
            m.train(training)
            for p, flag in zip(m.parameters(), flags):
                p.requires_grad_(flag)
