"""MAE pretraining step speed: medveil's MaskedAutoencoderViT vs transformers.ViTMAEForPreTraining.

One step = zero_grad + forward (random 75% masking, loss) + backward + AdamW step, batch 64 of
32x32 grey images, ViT dim 192 / depth 6 / 3 heads / MLP 768 / patch 4, decoder 128 x 2 blocks
(4 heads, MLP 512). Both models run in the same process with the same optimizer settings and
thread count, alternating step by step after a warm-up; medians are reported.

Throughput is counted analytically (matmul FLOPs only: encoder on the visible tokens + cls,
decoder on all tokens + cls, attention QK^T and AV included, x3 for forward + backward) and
compared to the fp32 matmul peak measured in the same run (best large ``torch.mm``).

    .venv/bin/python benchmarks/vit_speed.py            # full run (~2 min on 2 cores)
    .venv/bin/python benchmarks/vit_speed.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from medveil.io import write_json_atomic
from medveil.models import MaskedAutoencoderViT, ViTConfig

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "vit_speed.json"
TARGET_RATIO = 1.3
TARGET_PEAK_FRACTION = 0.40


def bench_config() -> ViTConfig:
    return ViTConfig(img_size=32, patch_size=4, in_chans=1, embed_dim=192, depth=6, num_heads=3,
                     mlp_ratio=4.0, decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4,
                     norm_pix_loss=True)


def hf_model(cfg: ViTConfig, mask_ratio: float) -> torch.nn.Module:
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    hcfg = ViTMAEConfig(
        hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
        intermediate_size=int(cfg.embed_dim * cfg.mlp_ratio), image_size=cfg.img_size,
        patch_size=cfg.patch_size, num_channels=cfg.in_chans, decoder_hidden_size=cfg.decoder_embed_dim,
        decoder_num_hidden_layers=cfg.decoder_depth, decoder_num_attention_heads=cfg.decoder_num_heads,
        decoder_intermediate_size=int(cfg.decoder_embed_dim * cfg.mlp_ratio), mask_ratio=mask_ratio,
        norm_pix_loss=cfg.norm_pix_loss, layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="sdpa",
    )
    return ViTMAEForPreTraining(hcfg)


def mae_step_flops(cfg: ViTConfig, batch: int, mask_ratio: float) -> float:
    """Matmul FLOPs of one training step (forward x 3 for forward + backward)."""
    L = cfg.num_patches
    n_enc = 1 + int(L * (1 - mask_ratio))  # visible tokens + cls
    n_dec = 1 + L

    def blocks(n: int, d: int, depth: int) -> float:
        hidden = int(d * cfg.mlp_ratio)
        per_token = 2 * d * 3 * d + 2 * d * d + 2 * 2 * d * hidden  # qkv, proj, fc1 + fc2
        attention = 2 * 2 * n * n * d  # QK^T and AV
        return depth * (n * per_token + attention)

    patch_dim = cfg.patch_size**2 * cfg.in_chans
    fwd = (2 * L * patch_dim * cfg.embed_dim  # patch embedding (all patches, before masking)
           + blocks(n_enc, cfg.embed_dim, cfg.depth)
           + 2 * n_enc * cfg.embed_dim * cfg.decoder_embed_dim  # decoder_embed
           + blocks(n_dec, cfg.decoder_embed_dim, cfg.decoder_depth)
           + 2 * n_dec * cfg.decoder_embed_dim * patch_dim)  # decoder_pred
    return 3.0 * batch * fwd


def matmul_peak(clock=time.perf_counter, sizes=(512, 768, 1024, 1536, 2048), repeats: int = 8) -> float:
    """Best fp32 torch.mm throughput (FLOP/s) over a few square sizes."""
    best = 0.0
    for n in sizes:
        a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
        torch.mm(a, b, out=c)
        for _ in range(repeats):
            t0 = clock()
            torch.mm(a, b, out=c)
            best = max(best, 2 * n**3 / max(clock() - t0, 1e-9))
    return best


def make_steps(cfg: ViTConfig, batch: int, mask_ratio: float, lr: float, seed: int, compile_mode: str):
    torch.manual_seed(seed)
    imgs = torch.rand(batch, cfg.in_chans, cfg.img_size, cfg.img_size)
    ours = MaskedAutoencoderViT(cfg).train()
    theirs = hf_model(cfg, mask_ratio).train()
    pixel_values = ours.normalize(imgs)  # transformers expects normalised pixels; ours normalises inside
    ours_fwd, theirs_fwd = ours, theirs
    if compile_mode in ("ours", "both"):
        ours_fwd = torch.compile(ours)
    if compile_mode == "both":
        theirs_fwd = torch.compile(theirs)

    def optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.05, fused=True)

    opt_ours, opt_theirs = optimizer(ours), optimizer(theirs)

    def step_ours() -> float:
        opt_ours.zero_grad(set_to_none=True)
        loss, _, _ = ours_fwd(imgs, mask_ratio)
        loss.backward()
        opt_ours.step()
        return loss.item()

    def step_theirs() -> float:
        opt_theirs.zero_grad(set_to_none=True)
        loss = theirs_fwd(pixel_values=pixel_values).loss
        loss.backward()
        opt_theirs.step()
        return loss.item()

    n_ours = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    n_theirs = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    if n_ours != n_theirs:
        raise RuntimeError(f"models differ in size: ours {n_ours} vs transformers {n_theirs} parameters")
    return step_ours, step_theirs, n_ours


def run(args: argparse.Namespace) -> dict:
    if args.timer == "cpu":  # CPU time of this thread: robust to other processes, needs 1 thread
        args.threads = 1
    clock = time.thread_time if args.timer == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    cfg = bench_config()
    step_ours, step_theirs, n_params = make_steps(cfg, args.batch, args.mask_ratio, 1.5e-4, args.seed,
                                                  args.compile)
    peak_before = matmul_peak(clock)
    for _ in range(args.warmup):
        step_ours()
        step_theirs()
    times: dict[str, list[float]] = {"ours": [], "transformers": []}
    for rep in range(args.reps):
        order = [("ours", step_ours), ("transformers", step_theirs)]
        for name, step in order if rep % 2 == 0 else order[::-1]:  # alternate who goes first
            t0 = clock()
            loss = step()
            times[name].append(clock() - t0)
            if loss != loss:
                raise RuntimeError(f"{name}: loss is NaN")
    peak = max(peak_before, matmul_peak(clock))
    med = {k: statistics.median(v) for k, v in times.items()}
    flops = mae_step_flops(cfg, args.batch, args.mask_ratio)
    ours_flops_s = flops / med["ours"]
    result = {
        "benchmark": "vit_speed",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config": {**cfg.to_dict(), "batch": args.batch, "mask_ratio": args.mask_ratio,
                   "optimizer": "AdamW(fused=True, lr=1.5e-4, betas=(0.9, 0.95), wd=0.05), both",
                   "compile": args.compile, "threads": args.threads, "timer": args.timer, "warmup": args.warmup,
                   "reps": args.reps, "trainable_params": n_params},
        "median_step_s": med,
        "min_step_s": {k: min(v) for k, v in times.items()},
        "all_step_s": times,
        "speedup_vs_transformers": med["transformers"] / med["ours"],
        "step_gflop": flops / 1e9,
        "ours_gflop_s": ours_flops_s / 1e9,
        "transformers_gflop_s": flops / med["transformers"] / 1e9,
        "matmul_peak_gflop_s": peak / 1e9,
        "ours_peak_fraction": ours_flops_s / peak,
        "targets": {"speedup": TARGET_RATIO, "peak_fraction": TARGET_PEAK_FRACTION},
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                        "load_avg_1m": os.getloadavg()[0]},
    }
    import transformers

    result["environment"]["transformers"] = transformers.__version__
    result["targets_met"] = {"speedup": result["speedup_vs_transformers"] >= TARGET_RATIO,
                             "peak_fraction": result["ours_peak_fraction"] >= TARGET_PEAK_FRACTION}
    return result


def print_table(r: dict) -> None:
    med, mins = r["median_step_s"], r["min_step_s"]
    print(f"MAE step, batch {r['config']['batch']}, 32x32x1, ViT 192x6, decoder 128x2, "
          f"mask {r['config']['mask_ratio']}, compile={r['config']['compile']}, threads {r['config']['threads']}, "
          f"timer {r['config']['timer']}")
    print(f"{'model':<14}{'median s':>10}{'min s':>10}{'GFLOP/s':>10}")
    for name, key in (("medveil", "ours"), ("transformers", "transformers")):
        print(f"{name:<14}{med[key]:>10.4f}{mins[key]:>10.4f}{r['step_gflop'] / med[key]:>10.1f}")
    print(f"speedup (transformers / medveil): {r['speedup_vs_transformers']:.2f}x  (target >= {TARGET_RATIO})")
    print(f"step FLOPs {r['step_gflop']:.2f} GFLOP; measured fp32 mm peak {r['matmul_peak_gflop_s']:.1f} GFLOP/s; "
          f"medveil at {100 * r['ours_peak_fraction']:.1f}% of peak (target >= {100 * TARGET_PEAK_FRACTION:.0f}%)")
    print(f"1-min load average during run: {r['environment']['load_avg_1m']:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions (smoke test)")
    parser.add_argument("--reps", type=int, default=30, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", choices=("none", "both", "ours"), default="none",
                        help="torch.compile: none (default), both models, or ours only (reported as such)")
    parser.add_argument("--timer", choices=("wall", "cpu"), default="wall",
                        help="wall clock (default), or this thread's CPU time with 1 thread (robust when "
                             "other processes share the cores)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result path")
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.warmup = 4, 2
    result = run(args)
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
