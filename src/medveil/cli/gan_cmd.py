"""``medveil gan ...``: train a StyleGAN2 on a private split and sample from it.

``gan invert`` (the inversion encoder / projector) is added by :mod:`medveil.cli.gan_invert`
when that module is present.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
from pathlib import Path

from medveil.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("gan", help="train a StyleGAN2 generator and sample from it")
    sub = parser.add_subparsers(dest="gan_command", metavar="ACTION", required=True)

    train = sub.add_parser(
        "train", help="train (or resume) a StyleGAN2-ADA on one split of a dataset",
        description="Trains only on --split (default train). RUN_DIR receives config.toml, "
                    "metrics.jsonl, summary.json, curves.png, samples/*.png and checkpoints/.")
    train.add_argument("--data", required=True, help="dataset path (.npz or image folder + CSV)")
    train.add_argument("--split", default="train", help="split to train on (default: train)")
    train.add_argument("--resolution", type=int, help="image size, a power of two in [32, 256]")
    train.add_argument("--out", required=True, type=Path, help="run folder (RUN_DIR)")
    train.add_argument("--steps", type=int, help="total optimisation steps")
    train.add_argument("--batch", type=int, help="batch size")
    train.add_argument("--config", type=Path, help="TOML training config (CLI flags override it)")
    train.add_argument("--seed", type=int, help="random seed")
    train.add_argument("--resume", action="store_true", help="continue from RUN_DIR's checkpoint")
    train.add_argument("--holdout", help="real images for FID/KID (a dataset path; never trained on)")
    train.add_argument("--holdout-split", default="val", help="split of --holdout (default: val)")
    train.add_argument("--feature-net", default=None,
                       help="feature net for FID/KID (default random-conv:seed=0; conv:FILE, vit:FILE)")
    train.add_argument("--eval-every", type=int, help="FID/KID every N steps (0: at the end)")
    train.add_argument("--eval-images", type=int, help="generated images per FID/KID evaluation")
    train.set_defaults(func=run_train)

    sample = sub.add_parser("sample", help="write a grid of images from a trained run (EMA generator)")
    sample.add_argument("--run", required=True, type=Path, help="RUN_DIR or a checkpoint file")
    sample.add_argument("--n", type=int, default=16, help="number of images (default 16)")
    sample.add_argument("--out", required=True, type=Path, help="output PNG")
    sample.add_argument("--seed", type=int, default=0, help="latent seed (default 0)")
    sample.add_argument("--truncation", type=float, default=1.0, help="truncation psi (default 1)")
    sample.set_defaults(func=run_sample)

    if importlib.util.find_spec("medveil.cli.gan_invert") is not None:
        importlib.import_module("medveil.cli.gan_invert").add_invert_parser(sub)


def _train_config(args: argparse.Namespace):
    from medveil.generative.config import TrainConfig, load_train_config

    if args.config:
        cfg = load_train_config(args.config)
    elif args.resume and (args.out / "config.toml").is_file():
        cfg = load_train_config(args.out / "config.toml")
    else:
        cfg = TrainConfig()
    top = {k: v for k, v in {"steps": args.steps, "batch": args.batch, "seed": args.seed,
                             "eval_every": args.eval_every,
                             "eval_images": args.eval_images}.items() if v is not None}
    gan = cfg.gan
    if args.resolution is not None:
        gan = dataclasses.replace(gan, resolution=args.resolution)
    return dataclasses.replace(cfg, gan=gan, **top)


def run_train(args: argparse.Namespace) -> int:
    from medveil.generative.data import load_gan_images
    from medveil.generative.train import train_gan

    cfg = _train_config(args)
    g = cfg.gan
    if args.holdout and Path(args.holdout).resolve() == Path(args.data).resolve() \
            and args.holdout_split == args.split:
        raise ConfigError(f"--holdout {args.holdout} [{args.holdout_split}] is the training split; "
                          "FID needs real images that were not trained on")
    images = load_gan_images(args.data, args.split, g.resolution, g.img_channels)
    evaluator = None
    if args.holdout:
        from medveil.evaluate.gan_fidelity import DEFAULT_FEATURE_NET, GANFidelity

        real = load_gan_images(args.holdout, args.holdout_split, g.resolution, g.img_channels)
        evaluator = GANFidelity(real, args.feature_net or DEFAULT_FEATURE_NET,
                                n_fake=cfg.eval_images, seed=cfg.seed)
    print(f"training on {images.shape[0]} images of {args.data} [{args.split}] at "
          f"{g.resolution} px for {cfg.steps} steps (batch {cfg.batch}) -> {args.out}")
    summary = train_gan(images, cfg, args.out, resume=args.resume, evaluator=evaluator)
    last = summary.get("last_train", {})
    tp = summary.get("throughput", {})
    print(f"done: step {summary['step']}, G loss {last.get('loss_g', float('nan')):.3f}, "
          f"D loss {last.get('loss_d', float('nan')):.3f}, augment p {summary['p']:.3f}")
    if tp:
        print(f"throughput: {tp['images_per_s']:.1f} images/s, "
              f"{100 * tp['fraction_of_peak']:.1f}% of the measured fp32 matmul peak")
    ev = summary.get("last_eval") or {}
    if ev:
        print(f"FID {ev['fid']:.2f}, KID {ev['kid_mean']:.4f} +- {ev['kid_std']:.4f} "
              f"(feature net {ev.get('feature_net')}, {ev['n_fake']} fake vs {ev['n_real']} real)")
    print(f"samples: {args.out / 'samples' / 'latest.png'}; curves: {args.out / 'curves.png'}")
    return 0


def run_sample(args: argparse.Namespace) -> int:
    from medveil.evaluate.gan_fidelity import generate_images
    from medveil.generative.checkpoint import load_generator
    from medveil.generative.figures import save_grid

    if args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}")
    G = load_generator(args.run)
    images = generate_images(G, args.n, seed=args.seed, truncation_psi=args.truncation)
    path = save_grid(images * 2 - 1, args.out, upscale_to=512)
    print(f"wrote {args.n} samples ({G.resolution} px) to {path}")
    return 0
