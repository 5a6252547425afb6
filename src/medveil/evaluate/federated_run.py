"""``medveil evaluate RUN_DIR``: evaluate a finished federated run on every client's test split.

For each dataset of the run: (i) the universal model with its own head; (ii) the final backbone
fine-tuned and linearly probed with the run's ``[evaluation]`` recipe, next to the MIM-only
stage-0 backbone (the paper's baseline) under the identical recipe; (iii) what each site
reaches alone: a small CNN (and, on request, a ResNet-18) trained from scratch on exactly its
own train images (:mod:`.site_alone`), with their CPU cost, and the published MedMNIST v2 ResNet-18 figure where
there is one. Clients' data are rebuilt from the run's ``config.toml`` (same seed, same splits).
Writes ``RUN_DIR/evaluation.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


from medveil.errors import MedVeilError
from medveil.evaluate.probe import backbone_eval, universal_eval
from medveil.evaluate.site_alone import PUBLISHED_NOTE, published_row, site_alone
from medveil.federated.config import load_config
from medveil.federated.engine import mim_only_state, require_complete
from medveil.io import write_json_atomic
from medveil.progress import bar as progress_bar
from medveil.federated.universal import load_universal
from medveil.federated.sites import build_sites
from medveil.federated.training import derive_seed
from medveil.models.cnn import CNN_ARCHS


def evaluate_run(run_dir: str | Path, finetune: bool = True, progress: bool = True,
                 site_alone_archs: tuple[str, ...] = ("small_cnn",)) -> dict[str, Any]:
    out = Path(run_dir)
    unknown = [a for a in site_alone_archs if a not in CNN_ARCHS]
    if unknown:
        raise MedVeilError(f"--site-alone: unknown CNN {unknown[0]!r} (choose from {', '.join(CNN_ARCHS)} or none)")
    require_complete(out)
    cfg = load_config(out / "config.toml")
    universal = load_universal(out / "model.pt")
    clients, _ = build_sites(cfg.clients, cfg.data, cfg.model.img_size, cfg.model.in_chans, cfg.seed)
    mim_state = mim_only_state(out)
    ev = cfg.evaluation
    recipe = ev.finetune_recipe(cfg.local)
    seed = derive_seed(cfg.seed, "evaluate")
    result: dict[str, Any] = {"run": str(out), "eval_split": cfg.data.eval_split,
                              "recipe": {**recipe.__dict__, "probe_C": ev.probe_C}}
    steps = [("universal", None), ("final", universal.backbone.state_dict()), ("mim_only", mim_state)]
    for name, state in progress_bar(steps, desc="evaluate", disable=not progress):
        if state is None:
            result[name] = universal_eval(universal.backbone, universal.heads, clients)
        else:
            result[name] = backbone_eval(cfg.model.to_dict(), state, clients, recipe, seed,
                                         ev.probe_C, ev.probe_max_iter, finetune)
    if site_alone_archs:
        result["site_alone"] = site_alone(clients, derive_seed(cfg.seed, "site-alone"), site_alone_archs)
    # published figures are test accuracies: beside a run scored on another split they would mislead
    result["published"] = ({c.name: published_row(c) for c in clients} if cfg.data.eval_split == "test" else {})
    metrics_path = out / "metrics.json"
    spent = json.loads(metrics_path.read_text()).get("privacy") if metrics_path.is_file() else None
    if spent:
        result["privacy"] = spent  # per site: the (epsilon, delta) its ledger reported
    write_json_atomic(out / "evaluation.json", result)
    return result


def format_table(result: dict[str, Any]) -> str:
    """Plain-text table: one row per dataset, accuracy / AUC of every evaluation, then what each
    site reaches alone (accuracy, balanced accuracy, CPU-minutes) and the published figure."""
    cols = [("universal", None, "universal")]
    for kind in ("probe", "finetune"):
        cols += [(src, kind, f"{src} {kind}") for src in ("final", "mim_only")]
    names = list(result["universal"])
    header = f"{'dataset':<16}" + "".join(f"{label:>22}" for *_, label in cols)
    lines = [header, "-" * len(header)]
    for n in names:
        cells = []
        for src, kind, _ in cols:
            m = result[src][n] if kind is None else result[src][n].get(kind)
            cells.append("-" if m is None else f"acc {m['acc']:.3f} auc {_f(m.get('auc'))}")
        lines.append(f"{n:<16}" + "".join(f"{c:>22}" for c in cells))
    alone = {k: v for k, v in result.get("site_alone", {}).items() if k != "recipe"}
    if alone or result.get("published"):
        lines += ["", "each site alone, on exactly its own train images (acc / bacc / CPU-min); "
                  f"published: {PUBLISHED_NOTE}",
                  f"{'dataset':<16}" + "".join(f"{arch:>26}" for arch in alone) + f"{'published':>12}"]
        for n in names:
            cells = [f"{m[n]['acc']:.3f} / {m[n]['bacc']:.3f} / {m[n]['cpu_seconds'] / 60:.1f}"
                     for m in alone.values()]
            pub = result.get("published", {}).get(n)
            lines.append(f"{n:<16}" + "".join(f"{c:>26}" for c in cells) + f"{_f(pub):>12}")
    for n, p in result.get("privacy", {}).items():
        lines.append(f"{n}: trained under differential privacy, epsilon {p['epsilon']:.2f} at delta {p['delta']:.1e}")
    return "\n".join(lines)


def _f(v: float | None) -> str:
    return "  - " if v is None or v != v else f"{v:.3f}"
