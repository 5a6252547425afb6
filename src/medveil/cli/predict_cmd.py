"""``medveil predict``: a universal model's task applied to images (CSV of predictions)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict",
        help="apply one task of a universal model (a run's model.pt) to images: one CSV row per image",
        description="Writes id, predicted class and one probability per class for every image of DATA "
                    "(a MedMNIST .npz split, a folder with a CSV, DICOM files, a folder of plain images); prints the metrics when "
                    "DATA has labels of the task's classes. Images of another size or channel count "
                    "are converted (and counted).",
    )
    p.add_argument("model", type=Path, metavar="MODEL", help="a universal model (RUN/model.pt)")
    p.add_argument("data", metavar="DATA", help="images to predict: a path, or a name under the data root")
    p.add_argument("--task", required=True, help="which task (client) of the model; the error lists them")
    p.add_argument("--out", type=Path, required=True, metavar="PRED.csv")
    p.add_argument("--split", default="test", help="split of DATA (default test; a source without "
                   "splits uses all its images)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--quiet", action="store_true", help="no progress")
    p.set_defaults(func=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    from medveil.evaluate.predict import predict

    s = predict(args.model, args.data, args.task, args.out, args.split, args.overwrite, not args.quiet)
    if s["converted"]:
        print(f"medveil: warning: converted {s['converted']} images from {tuple(s['from_shape'])} "
              f"to the model's {tuple(s['to_shape'])} (H, W, C)")
    m = s.get("metrics")
    scores = "" if m is None else "; " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()
                                                    if k != "n" and isinstance(v, float))
    print(f"medveil: predicted {s['images']} images ({s['split']}) -> {s['out']}{scores}")
    return 0
