"""``medveil export``: a universal model as safetensors + config + model card (+ transformers)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a universal model as DIR/model.safetensors, config.json, README.md (model card) "
             "and DIR/transformers/ (a ViTModel folder)",
        description="The weights keep timm / MAE key names (heads as heads.<task>.*); the card takes "
                    "tasks, data sources, metrics and config from the run folder MODEL sits in. "
                    "`medveil predict DIR ...` and `medveil model load-check DIR/model.safetensors` read "
                    "the result back.",
    )
    p.add_argument("model", type=Path, metavar="MODEL", help="a universal model (RUN/model.pt)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DIR")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from medveil.federated.export import export_model

    s = export_model(args.model, args.out, args.overwrite)
    print(f"medveil: exported {args.model} -> {s['out']}: {', '.join(s['files'])}")
    if not s["transformers"]:
        print("medveil: no transformers/ folder: the model's convolutional stem has no transformers equivalent")
    if not s["card_metrics"]:
        print("medveil: warning: no metrics.json beside the model; the model card has no metrics or sources")
    return 0
