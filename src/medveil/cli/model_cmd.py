"""``medveil model ...``: inspect model checkpoints."""

from __future__ import annotations

import argparse

from medveil.errors import ConfigError

PRESETS = ("base16", "tiny")  # ViTConfig class methods


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("model", help="inspect and convert ViT / MAE checkpoints")
    sub = parser.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    check = sub.add_parser(
        "load-check",
        help="load a MAE / MedMAE / timm / medveil checkpoint into our ViT and report what fitted",
    )
    check.add_argument("checkpoint", help="a .pth / .pt / .safetensors file, or a transformers folder "
                       "(config.json + model.safetensors / pytorch_model.bin)")
    check.add_argument("--preset", choices=sorted(PRESETS),
                       help="model shape (default: the config stored in a medveil checkpoint, else base16)")
    check.add_argument("--img-size", type=int, help="input size in pixels (pos-embed grid is resized)")
    check.add_argument("--in-chans", type=int, choices=(1, 3), help="input channels (default: preset's)")
    check.set_defaults(func=run_load_check)


def run_load_check(args: argparse.Namespace) -> int:
    import torch

    from medveil.models.checkpoint import load_vit_checkpoint, read_checkpoint
    from medveil.models.mae import DECODER_PREFIXES, MaskedAutoencoderViT
    from medveil.models.vit import ViTConfig, VisionTransformer

    sd, stored = read_checkpoint(args.checkpoint)
    if args.preset:
        cfg = getattr(ViTConfig, args.preset)(**({"img_size": args.img_size} if args.img_size else {}))
    elif stored is not None:
        cfg = ViTConfig.from_dict(stored)
    else:
        cfg = ViTConfig.base16()
    if args.img_size:
        cfg.img_size = args.img_size
    if args.in_chans:
        cfg.in_chans = args.in_chans
    if cfg.img_size % cfg.patch_size:
        raise ConfigError(f"--img-size {cfg.img_size} is not a multiple of the patch size {cfg.patch_size}")
    has_decoder = any(k.startswith(DECODER_PREFIXES) for k in sd)
    del sd
    # the encoder is what the rest of medveil uses; the decoder is checked too when present
    model = VisionTransformer(cfg).eval()
    report = load_vit_checkpoint(args.checkpoint, model)
    print(f"model: ViT img {cfg.img_size} patch {cfg.patch_size} chans {cfg.in_chans} "
          f"dim {cfg.embed_dim} depth {cfg.depth} heads {cfg.num_heads}")
    print(report.summary())
    if has_decoder:
        mae_report = load_vit_checkpoint(args.checkpoint, MaskedAutoencoderViT(cfg))
        print(f"MAE decoder: loaded {len(mae_report.loaded)} tensors with the encoder "
              f"({len(mae_report.missing)} left at init)")
    with torch.no_grad():
        feats = model.forward_features(torch.rand(2, cfg.in_chans, cfg.img_size, cfg.img_size))
    print(f"features on a random batch: shape {tuple(feats.shape)}, finite {bool(torch.isfinite(feats).all())}")
    return 0
