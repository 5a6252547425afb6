"""``medveil export MODEL --out DIR``: a universal model in the layouts the rest of the
ecosystem reads, with a model card.

    DIR/model.safetensors   backbone (timm / MAE key names) + heads.<task>.{weight,bias};
                            ViT config and task registry in the safetensors metadata
    DIR/config.json         image size, channels, normalisation, patch size, depth ... and tasks
    DIR/README.md           model card: tasks and classes, data sources (names only), metrics,
                            training config and seed, privacy, intended use and limits
    DIR/transformers/       config.json + model.safetensors + preprocessor_config.json that
                            ``transformers.ViTModel.from_pretrained`` reads (backbone only;
                            written when the config allows: the linear patch stem)

The card's metrics, sources, config and seed come from the run folder the model sits in
(``metrics.json`` beside ``model.pt``); a model outside a run folder gets a card that says so.
The folder is written under a temporary name and renamed into place, so an interrupted export
never leaves a folder that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from medveil.errors import ConfigError
from medveil.federated.universal import UniversalModel, load_universal
from medveil.io import write_json_atomic, write_text_atomic
from medveil.models.hf_layout import hf_config, to_hf
from medveil.models.vit import GREY_MEAN, GREY_STD, IMAGENET_MEAN, IMAGENET_STD


def normalisation(in_chans: int) -> dict[str, Any]:
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else (GREY_MEAN, GREY_STD)
    return {"input": "pixels scaled to [0, 1]; the model subtracts mean and divides by std inside",
            "mean": list(mean), "std": list(std)}


def export_model(model: str | Path, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Write the export folder; returns {"out", "files", "transformers" (bool), "card_metrics" (bool)}."""
    model, out = Path(model), Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out}: exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: a file, not an export folder; choose another --out")
    universal = load_universal(model)
    run = _run_metrics(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        universal.save_safetensors(tmp / "model.safetensors")
        cfg = universal.cfg.to_dict()
        config = {"format": "medveil-export-1", "vit": cfg, "normalisation": normalisation(cfg["in_chans"]),
                  "tasks": {n: {"task": e.task, "class_names": e.class_names}
                            for n, e in universal.registry.items()}}
        write_json_atomic(tmp / "config.json", config)
        hf_ok = cfg.get("stem", "patch") == "patch"
        if hf_ok:
            _write_transformers(universal, tmp / "transformers")
        write_text_atomic(tmp / "README.md", model_card(universal, run, model, hf_ok))
        old = out.with_name(f".{out.name}.old-{tmp.name}") if out.exists() else None
        if old is not None:
            os.replace(out, old)  # the previous export stays whole until the new one is in place
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    return {"out": str(out), "files": files, "transformers": hf_ok, "card_metrics": run is not None}


def _write_transformers(universal: UniversalModel, folder: Path) -> None:
    from safetensors.torch import save

    cfg = universal.cfg.to_dict()
    sd = to_hf({k: v.detach().cpu() for k, v in universal.backbone.state_dict().items()}, prefix="")
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(save({k: v.contiguous() for k, v in sd.items()},
                                                    metadata={"format": "pt"}))
    write_json_atomic(folder / "config.json", hf_config(cfg))
    norm = normalisation(cfg["in_chans"])
    write_json_atomic(folder / "preprocessor_config.json", {
        "image_processor_type": "ViTImageProcessor", "do_resize": True,
        "size": {"height": cfg["img_size"], "width": cfg["img_size"]}, "resample": 2,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": norm["mean"], "image_std": norm["std"]})


def _run_metrics(model: Path) -> dict[str, Any] | None:
    path = (model if model.is_dir() else model.parent) / "metrics.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def model_card(universal: UniversalModel, run: dict[str, Any] | None, source: Path, hf_ok: bool) -> str:
    """The README.md of an export folder (Markdown)."""
    cfg = universal.cfg
    lines = ["# MedVeil universal model", "",
             f"One ViT backbone shared by {len(universal.registry)} task(s), one linear head per task, "
             "trained with MedVeil's federated MedUniverse pipeline: a server pretrains the backbone by "
             "masked image modelling on an unlabelled pool, each site fine-tunes on its own labelled "
             "images, and the server curates the sites' models into this one. No labelled image left "
             "its site.", "",
             "## Model", "",
             f"- ViT: {cfg.img_size} px, {cfg.in_chans} channel(s), patch {cfg.patch_size}, "
             f"dim {cfg.embed_dim}, depth {cfg.depth}, {cfg.num_heads} heads, stem `{cfg.stem}`, heads read `{cfg.global_pool}`",
             "- Input: pixels in [0, 1]; normalisation (mean / std in `config.json`) happens inside the model",
             "- Weights: `model.safetensors` (timm / MAE key names; heads as `heads.<task>.*`)",
             ("- `transformers/`: the backbone as a `ViTModel` (`ViTModel.from_pretrained(DIR / 'transformers')`)"
              if hf_ok else "- No `transformers/` folder: the convolutional stem has no transformers ViT equivalent"),
             "", "## Tasks", "", "| task | type | classes |", "|---|---|---|"]
    for name, e in universal.registry.items():
        lines.append(f"| {name} | {e.task} | {', '.join(e.class_names)} |")
    lines += ["", "## Data sources and metrics", ""]
    if run is None:
        lines += [f"`{source}` is not in a run folder (no `metrics.json` beside it): data sources, metrics "
                  "and the training config are unknown to this card."]
    else:
        clients = {c["name"]: c for c in run.get("config", {}).get("clients", [])}
        final = run.get("final", {})
        lines += ["Each task's test split is that site's own held-out images (never trained on).", "",
                  "| task | data source | test images | accuracy | balanced acc. | AUC |", "|---|---|---|---|---|---|"]
        for name in universal.registry:
            c, m = clients.get(name, {}), final.get(name, {})
            src = c.get("path") or (f"sample:{c['sample']}" if c.get("sample") else "added later (adapt)")
            lines.append(f"| {name} | {Path(src).name if src else '-'} | {m.get('n', '-')} | "
                         f"{_fmt(m.get('acc', '-'))} | {_fmt(m.get('bacc', '-'))} | {_fmt(m.get('auc', '-'))} |")
        conf = run.get("config", {})
        lines += ["", "## Training", "",
                  f"- Seed {conf.get('seed')}, strategy `{run.get('strategy')}`, schedule `{run.get('schedule')}`, "
                  f"{len(run.get('stages', [])) - 1} federated stage(s) after MIM pretraining",
                  "- Full config (as `metrics.json` records it):", "", "```json",
                  json.dumps({k: conf.get(k) for k in ("model", "data", "pretrain", "federation", "local",
                                                       "curation") if k in conf}, indent=1), "```"]
    privacy = (run or {}).get("config", {}).get("privacy") or {}
    spent = (run or {}).get("privacy", {})
    if privacy.get("dp"):
        dp_lines = [f"- Differential privacy (DP-SGD) at every site: target epsilon {privacy.get('target_epsilon')}, "
                    f"clipping norm {privacy.get('max_grad_norm')}, {privacy.get('accountant', 'rdp').upper()} "
                    f"accountant, trained parts: {privacy.get('trainable')}. Spent per site:", "",
                    "| site | epsilon | delta |", "|---|---|---|"]
        dp_lines += [f"| {n} | {v['epsilon']:.2f} | {v['delta']:.1e} |" for n, v in spent.items()]
        dp_lines += ["", "- Covered: the weights each site sent. Not covered: the test metrics each site reported, "
                     "its number of training images, class count and class names."]
    else:
        dp_lines = ["- No differential privacy: the weights each site sent were trained on its images without "
                    "a formal guarantee; they may reveal whether a given patient was in a site's training set."]
    lines += ["", "## Privacy", "", *dp_lines,
              "- The server never received a labelled image. Its pretraining pool is unlabelled: images it holds "
              "itself, or (in-process runs with `pool_fraction` > 0) a share of each dataset's train split held "
              "apart from the sites.", "",
              "## Intended use and limits", "",
              "- Research and evaluation of medical-imaging classifiers; not a medical device, not for diagnosis.",
              f"- Inputs must resemble the sites' images ({cfg.img_size} px after resizing); performance on other "
              "scanners, populations or modalities is unknown until measured (`medveil adapt` / `medveil predict`).",
              "- Metrics above are on each site's held-out split, from one run and one seed."]
    return "\n".join(lines) + "\n"
