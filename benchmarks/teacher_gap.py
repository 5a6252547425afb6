"""Where a finished run's accuracy is lost, on VALIDATION splits: each site's last returned model
(the teacher the last curation distilled: that site's fine-tune of the previous universal model)
against the universal model (own head, calibrated) the curation made of them, with the small CNN
trained alone on the same site's train images beside them.

A site whose teacher is already below the site alone loses in local training (the ViT on its few
images), not in curation; a site whose teacher is above the universal model loses in curation
(the one student cannot hold every teacher). Validation splits only: safe to choose on.

    MEDVEIL_DATA_ROOT=../shared/data python benchmarks/teacher_gap.py RUN \
        --out benchmarks/results/medmnist6_shipped_run_teacher_gap.json

RUN: a finished federation folder (``config.toml``, ``model.pt``, ``checkpoints/updates.pt``:
the last stage's updates, kept for resume); the site alone trains with the seed `medveil evaluate` gives it.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medveil.evaluate.site_alone import SiteAloneRecipe, train_site_alone
from medveil.federated.config import load_config
from medveil.federated.rebuild import build_backbone, build_head
from medveil.federated.sites import build_sites
from medveil.federated.training import derive_seed, predict_logits
from medveil.federated.universal import load_universal
from medveil.io import write_json_atomic
from medveil.metrics import classification_metrics


def teacher_gap(run: Path) -> dict[str, Any]:
    """{site: {teacher, universal, alone: val metrics, stage, n_val}} for every site of ``run``."""
    cfg = load_config(run / "config.toml")
    cfg.data.eval_split = "val"
    clients, _ = build_sites(cfg.clients, cfg.data, cfg.model.img_size, cfg.model.in_chans, cfg.seed)
    updates = torch.load(run / "checkpoints" / "updates.pt", map_location="cpu", weights_only=True)
    universal = load_universal(run / "model.pt")
    out: dict[str, Any] = {}
    for c in clients:
        u = updates[c.name]
        teacher = (build_backbone(cfg.model.to_dict(), u["backbone"]),
                   build_head(u["head"], c.num_classes, f"{run}: update of {c.name!r}"))
        y = c.y_test.numpy()
        out[c.name] = {
            "stage": int(u["stage"]), "n_val": len(y), "n_train": len(c.x_train),
            "teacher": classification_metrics(c.task.value, y, predict_logits(*teacher, c.x_test).numpy()),
            "universal": classification_metrics(c.task.value, y, predict_logits(
                universal.backbone, universal.heads[c.name], c.x_test).numpy()),
            "alone": train_site_alone("small_cnn", c, SiteAloneRecipe(), derive_seed(cfg.seed, "site-alone")),  # as evaluate
        }
    return out


def table(result: dict[str, Any]) -> str:
    rows = ["val acc / bacc | teacher (last update) | universal (own head) | in curation | small CNN alone",
            "---|---|---|---|---"]
    for name, r in result.items():
        t, u, a = r["teacher"], r["universal"], r["alone"]
        rows.append(f"{name} ({r['n_val']} val) | {t['acc']:.3f} / {t['bacc']:.3f} | {u['acc']:.3f} / {u['bacc']:.3f} | "
                    f"{100 * (u['acc'] - t['acc']):+.1f} | {a['acc']:.3f} / {a['bacc']:.3f}")
    mean = {k: np.mean([r[k]["acc"] for r in result.values()]) for k in ("teacher", "universal", "alone")}
    rows.append(f"mean | {mean['teacher']:.3f} | {mean['universal']:.3f} | "
                f"{100 * (mean['universal'] - mean['teacher']):+.1f} | {mean['alone']:.3f}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if not (args.run / "checkpoints" / "updates.pt").is_file():
        print(f"teacher_gap: {args.run}: no checkpoints/updates.pt (a finished federation folder keeps its "
              f"last stage's updates there)", file=sys.stderr)
        return 2
    t = time.time()
    result = teacher_gap(args.run)
    text = table(result)
    print(text)
    if args.out:
        write_json_atomic(args.out, {"command": "python " + " ".join(["benchmarks/teacher_gap.py",
                                                                      *(argv if argv is not None else sys.argv[1:])]),
                                     "run": str(args.run), "split": "val", "recipe_alone": asdict(SiteAloneRecipe()),
                                     "elapsed_s": time.time() - t, "sites": result, "table": text})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
