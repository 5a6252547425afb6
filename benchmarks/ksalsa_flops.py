"""Where the speed of batched style alignment comes from: arithmetic per group and step, batched
(member targets computed once per batch) vs the reference's per-group loop (member targets
recomputed at every step), and the GFLOP/s each path reaches.

FLOPs are counted by torch.utils.flop_counter.FlopCounterMode (convolutions, matmuls and their
backward; elementwise work is not counted) on the benchmark's 64 px generator architecture
(``small64_config``) and feature net. A count does not depend on weights or pixels, so the
generator is randomly initialised and the images are noise: no trained run is needed. Groups
have exactly k members here (a real grouping has k..2k-1). The timing uses the same code paths
as ``benchmarks/ksalsa.py --speed-only`` (``align_groups`` / ``align_per_group_reference``).

    .venv/bin/python benchmarks/ksalsa_flops.py     # k = 2, 5, 10: ~4 min on 2 cores
Prints a table and writes benchmarks/results/ksalsa_flops.json.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from medveil.anonymize.alignment import (
    AlignConfig,
    align_groups,
    group_losses,
    member_targets,
)
from medveil.generative.demo import small64_config
from medveil.generative.latent_opt import frozen
from medveil.io import write_json_atomic
from medveil.models.features import build_feature_net
from medveil.models.stylegan2 import Generator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from alignment_reference import align_per_group_reference  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def counted(fn) -> tuple[float, Any]:
    """(FLOPs of calling fn, its result)."""
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return float(counter.get_total_flops()), out


def flops_per_group_step(G: torch.nn.Module, net, images: torch.Tensor, groups: list[np.ndarray],
                         w0: torch.Tensor, cfg: AlignConfig) -> dict[str, float]:
    """FLOPs of one optimisation step per group: batched (targets once per batch, so 1/steps of
    them per step) and per-group loop (targets every step)."""

    def step(targets, w) -> None:
        total, _, _, _ = group_losses(G, w, targets, net, net, cfg)
        total.sum().backward()

    with frozen(G, net):
        w = w0.clone().requires_grad_(True)
        targets_all, t = counted(lambda: member_targets(images, images, groups, net, net, cfg))
        steps_all, _ = counted(lambda: step(t, w))
        batched = (targets_all / cfg.steps + steps_all) / len(groups)
        targets_one, t1 = counted(lambda: member_targets(images, images, groups[:1], net, net, cfg))
        step_one, _ = counted(lambda: step(t1, w0[:1].clone().requires_grad_(True)))
        loop = targets_one + step_one
    return {"batched": batched, "loop": loop, "ratio": loop / batched}


def run(k: int, n_groups: int, n_ref: int, steps: int, feature_spec: str, seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    G = Generator(small64_config().gan).eval()
    net = build_feature_net(feature_spec)
    images = torch.rand(n_groups * k, 3, G.resolution, G.resolution)
    groups = [np.arange(i * k, (i + 1) * k) for i in range(n_groups)]
    w0 = G.broadcast(G.mapping(torch.randn(n_groups, G.z_dim))).detach().contiguous()
    cfg = AlignConfig(steps=steps, lr=0.03)
    fl = flops_per_group_step(G, net, images, groups, w0, cfg)
    batched = align_groups(G, w0, images, images, groups, net, cfg=cfg, batch_size=n_groups, progress=False)
    loop = align_per_group_reference(G, w0[:n_ref], images, images, groups[:n_ref], feature_spec, cfg=cfg,
                                     progress=False)
    gs_b, gs_l = n_groups / batched.seconds, n_ref / loop.seconds
    return {"k": k, "groups": n_groups, "loop_groups": n_ref, "steps": steps,
            "mflop_per_group_step": {"batched": fl["batched"] / 1e6, "loop": fl["loop"] / 1e6},
            "flop_ratio": fl["ratio"], "groups_per_s": {"batched": gs_b, "loop": gs_l}, "time_ratio": gs_b / gs_l,
            "gflop_per_s": {"batched": gs_b * steps * fl["batched"] / 1e9, "loop": gs_l * steps * fl["loop"] / 1e9}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ks", type=int, nargs="+", default=[2, 5, 10])
    p.add_argument("--groups", type=int, default=64, help="groups in the batched run (the pipeline's batch)")
    p.add_argument("--loop-groups", type=int, default=8, help="groups in the per-group loop run")
    p.add_argument("--steps", type=int, default=25, help="as the full k-SALSA benchmark")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--feature-net", default="random-conv:seed=0")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ksalsa_flops.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    print(f"{'k':>3} {'MFLOP/group-step batched':>25} {'loop':>8} {'FLOP ratio':>11} {'groups/s batched':>17} "
          f"{'loop':>6} {'time ratio':>11} {'GFLOP/s batched':>16} {'loop':>6}")
    for k in args.ks:
        r = run(k, args.groups, args.loop_groups, args.steps, args.feature_net)
        rows.append(r)
        m, g, f = r["mflop_per_group_step"], r["groups_per_s"], r["gflop_per_s"]
        print(f"{k:>3} {m['batched']:>25.0f} {m['loop']:>8.0f} {r['flop_ratio']:>10.2f}x {g['batched']:>17.2f} "
              f"{g['loop']:>6.2f} {r['time_ratio']:>10.2f}x {f['batched']:>16.1f} {f['loop']:>6.1f}", flush=True)
    write_json_atomic(args.out, {"benchmark": "ksalsa-flops", "command": " ".join(sys.argv), "rows": rows,
                                 "generator": small64_config().gan.to_dict(), "feature_net": args.feature_net,
                                 "threads": args.threads, "machine": platform.platform(), "torch": torch.__version__})
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
