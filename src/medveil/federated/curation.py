"""Server knowledge curation: how client updates become the next universal model.

The paper (Radwan, Osman, Shehata, arXiv 2407.14719) says only that the server curates "the
information learned from clients without accessing any labelled dataset", stage by stage. What
follows is OUR RECONSTRUCTION; every choice below is a config option.

``distill`` (default): multi-head distillation on the server's unlabelled pool. For a stage whose
participating clients are S (their returned models are the teachers T_k), on pool batches x:

    L = sum_{k in S} tau^2 KL(softmax(T_k(x)/tau) || softmax(head_k(f(x))/tau))
        + lam * sum_{i registered, i not in S} tau^2 KL(softmax(old_i(x)/tau) || softmax(head_i(f(x))/tau))
        + mu * L_MIM(x)

old_i are the global model's own outputs before this curation (anti-forgetting for clients that
did not train now); L_MIM is the server's MAE loss (features stay general). With one participant
per curation (``schedule = "sequential"``) this is exactly the spec's per-client formula; with
several participants we sum the formula over k and let a participant's fresh teacher replace its
old-output target (a head has one target); so with every client in every parallel stage the
lam term is empty and it acts under client sampling (client_fraction < 1) or the sequential
schedule. Multi-label heads use the per-class Bernoulli KL.
Defaults: tau = 2 (spec: 1..4), lam = 0.5 (the group's FedNet), mu = 1.0 (our choice: MIM and
tau^2-scaled KL are both O(1)), five passes over the pool with AdamW lr 1e-3 (chosen over one
pass at lr 5e-4 on the quick benchmark's data; figures in ``benchmarks/results/``).
``pool_balance = true``: distillation batches weigh every source dataset of the pool the same
(the server knows where its unlabelled images came from; a small site's share of the pool is
otherwise tiny: 109 breast images beside 1000 of each large set in ``medmnist6.toml``).
``own_source_weight = w``: teacher k's KL term is a weighted mean over the batch, w on the pool
images that came from site k's own dataset and 1 on the others' (a breast teacher's outputs on
blood cells are a function the student must copy too, but not the one the breast task needs);
w = 1 is the formula above. Both need the pool's sources (in-process ``pool_fraction`` pools).
``views = V``: the transfer set is each pool image and V - 1 seeded augmented views of it (random
resized crop down to half the area, horizontal flip, rotation up to 10 degrees, fresh each
curation); the teachers label every view, so the student matches their function on images
beyond the pool's few hundred of a small site ("function matching": Beyer et al., "Knowledge
distillation: a good teacher is patient and consistent", CVPR 2022). The number of steps stays
``epochs`` passes over the pool (each view is drawn epochs / V times on average; with
``pool_balance`` a small source's views more often). Teacher outputs, the ``lam`` targets and the
``kd_*`` / ``forget_kl_*`` figures of ``metrics.json`` are all over the V M images (so those
figures do not compare with a run at V = 1), and the transfer set holds V copies of the pool in
CPU memory (28 px: 9 KB an image; 224 px: 600 KB). Any view may flip a left/right class: the
teacher's label for it is what the student copies, so no modality rule is needed. V = 1 (default)
is the pool alone, bit for bit as before the option existed.
Student initialisation ``init``: "average" (default, our choice) starts from the n_k-weighted
average of the teachers' backbones and copies the teachers' heads, then distils; "base" starts
from the current global model (pure distillation: the server's weights only move through KD).

``relay``: the next base is client k's backbone, optionally interpolated:
``base <- (1 - alpha) base + alpha w_k`` (alpha = 1 copies); heads are the clients' heads. With
several updates in one curation they are applied in order; its default schedule is
"sequential" (each client trains from the previous client's result: cyclic weight transfer).

``fedavg``: backbone = sum_k n_k w_k / sum_k n_k; each client keeps its own head (FedPer-style).
With ``[local] fedprox_mu > 0`` the clients train with the FedProx term (FedProx baseline).
Robust variants (``[curation] aggregation``): "median" (coordinate-wise median) or "trimmed_mean"
(coordinate-wise mean after cutting ``trim_fraction`` of the values at each end), both
unweighted (numpy / scipy, the arithmetic of Flower's ``aggregate_median`` /
``aggregate_trimmed_avg``; the core runs without the Flower extra); they bound
what one faulty or malicious site can do to the backbone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medveil.data.augment import AugmentPolicy
from medveil.errors import ConfigError
from medveil.federated.rebuild import build_backbone, build_head
from medveil.federated.messages import ClientUpdate, StateDict
from medveil.federated.server import Server, require_pool
from medveil.federated.training import batch_indices, extract_features, predict_logits, seeded
from medveil.progress import bar as progress_bar

STRATEGIES = ("distill", "relay", "fedavg")
DEFAULT_SCHEDULE = {"distill": "parallel", "relay": "sequential", "fedavg": "parallel"}
MULTILABEL = "multi-label"


@dataclass
class CurationParams:
    """The ``[curation]`` config section."""

    tau: float = 2.0
    lam: float = 0.5
    mim_mu: float = 1.0
    epochs: float = 5.0       # passes over the pool per curation
    batch_size: int = 128
    lr: float = 1e-3
    mask_ratio: float = 0.75
    init: str = "average"     # distill student init: "average" | "base"
    pool_balance: bool = False  # distill: every source dataset of the pool weighs the same
    own_source_weight: float = 1.0  # distill: a teacher's KD weight on pool images of its own site's
                                    # dataset, against 1 on the others' (1: every image the same)
    views: int = 1            # distill: the pool image and views - 1 augmented views, each labelled by the teachers
    relay_alpha: float = 1.0
    aggregation: str = "mean"  # fedavg backbone: "mean" (n_k-weighted) | "median" | "trimmed_mean"
    trim_fraction: float = 0.2  # trimmed_mean: share cut at each end, in [0, 0.5)


AGGREGATIONS = ("mean", "median", "trimmed_mean")
KD_VIEW = AugmentPolicy(hflip=True, crop_scale=(0.5, 1.0), rotate_deg=10.0)  # ``views``' augmentation


def transfer_set(pool: torch.Tensor, groups: torch.Tensor | None, views: int,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(V M, C, H, W) images and (V M,) source groups: the pool, then ``views`` - 1 augmented
    copies of it (:data:`KD_VIEW`, drawn from ``seed`` on the CPU, so any device gives the same
    views), image i of copy k at k M + i; the pool itself when ``views`` = 1. On the CPU (the
    curation moves each batch to the device)."""
    if views == 1:
        return pool, groups
    gen, cpu_pool = torch.Generator().manual_seed(seed), pool.cpu()
    copies = [KD_VIEW.apply(cpu_pool, gen) for _ in range(views - 1)]
    return torch.cat([cpu_pool, *copies]), None if groups is None else groups.cpu().repeat(views)


def robust_average(states: list[StateDict], how: str, trim_fraction: float = 0.2) -> StateDict:
    """Coordinate-wise median (``numpy.median``) or trimmed mean (``scipy.stats.trim_mean``: cut
    int(trim_fraction * K) of the K values at each end) of floating tensors, in float64 and cast
    back; other tensors from the first state. The same arithmetic as Flower's
    ``aggregate_median`` / ``aggregate_trimmed_avg`` (tested), without needing Flower."""
    from scipy.stats import trim_mean

    out = dict(states[0])
    for key, ref in states[0].items():
        if not ref.is_floating_point():
            continue
        stacked = np.stack([s[key].double().numpy() for s in states])
        arr = np.median(stacked, axis=0) if how == "median" else trim_mean(stacked, trim_fraction, axis=0)
        out[key] = torch.from_numpy(np.asarray(arr, dtype=np.float64)).to(ref.dtype)
    return out


def weighted_average(states: list[StateDict], weights: list[float]) -> StateDict:
    """sum_k w_k s_k / sum_k w_k per floating tensor (in float64, cast back); other tensors from the first."""
    total = float(sum(weights))
    if not states or total <= 0:
        raise ValueError("weighted_average needs at least one state and positive weights")
    out: StateDict = {}
    for key, ref in states[0].items():
        if not ref.is_floating_point():
            out[key] = ref.clone()
            continue
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for state, w in zip(states, weights, strict=True):
            acc += state[key].double() * (float(w) / total)
        out[key] = acc.to(ref.dtype)
    return out


def interpolate(base: StateDict, new: StateDict, alpha: float) -> StateDict:
    """(1 - alpha) base + alpha new; alpha = 1 returns an exact copy of ``new``."""
    if alpha == 1.0:
        return {k: v.clone() for k, v in new.items()}
    return {k: (torch.lerp(base[k], new[k], alpha) if base[k].is_floating_point() else new[k].clone())
            for k in base}


def distill_kl(student: torch.Tensor, teacher: torch.Tensor, tau: float, task: str,
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """tau^2 KL(teacher || student) at temperature tau, mean over the batch (``weight`` (B,): the
    weighted mean); logits (B, C)."""
    if task == MULTILABEL:
        t = torch.sigmoid(teacher / tau)
        ls_pos, ls_neg = F.logsigmoid(student / tau), F.logsigmoid(-student / tau)
        lt_pos, lt_neg = F.logsigmoid(teacher / tau), F.logsigmoid(-teacher / tau)
        kl = (t * (lt_pos - ls_pos) + (1 - t) * (lt_neg - ls_neg)).sum(dim=1)
    elif weight is None:
        return tau**2 * F.kl_div(F.log_softmax(student / tau, dim=1), F.log_softmax(teacher / tau, dim=1),
                                 reduction="batchmean", log_target=True)
    else:
        kl = F.kl_div(F.log_softmax(student / tau, dim=1), F.log_softmax(teacher / tau, dim=1),
                      reduction="none", log_target=True).sum(dim=1)
    return tau**2 * (kl.mean() if weight is None else (weight * kl).sum() / weight.sum())


def pool_batches(n: int, n_steps: int, batch_size: int, gen: torch.Generator,
                 groups: torch.Tensor | None = None) -> list[torch.Tensor]:
    """``n_steps`` index batches over a pool of ``n`` images. Without ``groups``: shuffled passes
    (every image once per pass). With ``groups`` (the source dataset of each image): each batch
    drawn with replacement so that every source weighs the same; a source with 109 images is seen
    as often as one with 1000 (the teachers of small sites are distilled on images like theirs)."""
    if groups is None:
        steps: list[torch.Tensor] = []
        while len(steps) < n_steps:
            steps += batch_indices(n, batch_size, gen)
        return steps[:n_steps]
    counts = torch.bincount(groups).double()
    weights = 1.0 / counts[groups]
    return list(torch.multinomial(weights, n_steps * batch_size, replacement=True,
                                  generator=gen).split(batch_size))


class Curator:
    name = "base"

    def curate(self, server: Server, updates: list[ClientUpdate], seed: int,
               progress: bool = True) -> dict[str, Any]:
        raise NotImplementedError


class FedAvgCurator(Curator):
    name = "fedavg"

    def __init__(self, aggregation: str = "mean", trim_fraction: float = 0.2) -> None:
        if aggregation not in AGGREGATIONS:
            raise ConfigError(f"[curation] aggregation must be one of {', '.join(AGGREGATIONS)}, "
                              f"got {aggregation!r}")
        if not 0.0 <= trim_fraction < 0.5:
            raise ConfigError(f"[curation] trim_fraction must be in [0, 0.5), got {trim_fraction}")
        self.aggregation, self.trim_fraction = aggregation, trim_fraction

    def curate(self, server: Server, updates: list[ClientUpdate], seed: int,
               progress: bool = True) -> dict[str, Any]:
        if not updates:
            return {"aggregated": 0}
        states = [u.backbone for u in updates]
        server.load_backbone(weighted_average(states, [u.n_samples for u in updates])
                             if self.aggregation == "mean"
                             else robust_average(states, self.aggregation, self.trim_fraction))
        for u in updates:
            server.set_head(u.client_name, u.head)
        return {"aggregated": len(updates), "aggregation": self.aggregation}


class RelayCurator(Curator):
    name = "relay"

    def __init__(self, alpha: float = 1.0) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ConfigError(f"[curation] relay_alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha

    def curate(self, server: Server, updates: list[ClientUpdate], seed: int,
               progress: bool = True) -> dict[str, Any]:
        for u in updates:
            server.load_backbone(interpolate(server.backbone_state(), u.backbone, self.alpha))
            server.set_head(u.client_name, u.head)
        return {"aggregated": len(updates)}


class DistillCurator(Curator):
    name = "distill"

    def __init__(self, params: CurationParams) -> None:
        if params.init not in ("average", "base"):
            raise ConfigError(f"[curation] init must be 'average' or 'base', got {params.init!r}")
        if params.tau <= 0 or params.lam < 0 or params.mim_mu < 0 or params.epochs <= 0:
            raise ConfigError("[curation] needs tau > 0, lam >= 0, mim_mu >= 0, epochs > 0")
        if not params.own_source_weight > 0:
            raise ConfigError(f"[curation] own_source_weight must be > 0, got {params.own_source_weight}")
        if isinstance(params.views, bool) or not isinstance(params.views, int) or params.views < 1:
            raise ConfigError(f"[curation] views must be an integer >= 1, got {params.views!r}")
        self.p = params

    def teacher_logits(self, server: Server, u: ClientUpdate, images: torch.Tensor) -> torch.Tensor:
        entry = server.registry[u.client_name]
        backbone = build_backbone(server.cfg.to_dict(), u.backbone).to(server.device)
        head = build_head(u.head, entry.num_classes, f"client {u.client_name!r}").to(server.device)
        return predict_logits(backbone, head, images)

    @torch.no_grad()
    def mean_kls(self, server: Server, images: torch.Tensor,
                 *targets: dict[str, torch.Tensor]) -> list[float]:
        """For each target set: the mean over its heads of tau^2 KL(target || head(f(images))) on
        all the transfer images (0 for an empty set); the features extracted once for all."""
        feats = (extract_features(server.model, images).to(server.device) if any(targets) else None)
        return [float(sum(distill_kl(server.heads[n](feats), t.to(server.device), self.p.tau, server.registry[n].task)
                          for n, t in ts.items()) / len(ts)) if ts else 0.0 for ts in targets]

    def own_source_weights(self, server: Server, names: list[str],
                           groups: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """{teacher: (N,) KD weight of each transfer image}: ``own_source_weight`` on the images of
        its own dataset, 1 elsewhere; empty when the weight is 1 or the pool's sources are unknown.
        ``groups``: the transfer set's sources (default: the pool's)."""
        w = self.p.own_source_weight
        groups = server.pool_groups if groups is None else groups
        if w == 1.0 or groups is None:
            return {}
        return {n: torch.where(groups == server.pool_sources.index(n), w, 1.0)
                for n in names if n in server.pool_sources}

    def curate(self, server: Server, updates: list[ClientUpdate], seed: int,
               progress: bool = True) -> dict[str, Any]:
        if not updates:
            return {"aggregated": 0}
        require_pool(server.pool, "distill curation")
        p, model = self.p, server.model
        # the transfer set (the pool, or the pool and its views: seed + 1, the seed of the measured runs)
        images, groups = transfer_set(server.pool, server.pool_groups, p.views, seed + 1)
        teachers = {u.client_name: self.teacher_logits(server, u, images) for u in updates}
        others = [n for n in server.registry if n not in teachers]
        with torch.no_grad():
            feats = extract_features(model, images).to(server.device)
            old = {n: server.heads[n](feats).detach() for n in others}
        if p.init == "average":
            server.load_backbone(weighted_average([u.backbone for u in updates],
                                                  [u.n_samples for u in updates]))
            for u in updates:
                server.set_head(u.client_name, u.head)
        kd_before, forget_before = self.mean_kls(server, images, teachers, old)
        params = [q for q in model.parameters() if q.requires_grad] + list(server.heads.parameters())
        opt = torch.optim.AdamW(params, lr=p.lr, weight_decay=0.0)
        gen = torch.Generator().manual_seed(seed)
        n_steps = max(1, round(p.epochs * len(server.pool) / p.batch_size))  # passes over the pool, any views
        steps = pool_batches(len(images), n_steps, p.batch_size, gen, groups if p.pool_balance else None)
        device = server.device
        own = self.own_source_weights(server, list(teachers), groups)
        model.train()
        server.heads.train()
        mim_total = 0.0
        with seeded(seed):
            for idx in progress_bar(steps, desc="curation: distill", leave=False,
                                    disable=not progress):
                x = images[idx].to(device)
                f = model.forward_features(x)
                loss = sum(distill_kl(server.heads[n](f), t[idx].to(device), p.tau, server.registry[n].task,
                                      own[n][idx].to(device) if n in own else None)
                           for n, t in teachers.items())
                if old:
                    loss = loss + p.lam * sum(
                        distill_kl(server.heads[n](f), t[idx].to(device), p.tau, server.registry[n].task)
                        for n, t in old.items())
                if p.mim_mu > 0:
                    mim, _, _ = model(x, mask_ratio=p.mask_ratio)
                    loss = loss + p.mim_mu * mim
                    mim_total += float(mim.detach())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        model.eval()
        server.heads.eval()
        balance = {"pool_balanced": server.pool_groups is not None} if p.pool_balance else {}
        views = {"views": p.views} if p.views > 1 else {}
        kd_after, forget_after = self.mean_kls(server, images, teachers, old)
        return {"aggregated": len(updates), "steps": n_steps, **balance, **views,
                "kd_before": kd_before, "kd_after": kd_after,
                "forget_kl_before": forget_before, "forget_kl_after": forget_after,
                "mim_loss": mim_total / n_steps if p.mim_mu > 0 else None}


def make_curator(strategy: str, params: CurationParams) -> Curator:
    """The curator for a strategy name; ConfigError for an unknown name."""
    if params.pool_balance and strategy != "distill":
        raise ConfigError(f"[curation] pool_balance applies to strategy 'distill' only, not {strategy!r}")
    if params.own_source_weight != 1.0 and strategy != "distill":
        raise ConfigError(f"[curation] own_source_weight applies to strategy 'distill' only, not {strategy!r}")
    if params.views != 1 and strategy != "distill":
        raise ConfigError(f"[curation] views applies to strategy 'distill' only, not {strategy!r}")
    if strategy == "distill":
        return DistillCurator(params)
    if strategy == "relay":
        return RelayCurator(params.relay_alpha)
    if strategy == "fedavg":
        return FedAvgCurator(params.aggregation, params.trim_fraction)
    raise ConfigError(f"unknown strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")
