"""Inversion half of the GAN benchmark: reconstruction quality of held-out APTOS images at 64 px.

    python benchmarks/gan_inversion.py [--quick] [--gan RUN_DIR] [--data-root ../shared/data]
                                       [--work runs/bench_gan_inversion] [--out FILE]

APTOS is cut once (seed 0, duplicate photographs kept on one side, stratified by grade) into
a private set (3000 images: GAN + encoder training) and a held-out set (662) that neither
network ever sees. Without --gan a small StyleGAN2 is trained here on the private set (its
run folder resumes when re-run). Then the ReStyle encoder is trained (also resumable), and
--n-eval held-out images are inverted three ways: encoder (5 refinements), encoder +
optimisation, optimisation alone (same step count). PSNR / SSIM (torchmetrics) and feature
distance (1 - cos of the feature-net embedding) per method, with wall-clock seconds.

Images and reconstructions stay under --work (git-ignored runs/); only numbers go into the
JSON. :func:`run_inversion_benchmark` is what ``benchmarks/gan.py`` calls.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from medveil.data import load_dataset
from medveil.data.duplicates import duplicate_groups
from medveil.data.splits import split_indices
from medveil.generative.checkpoint import load_checkpoint, load_generator
from medveil.generative.config import TrainConfig
from medveil.generative.data import images_to_gan_tensor
from medveil.generative.encoder_training import EncoderTrainConfig, train_encoder
from medveil.generative.figures import save_grid
from medveil.generative.invert import ProjectConfig, encode, project, quality, summarize
from medveil.generative.train import train_gan
from medveil.io import write_json_atomic
from medveil.models.features import build_feature_net
from medveil.models.stylegan2 import GANConfig

REPO = Path(__file__).resolve().parents[1]
HELD_OUT = 662  # the k-SALSA protocol: 3000 private / 662 test of APTOS' 3662
# Small enough for CPU training: channels 128 (4, 8 px), 64 (16), 32 (32), 16 (64).
BENCH_GAN = GANConfig(resolution=64, channel_base=1024, channel_max=128)


def aptos_split(data_root: Path, resolution: int = 64, seed: int = 0) -> dict[str, Any]:
    """Private / held-out APTOS tensors (N, 3, R, R) in [0, 1] and their row indices."""
    ds = load_dataset(data_root / "aptos2019")
    split = ds.split("train")
    images = split.images  # uint8 (3662, 224, 224, 3), decoded once
    groups = duplicate_groups(images)
    parts = split_indices(split.labels, val=0.0, test=HELD_OUT / len(split), groups=groups, seed=seed)
    x = images_to_gan_tensor(images, resolution, 3, where="aptos2019")
    return {"private": x[parts["train"]], "held_out": x[parts["test"]],
            "private_idx": parts["train"], "held_out_idx": parts["test"]}


def _timed(fn: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run_inversion_benchmark(data_root: Path, work: Path, *, gan: Path | None = None, quick: bool = False,
                            gan_steps: int = 3000, encoder_steps: int = 300, opt_steps: int = 200,
                            n_eval: int = 32, feature_net: str = "random-conv:seed=0",
                            lr: float = 0.1) -> dict[str, Any]:
    if quick:
        gan_steps, encoder_steps, opt_steps, n_eval = min(gan_steps, 300), min(encoder_steps, 60), \
            min(opt_steps, 50), min(n_eval, 16)
    data = aptos_split(data_root)
    private, held_out = data["private"], data["held_out"]
    timings: dict[str, float] = {}
    if gan is None:  # train a small generator here (resumes when re-run)
        gan = work / "gan"
        cfg = TrainConfig(gan=BENCH_GAN, steps=gan_steps, batch=16, checkpoint_every=100, sample_every=500)
        _, timings["gan_training_s"] = _timed(lambda: train_gan(private, cfg, gan, resume=True))
    G = load_generator(gan)
    gan_step = int(load_checkpoint(Path(gan) / "checkpoints" / "latest.pt" if Path(gan).is_dir() else gan)["step"])
    fnet = build_feature_net(feature_net)
    enc_cfg = EncoderTrainConfig(steps=encoder_steps, batch=8, synth_batch=4, iterations=3, lr=1e-4,
                                 feature_net=feature_net, checkpoint_every=50)
    (encoder, _), timings["encoder_training_s"] = _timed(
        lambda: train_encoder(private, G, enc_cfg, work / "encoder", resume=True, fnet=fnet))

    x = held_out[:n_eval]
    rows: dict[str, dict[str, float]] = {}
    pcfg = ProjectConfig(steps=opt_steps, lr=lr, batch_size=n_eval)
    with torch.no_grad():
        mean_recon = ((G.synthesis(G.mean_latent().expand(len(x), -1, -1)) + 1) / 2).clamp(0, 1)
    rows["average latent"] = {**summarize(quality(mean_recon, x, fnet)), "seconds": 0.0}
    (ws_e, r_e), t = _timed(lambda: encode(x, G, encoder, iterations=5, batch_size=n_eval))
    rows["encoder (5 it.)"] = {**summarize(quality(r_e, x, fnet)), "seconds": t}
    (_, r_eo), t = _timed(lambda: project(x, G, fnet, ws_e, pcfg))
    rows[f"encoder + optimisation ({opt_steps} steps)"] = {**summarize(quality(r_eo, x, fnet)),
                                                            "seconds": t + rows["encoder (5 it.)"]["seconds"]}
    (_, r_o), t = _timed(lambda: project(x, G, fnet, None, pcfg))
    rows[f"optimisation alone ({opt_steps} steps)"] = {**summarize(quality(r_o, x, fnet)), "seconds": t}
    n_show = min(8, len(x))
    save_grid(torch.cat([x[:n_show], r_e[:n_show], r_eo[:n_show], r_o[:n_show]]) * 2 - 1,
              work / "reconstructions.png", nrow=n_show, upscale_to=768)
    return {"quick": quick, "gan": str(gan), "gan_config": G.cfg.to_dict(), "gan_trained_steps": gan_step,
            "encoder_steps": encoder_steps, "opt_steps": opt_steps, "opt_lr": lr, "n_eval": len(x),
            "n_private": len(private), "n_held_out": len(held_out), "feature_net": fnet.describe(),
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "timings": timings, "methods": rows,
            "target": "encoder + optimisation PSNR >= 24 dB at 64 px",
            "grid": str(work / "reconstructions.png")}


def print_table(result: dict[str, Any]) -> None:
    print(f"held-out APTOS, {result['n_eval']} images at 64 px; GAN {result['gan_trained_steps']} steps, "
          f"encoder {result['encoder_steps']} steps; feature net {result['feature_net']['name']}")
    print(f"{'method':40s} {'PSNR dB':>8s} {'SSIM':>6s} {'feat.dist':>9s} {'seconds':>8s} {'s/image':>8s}")
    for name, r in result["methods"].items():
        print(f"{name:40s} {r['psnr_mean']:8.2f} {r['ssim_mean']:6.3f} {r['feature_distance_mean']:9.4f} "
              f"{r['seconds']:8.1f} {r['seconds'] / result['n_eval']:8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short training, 16 images, 50 steps")
    parser.add_argument("--gan", type=Path, default=None, help="trained GAN run (default: train one here)")
    parser.add_argument("--data-root", type=Path, default=Path(os.environ.get(
        "MEDVEIL_SHARED_DATA", REPO.parent / "shared" / "data")))
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench_gan_inversion")
    parser.add_argument("--gan-steps", type=int, default=3000)
    parser.add_argument("--encoder-steps", type=int, default=300)
    parser.add_argument("--opt-steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--n-eval", type=int, default=32)
    parser.add_argument("--feature-net", default="random-conv:seed=0")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gan_inversion.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.data_root / "aptos2019").is_dir():
        raise SystemExit(f"APTOS not found under {args.data_root} (set MEDVEIL_SHARED_DATA)")
    result = run_inversion_benchmark(args.data_root, args.work, gan=args.gan, quick=args.quick,
                                     gan_steps=args.gan_steps, encoder_steps=args.encoder_steps,
                                     opt_steps=args.opt_steps, n_eval=args.n_eval,
                                     feature_net=args.feature_net, lr=args.lr)
    result["command"] = " ".join([".venv/bin/python", "benchmarks/gan_inversion.py", *sys.argv[1:]])
    print_table(result)
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}; reconstructions grid (rows: real, encoder, encoder+opt, opt) {result['grid']}")


if __name__ == "__main__":
    main()
