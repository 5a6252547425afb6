"""``medveil gan invert`` and ``medveil gan train-encoder``: real images -> W+ latents of a
trained GAN (k-SALSA step 2). Added to the ``gan`` command group by ``gan_cmd.py`` through
:func:`add_invert_parser`.

``invert`` writes into --out: ``latents.npz`` (ws float32 (N, num_ws, w_dim), plus the
split's row index, ids, labels and patient ids when known), ``reconstructions.png`` (rows of
originals over their reconstructions), and last ``metrics.json`` (PSNR / SSIM / feature
distance, seconds, what was used); a folder without metrics.json is not a finished result.
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path
from typing import Any

from medveil.errors import ConfigError, DataError

# Heavy modules (torch, torchmetrics) are imported inside the handlers: `medveil --help` stays fast.
DEFAULT_FEATURE_NET = "random-conv:seed=0"
DEFAULT_LR = 0.1


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gan", required=True, metavar="RUN_DIR", help="GAN run folder (or its checkpoint file)")
    p.add_argument("--data", required=True, metavar="PATH", help="dataset: .npz, image folder + CSV, DICOM")
    p.add_argument("--split", default="train", help="split to invert / train on (default: train)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="use only the first N images")
    p.add_argument("--feature-net", default=DEFAULT_FEATURE_NET, metavar="SPEC",
                   help="feature network of the losses: random-conv:seed=0 | conv:FILE | vit:FILE "
                        f"(default {DEFAULT_FEATURE_NET})")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _encoder_args(p: argparse.ArgumentParser, steps_flag: str) -> None:
    p.add_argument(steps_flag, dest="encoder_steps", type=int, default=1000, metavar="N",
                   help="encoder training steps (default 1000)")
    p.add_argument("--encoder-batch", type=int, default=8, help="real images per encoder step (default 8)")
    p.add_argument("--encoder-lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue an unfinished encoder run in its folder")


def add_invert_parser(gan_subparsers: Any) -> None:
    """Add ``invert`` and ``train-encoder`` to the ``medveil gan`` sub-commands."""
    p = gan_subparsers.add_parser(
        "invert", help="invert real images into the GAN's W+ space (encoder and/or optimisation)",
        description="Invert one split of a dataset into W+ latents: ReStyle encoder (--encoder, or "
                    "--train-encoder to train one first), then per-image optimisation (--optimize-steps).")
    _common(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--encoder", metavar="ENC_RUN", help="trained encoder (run folder or encoder.pt)")
    src.add_argument("--train-encoder", action="store_true", help="train an encoder first (into OUT/encoder)")
    _encoder_args(p, "--steps")
    p.add_argument("--iterations", type=int, default=5, help="encoder refinement iterations (default 5)")
    p.add_argument("--optimize-steps", type=int, default=200, metavar="N",
                   help="W+ optimisation steps per image after the encoder (0: encoder only; default 200)")
    p.add_argument("--lr", type=float, default=DEFAULT_LR, help=f"optimisation learning rate (default {DEFAULT_LR})")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.set_defaults(func=run_invert)

    t = gan_subparsers.add_parser("train-encoder", help="train a ReStyle encoder for a trained GAN",
                                  description="Train the W+ encoder on real images plus generator samples.")
    _common(t)
    _encoder_args(t, "--steps")
    t.add_argument("--out", required=True, metavar="DIR", help="encoder run folder")
    t.set_defaults(func=run_train_encoder)


def _setup(args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    import numpy as np
    import torch

    from medveil.data import load_dataset
    from medveil.generative.checkpoint import load_generator
    from medveil.generative.data import images_to_gan_tensor
    from medveil.models.features import build_feature_net

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise ConfigError("--batch-size and --limit must be >= 1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    G = load_generator(args.gan).to(device)
    ds = load_dataset(args.data)
    if args.split not in ds.splits:
        raise DataError(f"{args.data}: no split {args.split!r} (has {', '.join(ds.splits)})")
    split = ds.split(args.split)
    if args.limit is not None:
        split = split.subset(np.arange(min(args.limit, len(split))))
    x = images_to_gan_tensor(split.images, G.resolution, G.img_channels, where=f"{args.data} [{args.split}]")
    fnet = build_feature_net(args.feature_net).to(device)
    return G, x, split, fnet


def _encoder_cfg(args: argparse.Namespace) -> Any:
    from medveil.generative.encoder_training import EncoderTrainConfig

    return EncoderTrainConfig(steps=args.encoder_steps, batch=args.encoder_batch, lr=args.encoder_lr,
                              seed=args.seed, feature_net=args.feature_net)


def run_train_encoder(args: argparse.Namespace) -> int:
    from medveil.generative.encoder_training import train_encoder

    G, x, _, fnet = _setup(args)
    _, summary = train_encoder(x, G, _encoder_cfg(args), args.out, resume=args.resume, fnet=fnet,
                               progress=not args.no_progress)
    print(f"encoder written to {Path(args.out) / 'encoder.pt'} after {summary['steps']} steps")
    return 0


def run_invert(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from medveil.io import write_json_atomic
    from medveil.generative.encoder_training import load_encoder, train_encoder
    from medveil.generative.figures import save_grid
    from medveil.generative.invert import ProjectConfig, encode, project, quality, summarize

    if args.optimize_steps < 0 or args.iterations < 1:
        raise ConfigError("--optimize-steps must be >= 0 and --iterations >= 1")
    if args.optimize_steps == 0 and not (args.encoder or args.train_encoder):
        raise ConfigError("--optimize-steps 0 needs --encoder or --train-encoder")
    out = Path(args.out)
    (out / "metrics.json").unlink(missing_ok=True)  # no stale "finished" marker while we work
    G, x, split, fnet = _setup(args)
    progress = not args.no_progress
    encoder, timings = None, {}
    if args.train_encoder:
        t0 = time.perf_counter()
        encoder, _ = train_encoder(x, G, _encoder_cfg(args), out / "encoder", resume=args.resume, fnet=fnet,
                                   progress=progress)
        timings["encoder_training_s"] = time.perf_counter() - t0
    elif args.encoder:
        encoder = load_encoder(args.encoder, G)

    results: dict[str, Any] = {}
    ws = recon = None
    if encoder is not None:
        t0 = time.perf_counter()
        ws, recon = encode(x, G, encoder, args.iterations, args.batch_size)
        timings["encoder_s"] = time.perf_counter() - t0
        results["encoder"] = summarize(quality(recon, x, fnet))
    if args.optimize_steps:
        t0 = time.perf_counter()
        cfg = ProjectConfig(steps=args.optimize_steps, lr=args.lr, batch_size=args.batch_size)
        ws, recon = project(x, G, fnet, ws, cfg, progress)
        timings["optimisation_s"] = time.perf_counter() - t0
        results["encoder+optimisation" if encoder is not None else "optimisation"] = summarize(quality(recon, x, fnet))

    buf = io.BytesIO()
    np.savez_compressed(buf, ws=ws.numpy().astype(np.float32), index=np.arange(len(split)),
                        ids=np.asarray(split.ids if split.ids is not None else [], dtype=str),
                        labels=split.labels,
                        patient_ids=np.asarray(split.patient_ids if split.patient_ids is not None else [], dtype=str))
    tmp = out / "latents.npz.tmp"
    out.mkdir(parents=True, exist_ok=True)
    tmp.write_bytes(buf.getvalue())
    tmp.replace(out / "latents.npz")
    n = min(8, x.shape[0])
    save_grid(torch.cat([x[:n], recon[:n]]) * 2 - 1, out / "reconstructions.png", nrow=n, upscale_to=512)
    metrics = {"n_images": int(x.shape[0]), "data": str(args.data), "split": args.split, "gan": str(args.gan),
               "encoder": str(args.encoder or (out / "encoder" if args.train_encoder else None)),
               "iterations": args.iterations if encoder is not None else 0,
               "optimize_steps": args.optimize_steps, "lr": args.lr, "results": results, "timings": timings,
               "feature_net": fnet.describe(), "num_ws": G.num_ws, "w_dim": G.w_dim,
               "resolution": G.resolution}
    write_json_atomic(out / "metrics.json", metrics)
    final = results[list(results)[-1]]
    print(f"inverted {x.shape[0]} image(s): PSNR {final['psnr_mean']:.2f} dB, SSIM {final['ssim_mean']:.3f} "
          f"-> {out}")
    return 0
