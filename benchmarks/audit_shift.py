"""Does a membership-inference audit find members, or a shift between the train and test splits?

`medveil audit` takes a site's held-out images as non-members. Where a dataset's test split comes
from another source than its train split, every model has a lower loss on the train distribution,
and the loss attack scores images by where they come from, not by whether the model saw them.
This control measures that part alone. Per dataset and seed: a small CNN (the site-alone recipe,
medveil.evaluate.site_alone) is trained on N train images (A, the members); the attack (the
audit's loss threshold, members matched to the non-members' classes) then scores

    members A     vs test images   what the audit measures with test non-members
    members A     vs val images    the same with val non-members
    unseen train B vs test images  N train images the model never saw: AUC 0.5 unless the splits differ
    unseen train B vs val images   the same against val: the control

    OMP_NUM_THREADS=1 python benchmarks/audit_shift.py   # six datasets of ../shared/data/medmnist, N = 600, 3 seeds

The committed results were made with one thread; another thread count trains other weights from
the same seed (CPU float sums in another order): single AUCs then move by up to 0.03.

Writes benchmarks/results/audit_shift.json and prints the table (AUC, mean over seeds).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from medveil.data import load_dataset
from medveil.data.tensors import to_tensor
from medveil.evaluate.audit import attack_metrics, example_losses, matched_members
from medveil.evaluate.site_alone import SiteAloneRecipe, fit_site_alone, predict
from medveil.federated.sites import ClientData
from medveil.federated.training import derive_seed
from medveil.io import write_json_atomic

REPO = Path(__file__).resolve().parents[1]
DATASETS = ("bloodmnist", "organamnist", "retinamnist", "breastmnist", "pneumoniamnist", "ham10000")
PAIRS = (("members", "test"), ("members", "val"), ("unseen", "test"), ("unseen", "val"))


def one(path: Path, n: int, seed: int) -> dict[str, float]:
    """AUC of the loss attack for each pair of PAIRS, one dataset, one seed."""
    ds = load_dataset(path)
    train = ds.split("train")
    rng = np.random.default_rng(derive_seed(seed, path.stem, "audit-shift"))
    order = rng.permutation(len(train))
    n = min(n, len(train) // 2)  # A and B of one size, disjoint
    sets = {"members": np.sort(order[:n]), "unseen": np.sort(order[n:2 * n])}

    def tensors(split: object, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return (to_tensor(split.images[idx], size=28, channels=3), torch.from_numpy(split.labels[idx]))

    data = {k: tensors(train, v) for k, v in sets.items()}
    for name in ("test", "val"):
        split = ds.split(name)
        data[name] = tensors(split, np.sort(rng.permutation(len(split))[:n]))
    x_a, y_a = data["members"]
    client = ClientData(name=path.stem, task=ds.task, class_names=list(ds.class_names), modality=ds.modality,
                        source=str(path), x_train=x_a, y_train=y_a, x_test=data["test"][0], y_test=data["test"][1])
    model = fit_site_alone("small_cnn", client, SiteAloneRecipe(), seed)
    loss = {k: example_losses(predict(model, x), y, ds.task) for k, (x, y) in data.items()}
    out = {}
    for inside, outside in PAIRS:
        keep = matched_members(data[inside][1].numpy(), data[outside][1].numpy(), derive_seed(seed, inside, outside))
        out[f"{inside} vs {outside}"] = attack_metrics(-loss[inside][keep], -loss[outside])["auc"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get(
        "MEDVEIL_SHARED_DATA", REPO.parent / "shared" / "data")) / "medmnist")
    p.add_argument("--n", type=int, default=600, help="members (and unseen train images, and non-members) per set")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "audit_shift.json")
    args = p.parse_args(argv)
    t0 = time.time()
    results = {d: [one(args.data_dir / f"{d}.npz", args.n, s) for s in range(args.seeds)] for d in DATASETS}
    cols = [f"{a} vs {b}" for a, b in PAIRS]
    lines = [f"loss-attack AUC (mean of {args.seeds} seeds; small CNN on {args.n} train images; chance 0.5)",
             f"{'dataset':<16}" + "".join(f"{c:>20}" for c in cols)]
    means = {d: {c: float(np.mean([r[c] for r in runs])) for c in cols} for d, runs in results.items()}
    for d, m in means.items():
        lines.append(f"{d:<16}" + "".join(f"{m[c]:>20.3f}" for c in cols))
    text = "\n".join(lines)
    print(text)
    write_json_atomic(args.out, {"command": "python " + " ".join(["benchmarks/audit_shift.py",
                                                                  *(argv if argv is not None else sys.argv[1:])]),
                                 "n": args.n, "seeds": args.seeds, "results": results, "mean": means,
                                 "elapsed_s": time.time() - t0, "table": text})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
