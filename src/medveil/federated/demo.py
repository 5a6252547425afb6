"""``medveil demo`` (federated part): a short federation on the six shipped MedMNIST samples
with the config ``medveil/configs/demo.toml`` (under 3 minutes on 2 cores)."""

from __future__ import annotations

import time
from importlib.resources import files
from pathlib import Path
from typing import Any

from medveil.federated.config import load_config
from medveil.federated.engine import run_federation, summary_table


def demo_config_path() -> Path:
    return Path(str(files("medveil") / "configs" / "demo.toml"))


def run(out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Federate the shipped samples into ``out_dir`` (an unfinished run there is resumed, a
    finished one reused). Returns a compact, JSON-ready summary: per-client test metrics of the
    universal model (``final``), bytes per client (``bytes_total``), the run folder."""
    t0 = time.time()
    metrics = run_federation(load_config(demo_config_path()), out_dir, resume=True, progress=progress)
    if progress:
        print(summary_table(metrics))
    return {"run_dir": str(out_dir), "strategy": metrics["strategy"], "final": metrics["final"],
            "bytes_total": metrics["bytes_total"], "seconds": round(time.time() - t0, 1)}
