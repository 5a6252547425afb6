"""``medveil predict``: apply one task of a universal model to images MedVeil reads.

Writes one CSV row per image: its id (file name, or the row index for a MedMNIST ``.npz``), the
predicted class name and one probability column per class (softmax; per-label sigmoid for
multi-label tasks). Images whose size or channel count differ from the model's are converted
explicitly (bilinear resize; grey <-> RGB) and counted. When the data carries labels of the same
classes, the metrics of :mod:`medveil.metrics` are returned too. The CSV is written atomically;
an existing one is replaced only with ``overwrite``.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch

from medveil.data import load_dataset, to_tensor
from medveil.data.dataset import Task
from medveil.errors import ConfigError, DataError, MedVeilError
from medveil.federated.universal import load_universal
from medveil.io import atomic_file
from medveil.metrics import classification_metrics
from medveil.progress import bar as progress_bar

BATCH = 256


def predict(model: str | Path, data: str | Path, task: str, out: str | Path, split: str = "test",
            overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Predict ``task`` for every image of ``data``'s ``split``; returns a summary (images,
    converted count, metrics when labelled)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out}: exists; pass --overwrite to replace it")
    universal = load_universal(Path(model))
    if task not in universal.registry:
        raise MedVeilError(f"no task {task!r} in {model} (tasks: {', '.join(universal.registry)})")
    entry, cfg = universal.registry[task], universal.cfg
    ds = load_dataset(data)
    if split not in ds.splits:
        if len(ds.splits) != 1:
            raise DataError(f"{data}: no split {split!r} (splits: {', '.join(ds.splits)})")
        split = next(iter(ds.splits))  # a source without splits: everything is in one
    part = ds.split(split)
    images = part.images  # (N, H, W, C) uint8
    h, w, c = images.shape[1], images.shape[2], (images.shape[3] if images.ndim == 4 else 1)
    converted = len(images) if (h, w, c) != (cfg.img_size, cfg.img_size, cfg.in_chans) else 0
    labelled = list(ds.class_names) != ["unlabelled"]
    if labelled and ds.num_classes != entry.num_classes:
        raise DataError(f"{data}: its labels have {ds.num_classes} classes, task {task!r} has "
                        f"{entry.num_classes} ({', '.join(entry.class_names)})")
    multilabel = entry.task == Task.MULTILABEL.value
    batches = [universal.predict(task, to_tensor(images[i:i + BATCH], size=cfg.img_size, channels=cfg.in_chans))
               for i in progress_bar(range(0, len(images), BATCH), desc=f"predict {task}", disable=not progress)]
    logits = torch.cat(batches) if batches else torch.zeros(0, entry.num_classes)
    p = (torch.sigmoid(logits) if multilabel else torch.softmax(logits, 1)).numpy()
    ids = [str(i) for i in (part.ids if part.ids is not None else range(len(images)))]
    names = list(entry.class_names)
    with atomic_file(out, "w") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "predicted", *[f"prob_{n}" for n in names]])
        for i, row in zip(ids, p, strict=True):
            pred = (";".join(n for n, q in zip(names, row, strict=True) if q > 0.5) if multilabel
                    else names[int(row.argmax())])
            writer.writerow([i, pred, *[f"{q:.6f}" for q in row]])
    summary: dict[str, Any] = {"images": len(images), "split": split, "converted": converted,
                               "from_shape": [h, w, c], "to_shape": [cfg.img_size, cfg.img_size, cfg.in_chans],
                               "out": str(out)}
    if labelled and len(images):
        summary["metrics"] = classification_metrics(entry.task, part.labels, logits.numpy())
    return summary
