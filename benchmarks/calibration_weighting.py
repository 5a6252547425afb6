"""Validation evidence for the calibration head's class weighting: on a finished run's final
backbone (default: a run of the shipped config), each site's head is refit on its train images
with balanced class weights (the shipped calibration round) and without, and scored on the
dataset's own validation split (<= 1000 images; the test splits are never read).

    python benchmarks/calibration_weighting.py RUN_DIR [--C 0.1,1,10]
Prints val acc / bacc per site and writes benchmarks/results/calibration_weighting_validation.json
(with --C: each weighting at each L2 strength C, the shipped round's being C = 1, to
calibration_c_validation.json).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from medveil.federated.calibration import fit_linear_head
from medveil.federated.sites import ClientData
from medveil.federated.training import extract_features
from medveil.federated.universal import load_universal
from medveil.io import write_json_atomic
from medveil.metrics import classification_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe_validation import with_validation  # noqa: E402
from shipped import MEDMNIST6, REPO, shipped_sites  # noqa: E402

WEIGHTINGS = ("balanced", "none")


def refit_and_score(f_train: torch.Tensor, f_val: torch.Tensor, d: ClientData, weighting: str,
                    C: float = 1.0) -> dict[str, float]:
    """A calibration head fit on ``d``'s train features (``f_train``), scored on its held-out split
    (``f_val``, ``d.y_test``): {"acc", "bacc"}."""
    head = fit_linear_head(f_train, d.y_train, d.num_classes, d.task, weighting, C=C)
    m = classification_metrics(d.task.value, d.y_test.numpy(), (f_val @ head["weight"].T + head["bias"]).numpy())
    return {"acc": m["acc"], "bacc": m["bacc"]}


def main(argv: list[str]) -> int:
    cs = [1.0]
    if "--C" in argv:
        i = argv.index("--C")
        cs = [float(c) for c in argv[i + 1].split(",")]
        argv = argv[:i] + argv[i + 2:]
    if len(argv) != 1:
        print(__doc__)
        return 2
    run = Path(argv[0])
    variants = [w if cs == [1.0] else f"{w} C={c:g}" for w in WEIGHTINGS for c in cs]
    cfg, clients = shipped_sites(MEDMNIST6, 2, eval_split="val")
    universal = load_universal(run / "model.pt")
    specs = {s.name: s for s in cfg.clients}
    results: dict[str, dict[str, dict[str, float]]] = {}
    for c in clients:
        d = with_validation(c, specs[c.name], cfg)
        f_train, f_val = extract_features(universal.backbone, d.x_train), extract_features(universal.backbone, d.x_test)
        for w in WEIGHTINGS:
            for C in cs:
                results.setdefault(c.name, {})[w if cs == [1.0] else f"{w} C={C:g}"] = refit_and_score(
                    f_train, f_val, d, w, C)
        print(c.name, {w: f"{r['acc']:.3f} / {r['bacc']:.3f}" for w, r in results[c.name].items()}, flush=True)
    means = {w: {k: float(np.mean([results[n][w][k] for n in results])) for k in ("acc", "bacc")} for w in variants}
    print("mean", means)
    name = "calibration_weighting_validation" if cs == [1.0] else "calibration_c_validation"
    out = REPO / "benchmarks" / "results" / f"{name}.json"
    write_json_atomic(out, {"command": " ".join(["python", *sys.argv]), "run": str(run), "results": results,
                            "mean": means})
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
