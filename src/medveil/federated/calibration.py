"""Head calibration, client side: refit this client's own head on the final universal backbone
(frozen) with its private labelled data, and send back only the head.

Why (our addition to the reconstruction, ``[federation] calibrate_heads``): the universal
model's heads come out of distillation on the server's unlabelled pool (or, for FedAvg / relay,
from a client's backbone that is no longer the one they sit on), so they are fitted to teacher
outputs, not to the task. Chosen on validation data only (the evidence and its figures:
``benchmarks/meduniverse_validation.py`` and ``benchmarks/results/``; the test splits untouched).

:func:`local_calibrate`: features of the train split from the received backbone, standardised,
then the head is the minimiser of the client's own training loss (cross-entropy, or BCE for
multi-label, with the ``[local] class_weighting`` weights) plus an L2 penalty ||W||^2 / (2 n),
solved to convergence by L-BFGS in float64 (convex: the result does not depend on the seed or a
starting head). For multi-class tasks this is scikit-learn's L2 multinomial
``LogisticRegression(C=1)`` with the same class weights (tested); a two-class head penalises
both rows, i.e. C = 2 for the logit difference. The standardisation is folded into the returned
``nn.Linear`` (W' = W / sigma, b' = b - W' mu), so the head applies to raw backbone features like
every head. Only the head goes back: an update with an empty backbone.

The server's side (one round after the last curation, heads screened like any update) is
``calibration_round`` next to ``run_stage`` in :mod:`medveil.federated.stages`.
"""

from __future__ import annotations

import torch

from medveil.data import Task
from medveil.federated.messages import ClientUpdate, FitInstructions, StateDict
from medveil.federated.rebuild import received_models
from medveil.federated.sites import ClientData
from medveil.federated.training import TrainRecipe, balanced_weights, extract_features, task_loss


def fit_linear_head(features: torch.Tensor, y: torch.Tensor, num_classes: int, task: Task | str,
                    class_weighting: str = "none", max_iter: int = 500, C: float = 1.0) -> StateDict:
    """Head {"weight": (C, D), "bias": (C,)} minimising the weighted task loss of ``features``
    (N, D) plus ||W||^2 / (2 N C) (``C``: scikit-learn's inverse L2 strength), on standardised
    features, folded back to raw features."""
    f = features.double()
    mu, sigma = f.mean(0), f.std(0, unbiased=False).clamp(min=1e-6)
    z = (f - mu) / sigma
    weight = (balanced_weights(y, num_classes, task).double() if class_weighting == "balanced" else None)
    w = torch.zeros(num_classes, f.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-7, tolerance_change=1e-10,
                            history_size=20, line_search_fn="strong_wolfe")
    n = len(z)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = task_loss(z @ w.T + b, y, task, weight) + (w * w).sum() / (2 * n * C)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        w_raw = w / sigma
        b_raw = b - w_raw @ mu
    return {"weight": w_raw.float().contiguous(), "bias": b_raw.float().contiguous()}


def local_calibrate(data: ClientData, ins: FitInstructions, recipe: TrainRecipe, seed: int,
                    device: str = "cpu") -> ClientUpdate:
    """Refit this client's head on the received (frozen) backbone; a head-only update."""
    backbone, _ = received_models(data, ins, device)  # checks the head's class count too
    feats = extract_features(backbone, data.x_train)
    head = fit_linear_head(feats, data.y_train, data.num_classes, data.task, recipe.class_weighting)
    return ClientUpdate(client_name=data.name, stage=ins.stage, backbone={}, head=head,
                        n_samples=len(data.x_train))
