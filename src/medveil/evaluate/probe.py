"""Evaluation of backbones on each client's test split, one identical recipe for all:

(i)  ``universal_eval``: the universal backbone with that client's own head (no training);
(ii) ``finetune_eval``: backbone + fresh head fine-tuned on the client's train split
     (:func:`medveil.federated.training.train_classifier`, the clients' own loop), and
     ``probe_eval``: a linear probe, i.e. L2 logistic regression (scikit-learn, lbfgs) on frozen,
     standardised cls features; one-vs-rest for multi-label tasks.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch.nn as nn
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from medveil.data import Task
from medveil.errors import DataError
from medveil.federated.messages import StateDict
from medveil.federated.rebuild import build_backbone, build_head
from medveil.federated.sites import ClientData
from medveil.federated.training import (
    TrainRecipe,
    derive_seed,
    extract_features,
    new_head,
    predict_logits,
    train_classifier,
)
from medveil.metrics import classification_metrics
from medveil.models import VisionTransformer


def universal_eval(backbone: VisionTransformer, heads: dict[str, nn.Linear],
                   clients: list[ClientData]) -> dict[str, dict[str, float]]:
    """(i) Each client's test metrics with the universal backbone and its own head."""
    out = {}
    for data in clients:
        if data.name not in heads:
            raise DataError(f"{data.source}: client {data.name!r} has no head in the universal model")
        head = build_head(heads[data.name].state_dict(), data.num_classes, f"{data.source}: client {data.name!r}")
        logits = predict_logits(backbone, head, data.x_test)
        out[data.name] = classification_metrics(data.task.value, data.y_test.numpy(), logits.numpy())
    return out


def finetune_eval(model_config: dict[str, Any], backbone_state: StateDict, data: ClientData,
                  recipe: TrainRecipe, seed: int) -> dict[str, float]:
    """(ii-a) Fine-tune backbone + a fresh head on the train split; metrics on the test split."""
    backbone = build_backbone(model_config, backbone_state)
    head = new_head(backbone.feature_dim, data.num_classes, derive_seed(seed, data.name, "head"))
    train_classifier(backbone, head, data.x_train, data.y_train, data.task, recipe,
                     derive_seed(seed, data.name, "finetune"), augment=data.augmentation(recipe.augment))
    logits = predict_logits(backbone, head, data.x_test)
    return classification_metrics(data.task.value, data.y_test.numpy(), logits.numpy())


def probe_eval(backbone: VisionTransformer, data: ClientData, C: float = 1.0,
               max_iter: int = 1000) -> dict[str, float]:
    """(ii-b) Linear probe on frozen features; metrics on the test split."""
    f_train = extract_features(backbone, data.x_train).numpy()
    f_test = extract_features(backbone, data.x_test).numpy()
    y_train = data.y_train.numpy()
    if data.task is not Task.MULTILABEL and len(np.unique(y_train)) < 2:
        raise DataError(f"{data.source}: client {data.name!r} train split has a single class; "
                        f"a linear probe needs two")
    lr = LogisticRegression(C=C, max_iter=max_iter)
    clf = OneVsRestClassifier(lr) if data.task is Task.MULTILABEL else lr
    model = make_pipeline(StandardScaler(), clf)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(f_train, y_train)
    if data.task is Task.MULTILABEL:
        proba = np.clip(model.predict_proba(f_test), 1e-7, 1 - 1e-7)
        logits = np.log(proba) - np.log1p(-proba)
    else:
        # classes absent from the train split get -inf-like logits
        logits = np.full((len(f_test), data.num_classes), -1e9)
        logits[:, model.classes_] = np.log(np.clip(model.predict_proba(f_test), 1e-12, None))
    return classification_metrics(data.task.value, data.y_test.numpy(), logits)


def backbone_eval(model_config: dict[str, Any], backbone_state: StateDict, clients: list[ClientData],
                  recipe: TrainRecipe, seed: int, C: float = 1.0, max_iter: int = 1000,
                  finetune: bool = True) -> dict[str, dict[str, dict[str, float]]]:
    """(ii) Per client: {"probe": metrics, "finetune": metrics} for one backbone."""
    backbone = build_backbone(model_config, backbone_state)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for data in clients:
        out[data.name] = {"probe": probe_eval(backbone, data, C, max_iter)}
        if finetune:
            out[data.name]["finetune"] = finetune_eval(model_config, backbone_state, data, recipe, seed)
    return out
