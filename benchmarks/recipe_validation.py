"""Evidence for the training recipe, on validation splits only (the test splits are never read):
for each chosen site of a config, a model is trained on exactly the train images the site holds
in the federation with each recipe variant, and scored on the dataset's own validation split
(MedMNIST ``val``, at most 1000 images). The ViT is the config's, from random init. Every variant
gets the same epochs, seed and data.

    python benchmarks/recipe_validation.py --sites bloodmnist,organamnist --epochs 10

With ``--model small_cnn`` or ``resnet18`` the site-alone CNN's recipe (medveil.evaluate.site_alone)
is chosen the same way (variants: none / flip / auto augmentation at its default epochs, and
auto at twice the epochs).

ViT variants (``[local]`` keys; the rest of the config's [local] recipe is kept):
  plain       constant lr, no augmentation (the recipe before this study)
  flip_cos    the flips the modality allows, warm-up (1 epoch) and cosine decay
  auto_cos    per-modality augmentation (crop, flips, rotation, brightness / contrast), warm-up + cosine
  full        auto_cos + label smoothing 0.1 and stochastic depth 0.1
Prints a table (val accuracy / balanced accuracy, CPU-minutes) and writes
benchmarks/results/recipe_validation.json.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from medveil.evaluate.site_alone import SiteAloneRecipe, train_site_alone
from medveil.data import load_dataset, to_tensor
from medveil.federated.sites import ClientData
from medveil.federated.training import derive_seed, new_head, predict_logits, seeded, train_classifier
from medveil.io import write_json_atomic
from medveil.metrics import classification_metrics
from medveil.models import VisionTransformer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shipped import MEDMNIST6, REPO, shipped_sites  # noqa: E402

VARIANTS = {
    "plain": {"augment": "none", "schedule": "constant", "warmup_epochs": 0.0},
    "flip_cos": {"augment": "flip", "schedule": "cosine", "warmup_epochs": 1.0},
    "auto_cos": {"augment": "auto", "schedule": "cosine", "warmup_epochs": 1.0},
    "full": {"augment": "auto", "schedule": "cosine", "warmup_epochs": 1.0, "label_smoothing": 0.1,
             "drop_path": 0.1},
}
CNN_VARIANTS = {"none": {"augment": "none"}, "flip": {"augment": "flip"}, "auto": {"augment": "auto"},
                "auto_2x": {"augment": "auto", "epochs": 2 * SiteAloneRecipe.epochs}}


def with_validation(c: ClientData, spec, cfg, cap: int = 1000) -> ClientData:
    """The site with its test images replaced by the dataset's own validation split (MedMNIST's
    ``val``; at most ``cap`` images, seeded): it trains on exactly the train images it holds in
    the federation and is scored on images it never holds. A random fifth of the train split
    would not do: OrganAMNIST's train split holds neighbouring slices of the same patients, so a
    random hold-out rewards memorising them (seen: 0.94 on such a fifth, 0.83 on the test split)."""
    val = load_dataset(spec.resolve()).split("val")
    rng = np.random.default_rng(derive_seed(cfg.seed, c.name, "validation"))
    idx = np.sort(rng.permutation(len(val))[:cap])
    return replace(c, x_test=to_tensor(val.images[idx], size=cfg.model.img_size, channels=cfg.model.in_chans),
                   y_test=torch.from_numpy(val.labels[idx]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=MEDMNIST6)
    p.add_argument("--sites", default="bloodmnist,organamnist", help="client names of the config (comma-separated)")
    p.add_argument("--model", default="vit", choices=("vit", "small_cnn", "resnet18"))
    p.add_argument("--variants", help="comma-separated (default: every variant of the model)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--stem", choices=("patch", "conv", "cnn"), help="ViT stem (default: the config's)")
    p.add_argument("--depth", type=int, help="transformer blocks (default: the config's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "recipe_validation.json")
    args = p.parse_args(argv)
    cfg, clients = shipped_sites(args.config, args.threads, args.sites.split(","), eval_split="val")
    if args.stem:
        cfg = replace(cfg, model=replace(cfg.model, stem=args.stem))
    if args.depth:
        cfg = replace(cfg, model=replace(cfg.model, depth=args.depth))
    results: dict[str, dict[str, dict]] = {}
    t0 = time.time()
    table = VARIANTS if args.model == "vit" else CNN_VARIANTS
    variants = args.variants.split(",") if args.variants else list(table)
    specs = {s.name: s for s in cfg.clients}
    for c in clients:
        data = with_validation(c, specs[c.name], cfg)
        for variant in variants:
            if args.model != "vit":
                m = train_site_alone(args.model, data, SiteAloneRecipe(**CNN_VARIANTS[variant]),
                                     derive_seed(cfg.seed, "site-alone"))
                results.setdefault(c.name, {})[variant] = m
                print(f"{c.name:<12}{variant:<9} val acc {m['acc']:.3f}  bacc {m['bacc']:.3f}  "
                      f"{m['cpu_seconds'] / 60:.1f} CPU-min", flush=True)
                continue
            recipe = replace(cfg.local, epochs=args.epochs, **VARIANTS[variant])
            cpu0 = time.process_time()
            with seeded(derive_seed(cfg.seed, c.name, "recipe-init")):
                vit = VisionTransformer(cfg.model, num_classes=0)
            head = new_head(cfg.model.embed_dim, data.num_classes, derive_seed(cfg.seed, c.name, "recipe-head"))
            train_classifier(vit, head, data.x_train, data.y_train, data.task, recipe,
                             derive_seed(cfg.seed, c.name, "recipe-fit"), augment=data.augmentation(recipe.augment))
            logits = predict_logits(vit, head, data.x_test)
            m = classification_metrics(data.task.value, data.y_test.numpy(), logits.numpy())
            m["cpu_seconds"] = time.process_time() - cpu0
            results.setdefault(c.name, {})[variant] = m
            print(f"{c.name:<12}{variant:<9} val acc {m['acc']:.3f}  bacc {m['bacc']:.3f}  "
                  f"{m['cpu_seconds'] / 60:.1f} CPU-min", flush=True)
    what = (f"ViT of {args.config.name} ({cfg.model.stem} stem, depth {cfg.model.depth}) from random init, "
            f"{args.epochs} epochs"
            if args.model == "vit"
            else f"{args.model} alone (site-alone recipe)")
    lines = [f"validation split of each dataset (<= 1000 images), {what}; val acc / bacc",
             f"{'site':<12}" + "".join(f"{v:>16}" for v in variants)]
    for name, per in results.items():
        lines.append(f"{name:<12}" + "".join(f"{per[v]['acc']:.3f} / {per[v]['bacc']:.3f}".rjust(16) for v in variants))
    text = "\n".join(lines)
    print(text)
    write_json_atomic(args.out, {"config": str(args.config), "model": args.model, "epochs": args.epochs,
                                 "stem": cfg.model.stem, "depth": cfg.model.depth,
                                 "variants": {v: table[v] for v in variants},
                                 "threads": args.threads, "machine": platform.platform(),
                                 "command": " ".join(sys.argv), "elapsed_s": time.time() - t0,
                                 "results": results, "table": text})
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
