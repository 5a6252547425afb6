"""Figures of a federated run (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from medveil.io import save_figure  # noqa: E402


def plot_stage_curves(stages: list[dict[str, Any]], path: Path, metric: str = "acc", split: str = "test") -> Path:
    """Per-client ``metric`` of the universal model after each stage (forgetting curves), on the
    held-out ``split`` the sites score on ([data] eval_split)."""
    save_figure(stage_curves_figure(stages, metric, split), path, dpi=120)
    return path


def stage_curves_figure(stages: list[dict[str, Any]], metric: str = "acc", split: str = "test") -> Figure:
    """The figure of :func:`plot_stage_curves`, not saved."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for s in stages:
        for name, info in s.get("clients", {}).items():
            value = info.get("test", {}).get(metric)
            if value is not None:
                xs, ys = series.setdefault(name, ([], []))
                xs.append(int(s["stage"]))
                ys.append(float(value))
    before = {name: (int(s["stage"]), float(info["test_before_calibration"][metric]))  # calibrate_heads
              for s in stages for name, info in s.get("clients", {}).items()
              if info.get("test_before_calibration", {}).get(metric) is not None}
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, (xs, ys) in sorted(series.items()):
        (line,) = ax.plot(xs, ys, marker="o", label=name)
        if name in before:
            ax.plot(*before[name], marker="o", mfc="none", color=line.get_color(), linestyle="")
    ax.set_xlabel("stage")
    ax.set_ylabel(f"{split} {metric} (universal model + own head)")
    ax.set_title("Per-client accuracy across stages" + (" (open: before head calibration)" if before else ""))
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8, loc="best")
        ax.set_xticks(sorted({x for xs, _ in series.values() for x in xs}))
    fig.tight_layout()
    return fig
