"""How much training length moves a ViT at the FULL sizes of benchmarks/meduniverse.py (600 train
images per site, dim 64), against what the federation gave each site before 2026-12-04 (8 local
epochs in all: 4 stages x 2). Each model is trained alone from random init on exactly the train
images the site holds in `benchmarks/federated_validation.py`'s federations, with the shipped
[local] recipe (flips, warm-up + cosine; its epochs replaced), and scored on the dataset's own
validation split (the test split is never read). The patch ViT of the previous config (depth 4)
and the hybrid (`stem = "cnn"`, depth 2).

    python benchmarks/local_epochs.py --sites organamnist,bloodmnist --epochs 8,30

Prints a table and writes benchmarks/results/local_epochs.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from medveil.federated.config import config_from_dict
from medveil.federated.sites import build_sites
from medveil.federated.training import derive_seed, new_head, predict_logits, seeded, train_classifier
from medveil.io import write_json_atomic
from medveil.metrics import classification_metrics
from medveil.models import VisionTransformer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from federated_validation import REPO, variant_config  # noqa: E402

MODELS = {"patch": {"stem": "patch", "depth": 4}, "cnn_d2": {"stem": "cnn", "depth": 2}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", default="organamnist,bloodmnist")
    p.add_argument("--epochs", default="8,30")
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "medmnist")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "local_epochs.json")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    cfg = config_from_dict(variant_config("shipped", args.data_dir, 0), args.data_dir)
    specs = [c for c in cfg.clients if c.name in args.sites.split(",")]
    clients, _ = build_sites(specs, cfg.data, cfg.model.img_size, cfg.model.in_chans, cfg.seed)
    rows = []
    for c in clients:
        for model, over in MODELS.items():
            for epochs in (int(e) for e in args.epochs.split(",")):
                mcfg, recipe = replace(cfg.model, **over), replace(cfg.local, epochs=epochs)
                cpu = time.process_time()
                with seeded(derive_seed(cfg.seed, c.name, "init")):
                    vit = VisionTransformer(mcfg)
                head = new_head(mcfg.embed_dim, c.num_classes, derive_seed(cfg.seed, c.name, "head"))
                train_classifier(vit, head, c.x_train, c.y_train, c.task, recipe, derive_seed(cfg.seed, c.name, "fit"),
                                 augment=c.augmentation(recipe.augment))
                m = classification_metrics(c.task.value, c.y_test.numpy(), predict_logits(vit, head, c.x_test).numpy())
                rows.append({"site": c.name, "model": model, "epochs": epochs, "acc": m["acc"], "bacc": m["bacc"],
                             "cpu_min": (time.process_time() - cpu) / 60})
                r = rows[-1]
                print(f"{r['site']:<14}{model:<8}{epochs:>4} epochs  val acc {r['acc']:.3f}  bacc {r['bacc']:.3f}  "
                      f"{r['cpu_min']:.1f} CPU-min", flush=True)
    write_json_atomic(args.out, {"command": "python benchmarks/local_epochs.py " + " ".join(sys.argv[1:] if argv is None else argv),
                                 "sizes": "FULL (600 train images per site, dim 64), val split", "models": MODELS,
                                 "rows": rows})
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
