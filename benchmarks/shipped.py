"""The sites of a shipped config exactly as `medveil federate --config CONFIG` builds them (same
seed, same splits), for the benchmarks that measure what users of that config get."""

from __future__ import annotations

import os
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from medveil.federated.config import FederationConfig, load_config
from medveil.federated.sites import ClientData, build_sites

REPO = Path(__file__).resolve().parents[1]
MEDMNIST6 = REPO / "src" / "medveil" / "configs" / "medmnist6.toml"


def shipped_raw() -> dict[str, Any]:
    """The shipped medmnist6.toml as a plain dict (every section, its [[clients]] too)."""
    return tomllib.loads(MEDMNIST6.read_text())


def setting_sizes(setting: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A benchmark setting's sizes to lay over a shipped config: its [model] sizes (image, patch,
    widths, heads, decoder) and [data] caps, not its depth or stem: the shipped architecture keeps its own."""
    return {"model": {k: v for k, v in setting["model"].items() if k not in ("depth", "stem")},
            "data": dict(setting["data"])}


def shipped_sites(config: Path, threads: int, names: list[str] | None = None, eval_split: str = ""
                  ) -> tuple[FederationConfig, list[ClientData]]:
    """(config, its clients' private splits); ``names``: only these clients; ``eval_split``: the
    split held as each client's evaluation images instead of the config's ("val" for the
    benchmarks that choose a recipe, so the test split is never read; the train images are the
    same either way). Bare dataset names resolve under ``$MEDVEIL_DATA_ROOT``, else ``../shared/data``."""
    os.environ.setdefault("MEDVEIL_DATA_ROOT", str(REPO.parent / "shared" / "data"))
    torch.set_num_threads(threads)
    cfg = load_config(config)
    specs = [c for c in cfg.clients if names is None or c.name in names]
    opts = replace(cfg.data, eval_split=eval_split) if eval_split else cfg.data
    clients, _ = build_sites(specs, opts, cfg.model.img_size, cfg.model.in_chans, cfg.seed)
    return cfg, clients
