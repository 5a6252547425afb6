"""Tiny data and configs shared by the tests/test_federated_*.py files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medveil.federated.config import FederationConfig, config_from_dict

TINY_MODEL = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2,
              "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2}


def make_npz(path: Path, n_classes: int, n_train: int, colour: bool = False, seed: int = 0,
             size: int = 16) -> Path:
    """A MedMNIST-layout file whose class is a bright horizontal band (learnable in a few steps)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, m in (("train", n_train), ("val", max(4, n_train // 4)), ("test", max(8, n_train // 2))):
        y = np.arange(m) % n_classes
        rng.shuffle(y)
        img = rng.integers(0, 60, (m, size, size) + ((3,) if colour else ()), dtype=np.uint8)
        band = max(1, size // n_classes)
        for i, c in enumerate(y):
            img[i, c * band:(c + 1) * band] += 150
        arrays[f"{split}_images"] = img
        arrays[f"{split}_labels"] = y.reshape(-1, 1).astype(np.uint8)
    np.savez(path, **arrays)
    return path


def tiny_config(folder: Path, strategy: str = "fedavg", rounds: int = 2, **sections) -> FederationConfig:
    """Two tiny clients (3-class grey, 2-class colour), tiny ViT, one pretraining epoch."""
    a = make_npz(folder / "alpha.npz", 3, 48, seed=1)
    b = make_npz(folder / "beta.npz", 2, 40, colour=True, seed=2)
    raw = {
        "seed": 3,
        "model": dict(TINY_MODEL),
        "data": {"pool_fraction": 0.25},
        "pretrain": {"epochs": 1, "batch_size": 16},
        "federation": {"strategy": strategy, "rounds": rounds},
        "local": {"epochs": 1, "batch_size": 16, "lr": 1e-3},
        "curation": {"epochs": 1.0, "batch_size": 16},
        "evaluation": {"finetune_epochs": 1},
        "clients": [{"name": "alpha", "path": str(a)}, {"name": "beta", "path": str(b)}],
    }
    for name, values in sections.items():  # section overrides, e.g. curation={"init": "base"}
        if isinstance(values, dict):
            raw.setdefault(name, {}).update(values)
        else:
            raw[name] = values
    return config_from_dict(raw, folder)
