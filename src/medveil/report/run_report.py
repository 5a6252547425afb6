"""``medveil report``: one self-contained HTML page for a federated run folder or a k-anonymous
release folder, for a person who would rather look than read JSON.

Federated run (``metrics.json``): per-site final metrics with the calibration effect and the
traffic, the per-stage curves, the baselines of ``medveil evaluate`` (``evaluation.json``) when
present, absent sites and rejected updates per stage, and the config.
Release (``report.json`` + ``release/``): what was released (k, images, people), an image grid,
the group-size histogram, the label counts, and the utility / fidelity / privacy table of
``medveil evaluate-release --json`` when given (or ``OUT/evaluation.json``).
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medveil.errors import DataError
from medveil.io import write_text_atomic
from medveil.report import html as H
from medveil.report.plots import plt, stage_curves_figure

GRID = 64  # release images shown


def _json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None


def build_report(folder: str | Path, out: str | Path, evaluation: str | Path | None = None,
                 overwrite: bool = False) -> str:
    """Write the page for ``folder`` to ``out``; returns the kind ("federated" or "release")."""
    folder, out = Path(folder), Path(out)
    if out.exists() and not overwrite:
        raise DataError(f"{out}: exists; pass --overwrite to replace it")
    extra = _json(Path(evaluation)) if evaluation else None
    if evaluation and extra is None:
        raise DataError(f"{evaluation}: evaluation JSON not found")
    if (folder / "metrics.json").is_file():
        kind, text = "federated", federated_page(folder, extra)
    elif (folder / "report.json").is_file() and (folder / "release").is_dir():
        kind, text = "release", release_page(folder, extra)
    else:
        raise DataError(f"{folder}: neither a federated run (metrics.json) nor a release folder "
                        f"(report.json + release/)")
    write_text_atomic(out, text)
    return kind


# ----------------------------------------------------------------------------- federated runs
def federated_page(run: Path, evaluation: dict[str, Any] | None = None) -> str:
    m = _json(run / "metrics.json") or {}
    if "stages" not in m:
        raise DataError(f"{run / 'metrics.json'}: no 'stages'; not a federated run's metrics")
    evaluation = evaluation or _json(run / "evaluation.json")
    stages = m["stages"]
    complete = (run / "complete").is_file()
    sub = (f"{run} - strategy {m.get('strategy')} ({m.get('schedule')}), {len(stages) - 1} stage(s) after MIM "
           f"pretraining" + ("" if complete else " - NOT COMPLETE (resume with medveil federate --resume)"))
    split = m.get("config", {}).get("data", {}).get("eval_split", "test")  # the held-out split sites score on
    sections = [("Per site: the universal model with its own head", _final_table(m, stages, split)),
                ("Accuracy by stage", H.figure(stage_curves_figure(stages, split=split),
                                               f"per-site {split} accuracy by stage")
                 + (H.para("Open circles: before the calibration round refitted each site's head.", "note")
                    if any("test_before_calibration" in c for c in stages[-1].get("clients", {}).values()) else ""))]
    if evaluation:
        sections.append(("Against the baselines (medveil evaluate)", _baselines(evaluation)))
    else:
        sections.append(("Against the baselines", H.para(
            f"No evaluation.json: run `medveil evaluate {run}` for the fine-tune, probe, MIM-only and "
            "site-alone rows.", "warn")))
    sections.append(("Absent sites and rejected updates", _absences(stages)))
    config = (run / "config.toml").read_text() if (run / "config.toml").is_file() else json.dumps(
        m.get("config", {}), indent=1)
    sections.append(("Config", H.pre(config)))
    return H.page("MedVeil federated run", sub, sections)


def _final_table(m: dict[str, Any], stages: list[dict[str, Any]], split: str = "test") -> str:
    last = stages[-1].get("clients", {})
    dp = m.get("privacy", {})
    rows = []
    for name, fm in m.get("final", {}).items():
        before = last.get(name, {}).get("test_before_calibration", {})
        b = m.get("bytes_total", {}).get(name, {"down": 0, "up": 0})
        rows.append([name, fm.get("n"), fm.get("acc"), fm.get("bacc"), fm.get("auc"), before.get("acc"),
                     f"{b['down'] / 1e6:.1f}", f"{b['up'] / 1e6:.1f}",
                     *([f"{dp[name]['epsilon']:.2f}" if name in dp else "-"] if dp else [])])
    cpu = [s.get("cpu_seconds") for s in stages]
    note = (f"CPU time of the run (all sites and the server, in-process): {sum(cpu) / 60:.1f} min"
            if cpu and all(c is not None for c in cpu) else "")
    header = ["site", f"{split} images", "acc", "bal. acc", "AUC", "acc before calibration", "MB down", "MB up"]
    return (H.table(header + (["DP epsilon spent"] if dp else []), rows) + (H.para(note, "note") if note else ""))


def _baselines(ev: dict[str, Any]) -> str:
    names = list(ev.get("universal", {}))
    header = ["site", "universal (own head)", "universal fine-tuned", "universal probe", "MIM-only fine-tuned",
              "MIM-only probe"]
    alone = {k: v for k, v in ev.get("site_alone", {}).items() if k != "recipe"}
    header += [f"{arch} alone" for arch in alone] + ["published (ResNet-18, 28 px)"]
    rows = []
    for n in names:
        def acc(src: str, kind: str | None = None, site: str = n) -> Any:
            r = ev.get(src, {}).get(site)
            r = r if kind is None or r is None else r.get(kind)
            return None if r is None else r.get("acc")
        rows.append([n, acc("universal"), acc("final", "finetune"), acc("final", "probe"),
                     acc("mim_only", "finetune"), acc("mim_only", "probe"),
                     *[a.get(n, {}).get("acc") for a in alone.values()], ev.get("published", {}).get(n)])
    return H.table(header, rows, "test accuracy; site alone: trained on exactly that site's train images; "
                                 "published: MedMNIST v2, all train images, GPU")


def _absences(stages: list[dict[str, Any]]) -> str:
    rows = []
    for s in stages[1:]:
        absent = s.get("absent") or []
        rejected = s.get("rejected") or []
        rows.append([s.get("stage"), "; ".join(f"{a.get('client')}: {a.get('reason')}" for a in absent) or "none",
                     "; ".join(f"{r.get('client')}: {r.get('reason')}" for r in rejected) or "none"])
    return H.table(["stage", "absent", "rejected updates"], rows)


# ----------------------------------------------------------------------------- releases
def release_page(out: Path, evaluation: dict[str, Any] | None = None) -> str:
    rep = _json(out / "report.json") or {}
    evaluation = evaluation or _json(out / "evaluation.json")
    images, labels = _release_images(out)
    people = rep.get("n_patients") or rep.get("n_members")
    sub = (f"{out} - {rep.get('method', 'release')}: {len(images)} synthetic images from {rep.get('n_members')} "
           f"images of {people} people, k = {rep.get('k')}" + ("" if rep.get("complete") else " - NOT COMPLETE"))
    sections = [("Released images", _grid(images) if images else H.para("no images", "warn")),
                ("Group sizes", _group_hist(out, rep)),
                ("Labels", _label_table(rep, labels))]
    if evaluation:
        sections.append(("Utility, fidelity and privacy (medveil evaluate-release)", _release_eval(evaluation)))
    else:
        sections.append(("Utility, fidelity and privacy", H.para(
            "No evaluation: run `medveil evaluate-release ... --json OUT/evaluation.json` and report again.", "warn")))
    sections.append(("Keep apart", H.para(rep.get("audit_note", "share only release/"), "warn")))
    sections.append(("Settings", H.pre(json.dumps(rep.get("config", {}), indent=1))))
    return H.page("MedVeil k-anonymous release", sub, sections)


def _release_images(out: Path) -> tuple[list[np.ndarray], list[str]]:
    path = out / "release" / "labels.csv"
    if not path.is_file():
        raise DataError(f"{path}: missing; {out} is not a release folder written by `medveil anonymize`")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    images = []
    for r in rows[:GRID]:
        try:
            images.append(np.asarray(Image.open(out / "release" / "images" / r["file"]).convert("RGB")))
        except OSError as err:
            raise DataError(f"{out / 'release' / 'images' / r['file']}: unreadable image ({err})") from None
    return images, [r.get("label", "") for r in rows]


def _label_table(rep: dict[str, Any], labels: list[str]) -> str:
    """Per class: source images (report.json) and released images (majority label, labels.csv)."""
    names = list(rep.get("class_names", []))
    source = list(rep.get("label_counts", []))
    released = Counter(labels)
    rows = [[n, source[i] if i < len(source) else None, released.get(str(i), 0)] for i, n in enumerate(names)]
    return H.table(["class", "source images", "released images (majority label of the group)"], rows)


def _grid(images: list[np.ndarray]) -> str:
    cols = min(8, len(images))
    rows = -(-len(images) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.2, rows * 1.2), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, img in zip(axes.ravel(), images, strict=False):
        ax.imshow(img)
    fig.subplots_adjust(wspace=0.05, hspace=0.05)
    return H.figure(fig, "released synthetic images") + H.para(
        f"The first {len(images)} released images (in file order, which is random).", "note")


def _group_hist(out: Path, rep: dict[str, Any]) -> str:
    groups = out / "audit" / "groups.csv"
    if not groups.is_file():
        ppi = rep.get("people_per_image", {})
        return H.para(f"audit/groups.csv not here (kept apart?); report.json: {ppi.get('min')} to "
                      f"{ppi.get('max')} people per image", "note")
    with open(groups, newline="") as fh:
        rows = list(csv.DictReader(fh))
    key = "patient_id" if rows and rows[0].get("patient_id") else "member_id"
    per_image: dict[str, set[str]] = {}
    for r in rows:
        per_image.setdefault(r["file"], set()).add(r[key])
    sizes = Counter(len(v) for v in per_image.values())
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar([str(s) for s in sorted(sizes)], [sizes[s] for s in sorted(sizes)], color="#4a7bd0")
    ax.set_xlabel("people per released image" if key == "patient_id" else "images per released image")
    ax.set_ylabel("released images")
    ax.set_title(f"every group >= k = {rep.get('k')}")
    fig.tight_layout()
    return H.figure(fig, "group-size histogram")


def _release_eval(ev: dict[str, Any]) -> str:
    rows = []
    for name, r in ev.get("results", {}).items():
        u, f, p = r.get("utility", {}), r.get("fidelity", {}), r.get("privacy") or {}
        link, nn = p.get("linkage", {}), p.get("nn_reid", {})
        rows.append([name, r.get("n_images"), u.get("acc_mean"), u.get("qwk_mean"), f.get("fid"), f.get("kid_mean"),
                     link.get("topk_precision"), link.get("chance"), nn.get("nn_reid_rate"), nn.get("chance")])
    return H.table(["set", "images", "utility acc", "utility QWK", "FID", "KID", "linkage top-k prec.", "chance",
                    "NN re-id", "chance"], rows,
                   f"k = {ev.get('k')}; utility: a classifier trained on the set, tested on real test images")
