"""Checkpoint loading, config checks and RNG-state capture, so a killed run resumes bit-for-bit.

Checkpoints are written with :func:`medveil.io.save_torch_atomic`: a reader sees either the
previous complete checkpoint or the new complete one, never half.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medveil.errors import ConfigError, DataError


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no checkpoint there")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # corrupt / truncated / not a checkpoint
        raise DataError(f"{path}: not a readable checkpoint ({type(err).__name__})") from None


def load_generator(path: str | Path, which: str = "G_ema") -> torch.nn.Module:
    """A trained generator from a run folder (its checkpoints/latest.pt) or a checkpoint file.
    which: "G_ema" (default, the one to sample from) or "G". Returned in eval mode."""
    from medveil.models.stylegan2 import GANConfig, Generator

    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "latest.pt"
    ck = load_checkpoint(path)
    if not isinstance(ck, dict) or which not in ck or "config" not in ck:
        raise DataError(f"{path}: not a MedVeil GAN checkpoint (no {which!r} / config)")
    G = Generator(GANConfig.from_dict(ck["config"]["gan"]))
    G.load_state_dict(ck[which])
    return G.eval().requires_grad_(False)


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU, and CUDA when present) RNG states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def config_mismatch(expected: dict[str, Any], found: dict[str, Any], where: str) -> None:
    """Raise a one-line ConfigError naming every differing field (nested dicts flattened)."""

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(expected), flat(found)
    diffs = [f"{k} ({b.get(k, '<missing>')!r} there, {a.get(k, '<missing>')!r} here)"
             for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diffs:
        raise ConfigError(f"{where} was made with another config: {'; '.join(diffs)}")
