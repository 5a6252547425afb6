"""Statistics over seeds and datasets: mean +/- std, and paired tests between two methods.

Paired tests pair the same (dataset, seed) cell of two methods. We report both:
- Wilcoxon signed-rank (two-sided, ``scipy.stats.wilcoxon``; exact distribution for small n
  without ties): no normality assumption. With n pairs the smallest two-sided p is 2 / 2**n
  (8 pairs: 0.0078; 6 pairs: 0.031), so few datasets cannot reach small p values.
- Paired t-test (two-sided, ``scipy.stats.ttest_rel``).
All-zero differences give p = 1 (no evidence of a difference); fewer than two pairs give NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value), ignoring NaN."""
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def format_mean_std(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    """``"81.2 ± 1.3"`` (percent by default); ``"-"`` when there is nothing to show."""
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "-"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def paired_tests(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Two-sided paired tests of ``a`` vs ``b`` (same order of (dataset, seed) cells).

    Returns n, mean_diff (a - b), wins/losses/ties of a, wilcoxon_stat, wilcoxon_p, t_stat, t_p.
    Pairs where either value is NaN/None are dropped.
    """
    if len(a) != len(b):
        raise ValueError(f"paired tests need equal lengths, got {len(a)} and {len(b)}")
    pairs = [(float(x), float(y)) for x, y in zip(a, b, strict=True)
             if x is not None and y is not None and not (math.isnan(x) or math.isnan(y))]
    x = np.asarray([p[0] for p in pairs])
    y = np.asarray([p[1] for p in pairs])
    d = x - y
    out: dict[str, float] = {
        "n": len(pairs),
        "mean_diff": float(d.mean()) if len(pairs) else float("nan"),
        "wins": int((d > 0).sum()),
        "losses": int((d < 0).sum()),
        "ties": int((d == 0).sum()),
        "wilcoxon_stat": float("nan"), "wilcoxon_p": float("nan"),
        "t_stat": float("nan"), "t_p": float("nan"),
    }
    if len(pairs) < 2:
        return out
    if np.all(d == 0):
        out.update(wilcoxon_stat=0.0, wilcoxon_p=1.0, t_stat=0.0, t_p=1.0)
        return out
    w = stats.wilcoxon(x, y, alternative="two-sided")
    out["wilcoxon_stat"], out["wilcoxon_p"] = float(w.statistic), float(w.pvalue)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = stats.ttest_rel(x, y)
    out["t_stat"], out["t_p"] = float(t.statistic), float(t.pvalue)
    return out
