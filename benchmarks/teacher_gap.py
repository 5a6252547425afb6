"""Where a finished run's accuracy is lost, on VALIDATION splits: each site's last returned model
(the teacher the last curation distilled: that site's fine-tune of the previous universal model)
against the universal model the curation made of them, with the small CNN trained alone on the
same site's train images beside them.

When the run calibrates its heads (``calibrate_heads``), the universal model's heads were refit
on the site's train features after the last curation; the teacher is then scored both with its
own head and with a head refit the same way on its own backbone (:func:`fit_linear_head`), so
that "teacher, refit head" against "universal" isolates what the last curation did to the
backbone. A site whose teacher is already below the site alone loses in its local training (of
this stage: the teacher starts from a universal model two curations made); a site whose teacher
is above the universal model loses in the last curation. Validation splits only: safe to choose on.

    MEDVEIL_DATA_ROOT=../shared/data python benchmarks/teacher_gap.py RUN \
        --out benchmarks/results/medmnist6_shipped_run_teacher_gap.json

RUN: a complete federation folder (``config.toml``, ``model.pt``, ``checkpoints/updates.pt``:
the last stage's updates, kept for resume); the site alone trains with the seed `medveil
evaluate` gives it. Sites without an update in the last stage (absent, rejected, not sampled)
are left out, and the output says which.
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

from medveil.errors import MedVeilError
from medveil.evaluate.probe import universal_eval
from medveil.evaluate.site_alone import SiteAloneRecipe, site_alone
from medveil.federated.calibration import fit_linear_head
from medveil.federated.config import load_config
from medveil.federated.engine import UPDATES, require_complete
from medveil.federated.rebuild import build_backbone, build_head
from medveil.federated.sites import build_sites
from medveil.federated.training import derive_seed, extract_features, predict_logits
from medveil.federated.universal import load_universal
from medveil.io import write_json_atomic
from medveil.metrics import classification_metrics

def teacher_gap(run: Path) -> dict[str, Any]:
    """{"sites": {site: {teacher, teacher_refit (calibrating runs), universal, alone: val
    metrics, stage, n_val, n_train}}, "left_out": [sites without a last update]}."""
    require_complete(run)
    cfg = load_config(run / "config.toml")
    cfg.data.eval_split = "val"
    clients, _ = build_sites(cfg.clients, cfg.data, cfg.model.img_size, cfg.model.in_chans, cfg.seed)
    updates = torch.load(run / "checkpoints" / UPDATES, map_location="cpu", weights_only=True)
    left_out = [c.name for c in clients if c.name not in updates]
    clients = [c for c in clients if c.name in updates]
    model = load_universal(run / "model.pt")
    universal = universal_eval(model.backbone, model.heads, clients)
    alone = site_alone(clients, derive_seed(cfg.seed, "site-alone"), ("small_cnn",), SiteAloneRecipe())["small_cnn"]
    sites: dict[str, Any] = {}
    for c in clients:
        u, y = updates[c.name], c.y_test.numpy()
        backbone = build_backbone(cfg.model.to_dict(), u["backbone"])
        head = build_head(u["head"], c.num_classes, f"{run}: update of {c.name!r}")
        r: dict[str, Any] = {"stage": int(u["stage"]), "n_val": len(y), "n_train": len(c.x_train),
                             "teacher": classification_metrics(c.task.value, y,
                                                               predict_logits(backbone, head, c.x_test).numpy())}
        if cfg.federation.calibrate_heads:  # the universal heads' treatment, on the teacher's backbone
            refit = fit_linear_head(extract_features(backbone, c.x_train), c.y_train, c.num_classes, c.task,
                                    cfg.local.class_weighting)
            head = build_head(refit, c.num_classes, f"{run}: refit head of {c.name!r}")
            r["teacher_refit"] = classification_metrics(c.task.value, y,
                                                        predict_logits(backbone, head, c.x_test).numpy())
        sites[c.name] = {**r, "universal": universal[c.name], "alone": alone[c.name]}
    return {"sites": sites, "left_out": left_out}


def table(result: dict[str, Any]) -> str:
    sites = result["sites"]
    refit = all("teacher_refit" in r for r in sites.values())
    cols = ["teacher"] + (["teacher_refit"] if refit else []) + ["universal", "alone"]
    names = {"teacher": "teacher (last update, own head)", "teacher_refit": "teacher, refit head",
             "universal": "universal (own head)", "alone": "small CNN alone"}
    base = "teacher_refit" if refit else "teacher"
    rows = [" | ".join(["val acc / bacc", *(names[k] for k in cols[:-1]), "last curation", names["alone"]]),
            "|".join(["---"] * (len(cols) + 2))]
    for name, r in sites.items():
        cells = [f"{r[k]['acc']:.3f} / {r[k]['bacc']:.3f}" for k in cols]
        gap = f"{100 * (r['universal']['acc'] - r[base]['acc']):+.1f}"
        rows.append(" | ".join([f"{name} ({r['n_val']} val)", *cells[:-1], gap, cells[-1]]))
    mean = {k: float(np.mean([r[k]["acc"] for r in sites.values()])) for k in cols}
    rows.append(" | ".join(["mean", *(f"{mean[k]:.3f}" for k in cols[:-1]),
                            f"{100 * (mean['universal'] - mean[base]):+.1f}", f"{mean['alone']:.3f}"]))
    if result["left_out"]:
        rows.append(f"left out (no update in the last stage): {', '.join(result['left_out'])}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if not (args.run / "checkpoints" / UPDATES).is_file():
        print(f"teacher_gap: {args.run}: no checkpoints/updates.pt (a finished federation folder keeps its "
              f"last stage's updates there)", file=sys.stderr)
        return 2
    t = time.time()
    try:
        result = teacher_gap(args.run)
    except MedVeilError as err:
        print(f"teacher_gap: {err}", file=sys.stderr)
        return 2
    text = table(result)
    print(text)
    if args.out:
        command = " ".join(["python benchmarks/teacher_gap.py", *(argv if argv is not None else sys.argv[1:])])
        write_json_atomic(args.out, {"command": command, "run": str(args.run), "split": "val",
                                     "recipe_alone": asdict(SiteAloneRecipe()), "elapsed_s": time.time() - t,
                                     **result, "table": text})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
