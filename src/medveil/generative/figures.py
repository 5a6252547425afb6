"""Figures of a GAN run: image grids (PNG) and loss / FID / augmentation curves."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medveil.io import atomic_file, save_figure


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> uint8 (rows*H', cols*W', 3) grid with ``pad`` black pixels."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    n, _, h, w = x.shape
    cols = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        y0, x0 = pad + r * (h + pad), pad + c * (w + pad)
        grid[y0:y0 + h, x0:x0 + w] = x[i].permute(1, 2, 0).numpy()
    return grid


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None,
              upscale_to: int = 0) -> Path:
    """Write a PNG grid atomically. ``upscale_to``: nearest-neighbour enlarge tiles so the grid
    is at least that many pixels wide (small images stay visible)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(image_grid(images, nrow))
    if upscale_to and img.width < upscale_to:
        f = math.ceil(upscale_to / img.width)
        img = img.resize((img.width * f, img.height * f), Image.NEAREST)
    with atomic_file(path) as fh:
        img.save(fh, format="PNG")
    return path


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(metrics_path: str | Path, out_path: str | Path) -> Path | None:
    """Losses, ADA p and FID/KID over steps from metrics.jsonl -> PNG. None if no rows yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    if not train:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    s = [r["step"] for r in train]
    axes[0].plot(s, [r["loss_g"] for r in train], label="G loss")
    axes[0].plot(s, [r["loss_d"] for r in train], label="D loss")
    axes[0].set_xlabel("step")
    axes[0].legend()
    axes[0].set_title("losses (non-saturating logistic)")
    axes[1].plot(s, [r["p"] for r in train], label="augment p")
    axes[1].plot(s, [r["r_t"] for r in train], label="r_t = E[sign D(real)]")
    axes[1].set_xlabel("step")
    axes[1].legend()
    axes[1].set_title("adaptive augmentation")
    if evals:
        es = [r["step"] for r in evals]
        axes[2].plot(es, [r["fid"] for r in evals], "o-", label="FID")
        ax2 = axes[2].twinx()
        ax2.plot(es, [r["kid_mean"] * 1000 for r in evals], "s--", color="tab:red",
                 label="KID x 1e3")
        ax2.legend(loc="upper right")
        axes[2].legend(loc="upper left")
        net = evals[-1].get("feature_net", "?")
        axes[2].set_title(f"fidelity ({net.get('name', '?') if isinstance(net, dict) else net})")
    else:
        axes[2].set_title("fidelity (not evaluated)")
    axes[2].set_xlabel("step")
    fig.tight_layout()
    return save_figure(fig, out_path, dpi=90)
