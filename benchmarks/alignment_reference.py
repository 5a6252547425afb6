"""The k-SALSA reference's cost structure for local style alignment, kept outside the package:
one group at a time, feature nets rebuilt from their specs for every group, member targets
recomputed every step. Same maths as ``medveil.anonymize.alignment.align_groups`` (same result
up to float rounding; ``tests/test_alignment.py`` checks it), used by ``ksalsa.py --speed-only``
and ``ksalsa_flops.py`` as the per-group loop the batched alignment is compared with."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from medveil.anonymize.alignment import (
    AlignConfig,
    AlignResult,
    collect_results,
    group_losses,
    lr_at,
    member_targets,
)
from medveil.generative.latent_opt import frozen
from medveil.models.features import build_feature_net


def align_per_group_reference(
    G: nn.Module, w_start: torch.Tensor, images: torch.Tensor, recons: torch.Tensor,
    groups: Sequence[np.ndarray], content_spec: str, style_spec: str | None = None,
    cfg: AlignConfig = AlignConfig(), progress: bool | None = None,
) -> AlignResult:
    """The reference's cost structure, for the speed comparison only: one group at a time,
    feature nets rebuilt from their specs for every group, member targets recomputed every
    step. Same maths as :func:`align_groups` (same result up to float rounding)."""
    device = next(G.parameters()).device
    t0 = time.perf_counter()
    outs = []
    for g in tqdm(range(len(groups)), desc="align-ref", unit="group",
                  disable=(not progress) if progress is not None else None):
        content_net = build_feature_net(content_spec).to(device)
        style_net = build_feature_net(style_spec or content_spec).to(device)
        with frozen(G, content_net, style_net):
            w = w_start[g: g + 1].detach().clone().to(device).requires_grad_(True)
            opt = torch.optim.Adam([w], lr=cfg.lr)
            loss_start = None
            for step in range(cfg.steps):
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, cfg)
                targets = member_targets(images, recons, [groups[g]], content_net, style_net,
                                         cfg, device)
                total, _, _, _ = group_losses(G, w, targets, content_net, style_net, cfg)
                loss_start = total.detach() if loss_start is None else loss_start
                opt.zero_grad(set_to_none=True)
                total.sum().backward()
                opt.step()
            with torch.no_grad():
                targets = member_targets(images, recons, [groups[g]], content_net, style_net,
                                         cfg, device)
                total, lc, ls, x = group_losses(G, w, targets, content_net, style_net, cfg)
        outs.append({"ws": w.detach().cpu(), "images": x.clamp(0, 1).cpu(),
                     "loss_start": (total if loss_start is None else loss_start).cpu(),
                     "loss_end": total.cpu(), "content": lc.cpu(), "style": ls.cpu()})
    return collect_results(outs, time.perf_counter() - t0, w_start)
