"""Classification metrics for every task type (a leaf: the federated engine, evaluation and the
benchmarks all use it): accuracy, balanced accuracy, macro AUC and, for
ordinal grades (e.g. diabetic retinopathy 0-4), quadratic-weighted kappa. All from scikit-learn.

Conventions:
- multi-class / binary / ordinal: ``y_true`` (N,) int, ``logits`` (N, C); predictions are the arg-max.
- multi-label: ``y_true`` (N, C) in {0, 1}, ``logits`` (N, C); a label is predicted when its
  sigmoid > 0.5; accuracy and balanced accuracy are averaged over labels.
- Macro AUC is one-vs-rest over the classes that have both positives and negatives in
  ``y_true`` (equal to sklearn's ``multi_class="ovr", average="macro"`` when every class is
  present; a class missing from a small test split would make sklearn raise). NaN when no
  class qualifies.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.special import expit, softmax
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    roc_auc_score,
)

TASK_MULTILABEL = "multi-label"
TASK_ORDINAL = "ordinal"


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(accuracy_score(y_true, y_pred))


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean per-class recall over the classes present in ``y_true``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true"
        return float(balanced_accuracy_score(y_true, y_pred))


def quadratic_kappa(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Cohen's kappa with quadratic weights (ordinal grades); NaN when undefined."""
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore")
        return float(cohen_kappa_score(y_true, y_pred, weights="quadratic"))


def macro_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """One-vs-rest macro AUC. ``y_true``: (N,) class indices or (N, C) binary indicators;
    ``scores``: (N, C) class scores (probabilities or logits; AUC only needs their order)."""
    scores = np.asarray(scores, dtype=np.float64)
    y_true = np.asarray(y_true)
    if y_true.ndim == 1:
        y_true = np.eye(scores.shape[1], dtype=np.int64)[y_true]
    aucs = [
        roc_auc_score(y_true[:, c], scores[:, c])
        for c in range(scores.shape[1])
        if 0 < y_true[:, c].sum() < len(y_true)
    ]
    return float(np.mean(aucs)) if aucs else float("nan")


def classification_metrics(task: str, y_true: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """All metrics of one prediction set: ``acc``, ``bacc``, ``auc`` (+ ``qwk`` for ordinal tasks).

    ``task`` is a :class:`medveil.data.Task` value ("multi-class", "binary", "ordinal", "multi-label").
    """
    y_true = np.asarray(y_true)
    logits = np.asarray(logits, dtype=np.float64)
    task = getattr(task, "value", task)
    if task == TASK_MULTILABEL:
        probs = expit(logits)
        pred = (probs > 0.5).astype(np.int64)
        return {
            "acc": float(np.mean([accuracy(y_true[:, c], pred[:, c]) for c in range(y_true.shape[1])])),
            "bacc": float(np.mean([balanced_accuracy(y_true[:, c], pred[:, c])
                                   for c in range(y_true.shape[1])])),
            "auc": macro_auc(y_true, probs),
            "n": int(len(y_true)),
        }
    pred = logits.argmax(axis=1)
    out = {
        "acc": accuracy(y_true, pred),
        "bacc": balanced_accuracy(y_true, pred),
        "auc": macro_auc(y_true, softmax(logits, axis=1)),
        "n": int(len(y_true)),
    }
    if task == TASK_ORDINAL:
        out["qwk"] = quadratic_kappa(y_true, pred)
    return out
