"""A dataset's summary, as text (``medveil data info``) and as a JSON-ready dict.

Uses only what is known without decoding images: labels, ids, patients, header shape.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medveil.data.dataset import ImageDataset, Task


def summary_dict(dataset: ImageDataset) -> dict[str, Any]:
    h, w, c = dataset.image_shape or (None, None, None)
    counts = {name: dataset.class_counts(name).tolist() for name in dataset.splits}
    out: dict[str, Any] = {
        "name": dataset.name,
        "source": str(dataset.source),
        "source_kind": dataset.source_kind,
        "modality": dataset.modality,
        "task": dataset.task.value,
        "image_size": [h, w],
        "channels": c,
        "classes": list(dataset.class_names),
        "images_per_split": {name: len(split) for name, split in dataset.splits.items()},
        "counts_per_split_and_class": counts,
    }
    patients = _patients(dataset)
    if patients is not None:
        out["patients"] = patients
    return out


def describe(dataset: ImageDataset) -> str:
    """Multi-line text: name, source, modality, task, size, channels, then a count table."""
    info = summary_dict(dataset)
    h, w = info["image_size"]
    c = info["channels"]
    lines = [
        f"name:        {dataset.name}",
        f"source:      {dataset.source}" + (f" ({dataset.source_kind})" if dataset.source_kind else ""),
        f"modality:    {dataset.modality}",
        f"task:        {dataset.task.value}, {dataset.num_classes} "
        + ("class" if dataset.num_classes == 1 else "classes"),
        f"image size:  {f'{w} x {h}' if h else 'unknown'} (W x H)",
        f"channels:    {c if c else 'unknown'}" + {1: " (grey)", 3: " (RGB)"}.get(c or 0, ""),
    ]
    if "patients" in info:
        lines.append(f"patients:    {info['patients']} distinct")
    lines.append("")
    lines.extend(_table(dataset))
    return "\n".join(lines)


def _patients(dataset: ImageDataset) -> int | None:
    ids = [s.patient_ids for s in dataset.splits.values()]
    if any(p is None for p in ids) or not ids:
        return None
    return int(len(np.unique(np.concatenate(ids))))


def _table(dataset: ImageDataset) -> list[str]:
    splits = list(dataset.splits)
    counts = np.stack([dataset.class_counts(s) for s in splits], axis=1)  # (classes, splits)
    names = [f"{k} {name}" for k, name in enumerate(dataset.class_names)]
    first = "class" if dataset.task is not Task.MULTILABEL else "class (positives)"
    width = max(len(first), len("total images"), *(len(n) for n in names))
    cols = [*splits, "total"]
    colw = max(7, *(len(s) + 1 for s in cols))
    row = lambda label, values: f"{label:<{width}}" + "".join(f"{v:>{colw}}" for v in values)
    out = [row(first, cols)]
    for name, per_split in zip(names, counts):
        out.append(row(name, [*per_split.tolist(), int(per_split.sum())]))
    sizes = [len(dataset.splits[s]) for s in splits]
    out.append(row("total images", [*sizes, sum(sizes)]))
    return out
