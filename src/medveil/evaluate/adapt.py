"""``medveil adapt``: a new site (possibly of a modality no federation site held) takes the
universal backbone for its own task.

- ``probe``: the backbone stays frozen; a logistic-regression head (the calibration round's
  convex fit, :func:`medveil.federated.calibration.fit_linear_head`, class-balanced) is fitted on
  the train split; its L2 strength is chosen on the validation split (balanced accuracy) among
  ``PROBE_CS``. Every existing task is untouched.
- ``finetune``: backbone and a fresh head are trained on the train split with the benchmark's
  fine-tuning recipe (the run's ``[evaluation]`` + ``[local]`` recipe, or the defaults when the
  model is not in a run folder). The backbone changes, so the other tasks' heads would no longer
  fit it: the written model holds the new task only, and the summary says so.

Validation: the dataset's ``val`` split, else a seeded tenth of its train split (said in the
summary). Test metrics, when the dataset has a ``test`` split, are printed next to the same
recipe applied to the MIM-only start (``checkpoints/stage_000.pt`` of the model's run folder,
when present), which tells whether federation helped this new site.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from medveil.data import Task, load_dataset, to_tensor
from medveil.errors import ConfigError, DataError, MedVeilError
from medveil.federated.calibration import fit_linear_head
from medveil.federated.config import FederationConfig, load_config
from medveil.federated.engine import mim_only_state
from medveil.federated.rebuild import build_backbone
from medveil.federated.sites import ClientData
from medveil.federated.training import derive_seed, extract_features, new_head, predict_logits, train_classifier
from medveil.federated.universal import TaskEntry, UniversalModel, load_universal
from medveil.metrics import classification_metrics

PROBE_CS = (0.1, 1.0, 10.0)
MODES = ("probe", "finetune")
HEAD_STARTS = ("probe", "random")


@dataclass
class AdaptSplits:
    data: ClientData  # train + test (test empty when the dataset has none)
    x_val: torch.Tensor
    y_val: torch.Tensor
    val_from: str
    converted: int


def load_adapt_data(path: str | Path, name: str, img_size: int, channels: int, seed: int) -> AdaptSplits:
    """The new site's train / validation / test tensors at the model's size and channels."""
    ds = load_dataset(path)
    if list(ds.class_names) == ["unlabelled"]:
        raise DataError(f"{path}: has no labels; adapt needs a labelled train split")
    train = ds.split("train")
    if ds.task is not Task.MULTILABEL and len(np.unique(train.labels)) < 2:
        raise DataError(f"{path}: its train split has a single class ({ds.class_names[int(train.labels[0])]!r}); "
                        f"a head needs at least two")

    def tensor(split: Any, idx: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        images = split.images if idx is None else split.images[idx]
        labels = split.labels if idx is None else split.labels[idx]
        return to_tensor(images, size=img_size, channels=channels), torch.from_numpy(labels)

    if "val" in ds.splits:
        (x_tr, y_tr), (x_val, y_val), val_from = tensor(train), tensor(ds.split("val")), "its val split"
    else:
        order = np.random.default_rng(derive_seed(seed, name, "adapt-val")).permutation(len(train))
        n_val = max(1, len(train) // 10)
        (x_tr, y_tr), (x_val, y_val) = tensor(train, np.sort(order[n_val:])), tensor(train, np.sort(order[:n_val]))
        val_from = f"a seeded tenth of its train split ({n_val} images)"
    if "test" in ds.splits:
        x_te, y_te = tensor(ds.split("test"))
    else:
        x_te, y_te = x_tr[:0], y_tr[:0]
    shape = train.images.shape
    same = shape[1] == img_size and shape[2] == img_size and (shape[3] if len(shape) == 4 else 1) == channels
    converted = 0 if same else len(x_tr) + len(x_val) + len(x_te)
    data = ClientData(name=name, task=ds.task, class_names=list(ds.class_names), modality=ds.modality,
                      source=str(path), x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    return AdaptSplits(data, x_val, y_val, val_from, converted)


def run_config(model: Path) -> FederationConfig:
    """The config of the run folder the model sits in, else the defaults."""
    path = model.parent / "config.toml"
    return load_config(path, remote_clients=True) if path.is_file() else FederationConfig()


def _metrics(task: Task, y: torch.Tensor, logits: torch.Tensor) -> dict[str, float] | None:
    return classification_metrics(task.value, y.numpy(), logits.numpy()) if len(y) else None


def _probe(backbone: nn.Module, s: AdaptSplits) -> tuple[nn.Linear, dict[str, Any]]:
    d = s.data
    f_tr, f_val = extract_features(backbone, d.x_train), extract_features(backbone, s.x_val)
    best: tuple[float, float, dict[str, torch.Tensor]] | None = None
    scores = {}
    for C in PROBE_CS:
        state = fit_linear_head(f_tr, d.y_train, d.num_classes, d.task, "balanced", C=C)
        logits = f_val @ state["weight"].T + state["bias"]
        bacc = classification_metrics(d.task.value, s.y_val.numpy(), logits.numpy())["bacc"]
        scores[C] = bacc
        if best is None or bacc > best[0]:
            best = (bacc, C, state)
    assert best is not None
    head = nn.Linear(f_tr.shape[1], d.num_classes)
    head.load_state_dict(best[2])
    return head, {"probe_C": best[1], "val_bacc_by_C": scores}


def _finetune(model_cfg: dict[str, Any], state: dict[str, torch.Tensor], s: AdaptSplits,
              cfg: FederationConfig, seed: int, head_start: str) -> tuple[nn.Module, nn.Linear, dict[str, Any]]:
    d = s.data
    recipe = cfg.evaluation.finetune_recipe(cfg.local)
    backbone = build_backbone(model_cfg, state)
    info: dict[str, Any] = {"recipe": dict(recipe.__dict__), "head_start": head_start}
    if head_start == "probe":  # LP-FT: the probe's head first, so early steps do not wreck the features
        head, probe_info = _probe(backbone, s)
        info.update(probe_info)
    else:
        head = new_head(backbone.feature_dim, d.num_classes, derive_seed(seed, d.name, "head"))
    train_classifier(backbone, head, d.x_train, d.y_train, d.task, recipe, derive_seed(seed, d.name, "finetune"),
                     augment=d.augmentation(recipe.augment))
    return backbone.eval(), head, info


def _fit(mode: str, model_cfg: dict[str, Any], state: dict[str, torch.Tensor], s: AdaptSplits,
         cfg: FederationConfig, seed: int, head_start: str) -> tuple[nn.Module, nn.Linear, dict[str, Any]]:
    if mode == "probe":
        backbone = build_backbone(model_cfg, state)
        head, info = _probe(backbone, s)
        return backbone, head, info
    return _finetune(model_cfg, state, s, cfg, seed, head_start)


def adapt(model: str | Path, data: str | Path, name: str, mode: str, out: str | Path,
          overwrite: bool = False, head_start: str = "probe") -> dict[str, Any]:
    """Add task ``name`` (fitted on ``data``) to a universal model; write it to ``out``.
    ``head_start`` (finetune): "probe" (the probe's head, then backbone + head: LP-FT) or
    "random" (a fresh head)."""
    model, out = Path(model), Path(out)
    check_task_name(name)
    if mode not in MODES:
        raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if head_start not in HEAD_STARTS:
        raise ConfigError(f"--head-start must be one of {', '.join(HEAD_STARTS)}, got {head_start!r}")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out}: exists; pass --overwrite to replace it")
    universal = load_universal(model)
    if name in universal.registry:
        raise ConfigError(f"task {name!r} already in {model} (tasks: {', '.join(universal.registry)}); "
                          f"pick another --name")
    cfg = run_config(model)
    seed = derive_seed(cfg.seed, "adapt")
    mcfg = universal.cfg
    s = load_adapt_data(data, name, mcfg.img_size, mcfg.in_chans, cfg.seed)
    d = s.data
    state = universal.backbone.state_dict()
    backbone, head, info = _fit(mode, mcfg.to_dict(), state, s, cfg, seed, head_start)
    summary: dict[str, Any] = {"task": name, "mode": mode, "train": len(d.x_train), "val": len(s.x_val),
                               "val_from": s.val_from, "test": len(d.x_test), "converted": s.converted, **info,
                               "val_metrics": _metrics(d.task, s.y_val, predict_logits(backbone, head, s.x_val)),
                               "test_metrics": _metrics(d.task, d.y_test, predict_logits(backbone, head, d.x_test))}
    stage0 = model.parent / "checkpoints" / "stage_000.pt"
    if stage0.is_file() and len(d.x_test):
        b0, h0, _ = _fit(mode, mcfg.to_dict(), mim_only_state(model.parent), s, cfg, seed, head_start)
        summary["mim_only_test_metrics"] = _metrics(d.task, d.y_test, predict_logits(b0, h0, d.x_test))
        summary["mim_only_val_metrics"] = _metrics(d.task, s.y_val, predict_logits(b0, h0, s.x_val))
    entry = TaskEntry(name=name, num_classes=d.num_classes, task=d.task.value, class_names=d.class_names)
    if mode == "probe":
        new = UniversalModel(mcfg, universal.backbone, {**universal.heads, name: head},
                             {**universal.registry, name: entry})
        summary["dropped_tasks"] = []
    else:
        new = UniversalModel(mcfg, backbone, {name: head}, {name: entry})
        summary["dropped_tasks"] = list(universal.registry)
    new.save(out)
    summary["out"] = str(out)
    return summary


def format_summary(s: dict[str, Any]) -> str:
    """The lines ``medveil adapt`` prints."""
    def fmt(m: dict[str, float] | None) -> str:
        return "-" if m is None else f"acc {m['acc']:.3f}  bacc {m['bacc']:.3f}  auc {m.get('auc') or float('nan'):.3f}"

    lines = [f"adapt {s['task']!r} ({s['mode']}): {s['train']} train, {s['val']} validation ({s['val_from']}), "
             f"{s['test']} test images"]
    if s.get("head_start") == "probe":
        lines.append(f"  finetune from the probe's head (LP-FT; its C = {s['probe_C']}, chosen on validation)")
    elif s["mode"] == "probe":
        lines.append(f"  probe L2: C = {s['probe_C']} chosen on validation balanced accuracy "
                     + ", ".join(f"C={c}: {v:.3f}" for c, v in s["val_bacc_by_C"].items()))
    lines.append(f"  validation: {fmt(s['val_metrics'])}")
    lines.append(f"  test (universal start): {fmt(s['test_metrics'])}")
    if "mim_only_test_metrics" in s:
        lines.append(f"  test (MIM-only start, same recipe): {fmt(s['mim_only_test_metrics'])}")
    if s["dropped_tasks"]:
        lines.append(f"  finetune changed the backbone: the written model holds only {s['task']!r} "
                     f"(dropped {', '.join(s['dropped_tasks'])}; --mode probe keeps them)")
    lines.append(f"  written: {s['out']}")
    return "\n".join(lines)


def check_task_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise MedVeilError(f"--name {name!r}: use a plain task name (letters, digits, '.', '-' or '_')")
    return name

