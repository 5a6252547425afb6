"""How should a site refit its head under DP? The evidence for [privacy] calibration_epochs,
calibration_dims and calibration_lr, on validation splits only.

One DP federation (the shipped recipe at meduniverse.py's FULL sizes, epsilon 8, seed 0, val as
the eval split, no calibration round: benchmarks/privacy.py's job) is run once and kept; then each
site's head is refit on its final universal backbone in several ways and scored on its val
split. DP-SGD refits run 20 epochs (also 10 and 40 in the pool's 64 axes) at the stages'
sampling rate, with the noise the site would plan for its three stages plus this refit (the
stages themselves ran without one: their noise is a few percent lower than in a run that plans
the refit), from a fresh head, for three AdamW rates, in these coordinates of the features:

    raw             the backbone's features as they are
    pool std        standardised by the server pool's mean and spread (public)
    private std     standardised by the site's own train images (not allowed under DP: a bound)
    pool PCA k      the pool's top-k principal axes, whitened (medveil.federated.feature_basis)

beside the heads the universal model came with ("received") and the exact, non-private refit of
the calibration round without DP ("exact": what the backbone allows).

    python benchmarks/dp_head_refit.py   # the run is kept in runs/bench/ (made when absent, ~11 min)

Writes benchmarks/results/dp_head_refit_validation.json and prints the table (mean val accuracy /
balanced accuracy over the six sites).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from medveil.federated.calibration import fit_linear_head
from medveil.federated.config import load_config
from medveil.federated.dp_training import dp_fit_head, dp_plan, dp_recipe
from medveil.federated.feature_basis import feature_basis, to_basis
from medveil.federated.privacy import plan_noise
from medveil.federated.sites import build_sites
from medveil.federated.training import extract_features, new_head
from medveil.federated.universal import load_universal
from medveil.io import write_json_atomic
from medveil.metrics import classification_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from meduniverse import FULL, REPO  # noqa: E402
from privacy import kept_run, study_args  # noqa: E402

EPOCHS = 20
OTHER_EPOCHS = (10, 40)
RATES = (0.02, 0.04, 0.08)  # AdamW rates of the refit ([privacy] calibration_lr)
AXES = (32, 64, 96, 0)      # pool PCA dims; 0: all of them


def score(head: nn.Module, f: torch.Tensor, y: torch.Tensor, task: str) -> tuple[float, float]:
    with torch.no_grad():
        m = classification_metrics(task, y.numpy(), head(f).numpy())
    return m["acc"], m["bacc"]


def refits(run: Path) -> dict[str, dict[str, tuple[float, float]]]:
    cfg = load_config(run / "config.toml")
    clients, pool = build_sites(cfg.clients, cfg.data, cfg.model.img_size, cfg.model.in_chans, cfg.seed)
    universal = load_universal(run / "model.pt")
    fpool = extract_features(universal.backbone, pool)
    dims = fpool.shape[1]
    bases = {f"pool PCA {k or dims}": feature_basis(fpool, k or dims) for k in AXES}
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for d in clients:
        task = d.task.value
        ftr, fva = extract_features(universal.backbone, d.x_train), extract_features(universal.backbone, d.x_test)
        exact = nn.Linear(dims, d.num_classes)
        exact.load_state_dict(fit_linear_head(ftr, d.y_train, d.num_classes, d.task))
        row = {"received": score(universal.heads[d.name], fva, d.y_test, task),
               "exact": score(exact, fva, d.y_test, task)}
        coords = {"raw": {}, "pool std": {"mean": fpool.mean(0), "basis": torch.diag(1 / fpool.std(0).clamp(min=1e-3))},
                  "private std": {"mean": ftr.mean(0), "basis": torch.diag(1 / ftr.std(0).clamp(min=1e-3))}, **bases}
        for epochs in (EPOCHS, *OTHER_EPOCHS):  # other refit lengths: in the chosen coordinates only
            opts = replace(cfg.privacy, calibration_epochs=epochs)
            q, steps = dp_plan(len(ftr), dp_recipe(cfg.local, opts))
            refit_steps = dp_plan(len(ftr), replace(dp_recipe(cfg.local, opts), epochs=epochs))[1]
            sigma = plan_noise(opts, q, steps, cfg.federation.rounds, opts.site_delta(len(ftr)), refit_steps)
            for name, basis in coords.items() if epochs == EPOCHS else [("pool PCA 64", bases["pool PCA 64"])]:
                ztr, zva = to_basis(ftr, basis), to_basis(fva, basis)
                for lr in RATES:
                    head = new_head(ztr.shape[1], d.num_classes, 0)
                    dp_fit_head(head, ztr, d.y_train, d.task, cfg.local, replace(opts, calibration_lr=lr), sigma, 123)
                    row[f"DP-SGD {epochs} ep, {name}, lr {lr:g}"] = score(head, zva, d.y_test, task)
        out[d.name] = row
        print(f"{d.name}: done", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    args = study_args(__doc__, argv)
    run = kept_run(FULL, args.data_dir, 0, 8.0, "val")
    sites = refits(run)
    keys = list(next(iter(sites.values())))
    table = {k: [float(np.mean([sites[s][k][i] for s in sites])) for i in (0, 1)] for k in keys}
    lines = [f"{'head refit (val split, epsilon 8 run, seed 0)':<50}{'acc':>7}{'bacc':>7}"]
    lines += [f"{k:<50}{a:>7.3f}{b:>7.3f}" for k, (a, b) in table.items()]
    print("\n".join(lines))
    out = REPO / "benchmarks" / "results" / "dp_head_refit_validation.json"
    write_json_atomic(out, {"run": str(run.relative_to(REPO)), "epochs": EPOCHS, "rates": RATES, "mean": table,
                            "sites": sites, "command": "python benchmarks/dp_head_refit.py", "table": "\n".join(lines)})
    print(f"written: {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
