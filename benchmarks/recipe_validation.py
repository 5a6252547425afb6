"""Evidence for the ViT training recipe, on validation splits only (the test splits are never
read): for each chosen site of a config, 1/5 of the train images it holds in the federation are
held out; the config's ViT is trained from random init on the rest with each recipe variant, and
scored on the held-out fifth. Every variant gets the same epochs, seed and data.

    python benchmarks/recipe_validation.py --sites bloodmnist,organamnist --epochs 10

Variants (``[local]`` keys; the rest of the config's [local] recipe is kept):
  plain       constant lr, no augmentation (the recipe before this study)
  aug         + per-modality augmentation (augment = "auto")
  aug_cos     + warm-up (1 epoch) and cosine decay (schedule = "cosine")
  full        + label smoothing 0.1 and stochastic depth 0.1
Prints a table (val accuracy / balanced accuracy, CPU-minutes) and writes
benchmarks/results/recipe_validation.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from medveil.federated.config import load_config
from medveil.federated.sites import ClientData, build_sites
from medveil.federated.training import derive_seed, new_head, predict_logits, seeded, train_classifier
from medveil.io import write_json_atomic
from medveil.metrics import classification_metrics
from medveil.models import VisionTransformer

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "plain": {},
    "aug": {"augment": "auto"},
    "aug_cos": {"augment": "auto", "schedule": "cosine", "warmup_epochs": 1.0},
    "full": {"augment": "auto", "schedule": "cosine", "warmup_epochs": 1.0, "label_smoothing": 0.1,
             "drop_path": 0.1},
}


def validation_split(c: ClientData, seed: int) -> ClientData:
    """The site's train images split 4:1 (seeded, stratified by nothing: a plain permutation);
    the fifth plays the test split, the real test split is dropped."""
    rng = np.random.default_rng(derive_seed(seed, c.name, "validation"))
    order = torch.from_numpy(rng.permutation(len(c.x_train)))
    n_val = len(order) // 5
    val, train = order[:n_val], order[n_val:]
    return replace(c, x_train=c.x_train[train], y_train=c.y_train[train], x_test=c.x_train[val],
                   y_test=c.y_train[val])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=REPO / "src" / "medveil" / "configs" / "medmnist6.toml")
    p.add_argument("--sites", default="bloodmnist,organamnist", help="client names of the config (comma-separated)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "recipe_validation.json")
    args = p.parse_args(argv)
    os.environ.setdefault("MEDVEIL_DATA_ROOT", str(REPO.parent / "shared" / "data"))
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    wanted = args.sites.split(",")
    clients, _ = build_sites([c for c in cfg.clients if c.name in wanted], cfg.data, cfg.model.img_size,
                             cfg.model.in_chans, cfg.seed)
    results: dict[str, dict[str, dict]] = {}
    t0 = time.time()
    for c in clients:
        data = validation_split(c, cfg.seed)
        for variant in args.variants.split(","):
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
    variants = args.variants.split(",")
    lines = [f"validation (1/5 of each site's train images), ViT of {args.config.name} from random init, "
             f"{args.epochs} epochs; val acc / bacc",
             f"{'site':<12}" + "".join(f"{v:>16}" for v in variants)]
    for name, per in results.items():
        lines.append(f"{name:<12}" + "".join(f"{per[v]['acc']:.3f} / {per[v]['bacc']:.3f}".rjust(16) for v in variants))
    text = "\n".join(lines)
    print(text)
    write_json_atomic(args.out, {"config": str(args.config), "epochs": args.epochs, "variants": VARIANTS,
                                 "threads": args.threads, "machine": platform.platform(),
                                 "command": " ".join(sys.argv), "elapsed_s": time.time() - t0,
                                 "results": results, "table": text})
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
