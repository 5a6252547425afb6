"""Throughput figures: FLOPs of a callable (torch FlopCounterMode) and the measured fp32
matmul peak of this machine, so a run can report the fraction of peak it reaches."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs (multiply-add = 2) of the matmul/conv ops ``fn`` runs, backward included.
    ``fn`` runs once under torch.random.fork_rng, so the caller's RNG stream is untouched."""
    with torch.random.fork_rng(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_peak_flops(n: int = 1024, seconds: float = 1.0) -> float:
    """Best fp32 FLOP/s of an n x n x n matmul over ~``seconds`` on the CPU (current threads)."""
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(0))
    b = torch.randn(n, n, generator=torch.Generator().manual_seed(1))
    torch.mm(a, b)  # warm-up
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        torch.mm(a, b)
        dt = time.perf_counter() - t
        best = max(best, 2.0 * n**3 / max(dt, 1e-9))
    return best


def throughput_report(images_per_s: float, flops_per_image: float, peak: float | None = None) -> dict:
    """images/s, achieved FLOP/s and its fraction of the measured matmul peak."""
    peak = peak if peak is not None else matmul_peak_flops()
    achieved = images_per_s * flops_per_image
    return {"images_per_s": images_per_s, "flops_per_image": flops_per_image,
            "achieved_flops": achieved, "matmul_peak_flops": peak,
            "fraction_of_peak": achieved / peak if peak > 0 else float("nan"),
            "threads": torch.get_num_threads()}
