"""``medveil audit RUN``: how well a membership-inference attacker does against what each site
released. Run where the data is: in-process, the run's clients, rebuilt from its config
(:func:`audit_run`); at a Flower site, ``medveil site audit`` (:func:`audit_site_state`) from the
releases the site kept (:mod:`medveil.federated.site_record`), with the same attacks and seeds.

Members: the site's train images used in the federation, subsampled to the class proportions of
the non-members (a split with another class balance would otherwise give the attack the label
for free); non-members: its held-out images (the run's eval split, test by default; ``nonmembers =
"val"`` takes the val split), split in two by a seeded draw, one half (R) for the attacker's
reference model, the other (E) to score. Members and non-members must come from one distribution:
where a dataset's test split comes from another source than its train split (OrganAMNIST's and
PneumoniaMNIST's test patients come from their sources' test sets, their val patients from the
train sets), every model, trained on the members or not, has a lower loss on the train
distribution, and the attack "finds" members by the shift alone; the val split is then the
sounder choice (README: "Differential privacy and the membership-inference audit"). Where the
held-out images come in groups (many CT slices per patient), a random draw puts one patient's
images in R and in E, the calibrated attack's reference model has seen E's patients, and that
attack can overstate leakage. Without patient ids, ``reference_split = "grouped"`` splits by
look-alike groups instead (:func:`image_groups`: Ward clusters of the held-out images' pixels,
about ``GROUP_SIZE`` per cluster, whole clusters to R or to E by scikit-learn's
``GroupShuffleSplit``); the default stays the random draw. Either way R and E come from a few
held-out patients and the members from others: a reference model trained on R fits E's patients
better than the members', and the calibrated attack then separates populations, not members.
``nonmembers = "unused-train"`` removes that asymmetry by construction: R and E are train images
that neither the site nor the pool used (random draws of the same permutation that chose the
members), so members, R and E are one population and a target that learned nothing about its
members scores AUC 0.5 in expectation. It measures membership of an image, the unit DP-SGD
protects; neighbouring slices of a member's patient can sit in E, so it does not measure
patient-level leakage (under DP bounded only by group privacy). It needs a site that does not
train on all of its train images (``[data] max_train``).

Targets, per site: ``update``, the last model the site sent (what the server saw:
``checkpoints/updates.pt``); ``universal``, the final universal backbone with the site's own
head (what everyone who gets the model sees); ``backbone``, that backbone with a head fit to
convergence (:func:`~medveil.federated.calibration.fit_linear_head`, L2 at C = 1) on the reference
half R, images it never trained on: what the shared backbone alone reveals, without the site's
head. A site whose ``universal`` figure is above its band and whose ``backbone`` figure is not
knows the signal is in its own head (under DP: the calibration round's refit), not in the backbone
every site shares. That reading needs non-members from the members' population (``unused-train``):
with val or test non-members R's head fits E's population better than the members', which pulls
the backbone target's figures down.

Attacks (scores: higher = "member"):
- ``loss``: the example's loss under the target, negated (Yeom et al. 2018);
- ``calibrated``: per-example difficulty calibration (Watson et al. 2022, the offline reference
  of LiRA / RMIA): the loss under a reference model minus the loss under the target, where the
  reference is the run's MIM-only backbone with a head fine-tuned, with the run's recipe, on R
  (images the target never saw). An example that is hard for everyone scores low.

Reported per site and target: ROC AUC and the TPR at 1 % and 0.1 % FPR (chance: 0.5, 0.01,
0.001; with fewer than 1000 non-members the 0.1 % point is the lowest FPR measurable, said in
``fpr_resolution``), and for AUC and TPR@1%FPR the 95th percentile that an attacker without signal
reaches on the same sample sizes (``chance_95``, label permutations): with a few hundred images a
figure is evidence of leakage only above that band. Writes ``RUN/audit.json`` and ``RUN/audit_roc.png``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from medveil.data import Task
from medveil.errors import DataError, MedVeilError
from medveil.federated.calibration import fit_linear_head
from medveil.federated.config import load_config
from medveil.federated.engine import UPDATES, mim_only_state, require_complete
from medveil.federated.rebuild import build_backbone, build_head
from medveil.federated.site_record import LAST_UPDATE, REFERENCE_START, SITE, audit_folder, read_site
from medveil.federated.sites import UNUSED_TRAIN, ClientData, build_sites, load_site
from medveil.federated.training import (TrainRecipe, derive_seed, extract_features, new_head, predict_logits, task_loss,
                                        train_classifier)
from medveil.federated.universal import load_universal
from medveil.io import save_figure, write_json_atomic
from medveil.models import ViTConfig
from medveil.progress import bar as progress_bar


def example_losses(logits: torch.Tensor, y: torch.Tensor, task: Task | str) -> np.ndarray:
    """(N,) loss of each example (no class weights: the attacker scores examples, not classes)."""
    return task_loss(logits, y, task, reduction="none").numpy()


NULL_DRAWS = 200  # label permutations for the chance band of each figure
CHANCE = {"auc": 0.5, "tpr_at_1pct_fpr": 0.01, "tpr_at_0.1pct_fpr": 0.001}  # an attacker that guesses


def _tpr_at(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    ok = fpr <= target
    return float(tpr[ok].max()) if ok.any() else 0.0


def attack_metrics(member: np.ndarray, nonmember: np.ndarray) -> dict[str, Any]:
    """ROC AUC, TPR at 1 % / 0.1 % FPR of scores (higher = member), and the curve (for the plot).

    ``chance_95``: the 95th percentile of AUC and TPR@1%FPR when the member / non-member labels
    are randomly permuted (``NULL_DRAWS`` seeded draws): what an attacker with no signal reaches
    on samples of these sizes. With a few hundred non-members a TPR@1%FPR of 2-3 % is still
    chance; a figure at or below its band is no evidence of leakage."""
    y = np.r_[np.ones(len(member)), np.zeros(len(nonmember))]
    s = np.r_[member, nonmember]
    fpr, tpr, _ = roc_curve(y, s)
    rng = np.random.default_rng(0)
    null_auc, null_tpr = [], []
    for _ in range(NULL_DRAWS):
        yp = rng.permutation(y)
        f, t, _ = roc_curve(yp, s)
        null_auc.append(roc_auc_score(yp, s))
        null_tpr.append(_tpr_at(f, t, 0.01))
    return {"auc": float(roc_auc_score(y, s)), "tpr_at_1pct_fpr": _tpr_at(fpr, tpr, 0.01),
            "tpr_at_0.1pct_fpr": _tpr_at(fpr, tpr, 0.001),
            "chance_95": {"auc": float(np.quantile(null_auc, 0.95)), "tpr_at_1pct_fpr": float(np.quantile(null_tpr, 0.95))},
            "n_members": int(len(member)), "n_nonmembers": int(len(nonmember)),
            "fpr_resolution": 1.0 / max(len(nonmember), 1), "roc": (fpr.tolist(), tpr.tolist())}


def matched_members(y_in: np.ndarray, y_out: np.ndarray, seed: int) -> np.ndarray:
    """Indices of members whose labels follow the non-members' class proportions (as many as the
    scarcest class allows). Without it a split whose class balance differs from train's (e.g.
    PneumoniaMNIST's test split) lets the attack "find" members by their label alone: seen as
    AUC 0.70 on a model trained under DP at epsilon 1. Multi-label tasks are not matched."""
    if y_in.ndim > 1:
        return np.arange(len(y_in))
    rng = np.random.default_rng(seed)
    classes, out_counts = np.unique(y_out, return_counts=True)
    by_class = {c: rng.permutation(np.flatnonzero(y_in == c)) for c in classes}
    scale = min(len(by_class[c]) / k for c, k in zip(classes, out_counts, strict=True))
    keep = [by_class[c][: int(np.floor(scale * k))] for c, k in zip(classes, out_counts, strict=True)]
    return np.sort(np.concatenate(keep)) if keep else np.arange(0)


REFERENCE_SPLITS = ("random", "grouped")
GROUP_SIZE = 10  # held-out images per look-alike group (not tuned; benchmarks/audit_grouped.py measures it)


def image_groups(x: torch.Tensor, size: int = GROUP_SIZE) -> np.ndarray:
    """(N,) group ids: Ward clusters of the images' pixels, N // size of them (adjacent CT slices
    of one patient look alike and land in one group)."""
    from sklearn.cluster import AgglomerativeClustering

    flat = x.reshape(len(x), -1).double().numpy()
    return AgglomerativeClustering(n_clusters=max(2, len(x) // size), linkage="ward").fit_predict(flat)


def split_nonmembers(n: int, seed: int, groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(reference half R, evaluation half E) of the held-out indices; with ``groups``, each group
    whole on one side (half of the groups each)."""
    if groups is not None:
        from sklearn.model_selection import GroupShuffleSplit

        split = GroupShuffleSplit(n_splits=1, test_size=0.5, random_state=seed % 2**32)
        ref, ev = next(split.split(np.arange(n), groups=groups))
        return np.sort(ref), np.sort(ev)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[: n // 2]), np.sort(order[n // 2:])


def audit_site(data: ClientData, targets: dict[str, tuple[torch.nn.Module, torch.nn.Module]],
               reference: tuple[torch.nn.Module, torch.nn.Module], eval_idx: np.ndarray,
               seed: int = 0) -> dict[str, Any]:
    """Both attacks on every target of one site; members: its train images with the class
    proportions of the non-members E (:func:`matched_members`)."""
    x_out, y_out = data.x_test[eval_idx], data.y_test[eval_idx]
    keep = matched_members(data.y_train.numpy(), y_out.numpy(), seed)
    x_in, y_in = data.x_train[keep], data.y_train[keep]
    ref_in = example_losses(predict_logits(*reference, x_in), y_in, data.task)
    ref_out = example_losses(predict_logits(*reference, x_out), y_out, data.task)
    out: dict[str, Any] = {}
    features: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # one pass per backbone (universal, backbone share one)
    for name, (backbone, head) in targets.items():
        if id(backbone) not in features:
            features[id(backbone)] = extract_features(backbone, x_in), extract_features(backbone, x_out)
        f_in, f_out = features[id(backbone)]
        with torch.no_grad():
            l_in = example_losses(head.eval()(f_in), y_in, data.task)
            l_out = example_losses(head.eval()(f_out), y_out, data.task)
        out[name] = {"loss": attack_metrics(-l_in, -l_out), "calibrated": attack_metrics(ref_in - l_in, ref_out - l_out)}
    return out


def audit_one(data: ClientData, model_cfg: dict[str, Any], reference_start: dict[str, torch.Tensor],
              recipe: TrainRecipe, update: tuple[int, torch.nn.Module, torch.nn.Module] | None,
              universal: tuple[torch.nn.Module, torch.nn.Module] | None, run_seed: int,
              reference_split: str = "random") -> dict[str, Any]:
    """One site's audit: the reference model (``reference_start`` + a head fine-tuned with
    ``recipe`` on half of the held-out images, drawn at random or by look-alike groups), then
    both attacks on each target present (``update``: (stage, backbone, head) the site sent last;
    ``universal``: (backbone, its head), and with it ``backbone``: that backbone, a head fit on R).
    In-process (:func:`audit_run`) and at a Flower site
    (:func:`audit_site_state`) alike."""
    if len(data.x_test) < 4:
        raise MedVeilError(f"{data.source}: site {data.name!r} has {len(data.x_test)} held-out images; "
                           f"the audit needs at least 4 (half for the reference model, half to score)")
    seed = derive_seed(run_seed, data.name, "audit")
    groups = image_groups(data.x_test) if reference_split == "grouped" else None
    ref_idx, eval_idx = split_nonmembers(len(data.x_test), seed, groups)
    ref_backbone = build_backbone(model_cfg, reference_start)
    ref_head = new_head(ref_backbone.feature_dim, data.num_classes, derive_seed(seed, "head"))
    train_classifier(ref_backbone, ref_head, data.x_test[ref_idx], data.y_test[ref_idx], data.task, recipe,
                     derive_seed(seed, "reference"), augment=data.augmentation(recipe.augment))
    targets: dict[str, tuple[torch.nn.Module, torch.nn.Module]] = {}
    if update is not None:
        targets["update"] = update[1:]
    if universal is not None:
        targets["universal"] = universal
        backbone = universal[0]
        head = fit_linear_head(extract_features(backbone, data.x_test[ref_idx]), data.y_test[ref_idx],
                               data.num_classes, data.task)
        targets["backbone"] = (backbone, build_head(head, data.num_classes, f"{data.name}: backbone target"))
    out = audit_site(data, targets, (ref_backbone, ref_head), eval_idx, derive_seed(seed, "members"))
    if update is not None:
        out["update_stage"] = update[0]
    return out


NONMEMBER_SPLITS = ("test", "val", UNUSED_TRAIN)


def _check_nonmembers(nonmembers: str | None, reference_split: str = "random", max_nonmembers: int = 0) -> None:
    if max_nonmembers < 0 or (0 < max_nonmembers < 4):
        raise MedVeilError(f"--max-nonmembers must be 0 (the run's max_test) or >= 4, got {max_nonmembers}")
    if nonmembers is not None and nonmembers not in NONMEMBER_SPLITS:
        raise MedVeilError(f"non-members must come from one of {', '.join(NONMEMBER_SPLITS)}, got {nonmembers!r}")
    if reference_split not in REFERENCE_SPLITS:
        raise MedVeilError(f"the reference split must be one of {', '.join(REFERENCE_SPLITS)}, got {reference_split!r}")


def audit_run(run_dir: str | Path, progress: bool = True, nonmembers: str | None = None,
              reference_split: str = "random", max_nonmembers: int = 0) -> dict[str, Any]:
    """The audit of every site of a finished in-process run; ``nonmembers``: where the
    non-members come from ("test", "val" or "unused-train"; default: the run's own eval split; a
    site with no unused train image is reported ``unavailable``, the others audited);
    ``reference_split``: how they are halved ("random" or "grouped", module docstring);
    ``max_nonmembers``: held-out images per site, both halves (0: the run's ``max_test``; more
    non-members narrow the chance bands, which a 1 % FPR needs)."""
    run = Path(run_dir)
    require_complete(run)
    _check_nonmembers(nonmembers, reference_split, max_nonmembers)
    cfg = load_config(run / "config.toml")
    if nonmembers is not None:
        cfg.data = replace(cfg.data, eval_split=nonmembers)
    if max_nonmembers:
        cfg.data = replace(cfg.data, max_test=max_nonmembers)
    universal = load_universal(run / "model.pt")
    updates_path = run / "checkpoints" / UPDATES
    try:
        updates = torch.load(updates_path, map_location="cpu", weights_only=True) if updates_path.is_file() else {}
    except Exception as err:  # noqa: BLE001 - any unreadable file is one line to the user
        raise MedVeilError(f"{updates_path}: unreadable ({type(err).__name__})") from None
    mim = mim_only_state(run)
    clients, unavailable = [], {}
    for spec in cfg.clients:  # one by one: a site's splits depend only on (seed, its name, options)
        try:
            clients += build_sites([spec], cfg.data, cfg.model.img_size, cfg.model.in_chans, cfg.seed)[0]
        except DataError as err:
            if cfg.data.eval_split != UNUSED_TRAIN:
                raise
            unavailable[spec.name] = str(err)  # trains on every image it has: no population non-members
    if not clients:
        raise MedVeilError(f"{run}: no site has unused train images to draw non-members from "
                           f"({next(iter(unavailable.values()))}); use --nonmembers val or test")
    recipe = cfg.evaluation.finetune_recipe(cfg.local)
    model_cfg = cfg.model.to_dict()
    result: dict[str, Any] = {"run": str(run), "dp": cfg.privacy.dp, "sites": {},
                              "nonmembers": cfg.data.eval_split, "reference_split": reference_split,
                              "chance": CHANCE,
                              "reference": f"MIM-only backbone + head fine-tuned ({recipe.epochs} epochs) on half "
                                           f"of each site's held-out images"}
    for data in progress_bar(clients, desc="audit", disable=not progress):
        u = updates.get(data.name)
        update = None if u is None else (int(u["stage"]), build_backbone(model_cfg, u["backbone"]),
                                         build_head(u["head"], data.num_classes, f"{updates_path}: {data.name}"))
        pair = (universal.backbone, universal.heads[data.name]) if data.name in universal.heads else None
        result["sites"][data.name] = audit_one(data, model_cfg, mim, recipe, update, pair, cfg.seed, reference_split)
        if update is None:  # absent, refused or rejected in the last stage with an accepted update
            result["sites"][data.name]["update_missing"] = f"no accepted update of {data.name!r} in {updates_path}"
    for name, reason in unavailable.items():
        result["sites"][name] = {"unavailable": reason}
    plot_roc(result, run / "audit_roc.png")
    write_json_atomic(run / "audit.json", strip_curves(result))
    return result


def audit_site_state(state_dir: str | Path, name: str, model: str | Path | None, out: str | Path | None = None,
                     nonmembers: str | None = None, reference_split: str = "random",
                     max_nonmembers: int = 0) -> dict[str, Any]:
    """A Flower site's own audit (``medveil site audit``), from what it kept in its state folder
    (:mod:`medveil.federated.site_record`: its data options, the backbone it first trained from,
    its last update) and, when given, the final universal ``model`` the server shared. The same
    attacks, reference model and seeds as ``medveil audit`` on the in-process run. Writes
    ``audit.json`` and ``audit_roc.png`` into ``out`` (default: the site's audit folder);
    ``nonmembers``, ``reference_split`` and ``max_nonmembers`` as for :func:`audit_run`."""
    _check_nonmembers(nonmembers, reference_split, max_nonmembers)
    folder = audit_folder(state_dir, name)
    if not (folder / SITE).is_file():
        raise MedVeilError(f"{folder}: no releases of site {name!r} recorded (it has not trained in a run "
                           f"started with `medveil site start --state ...`, or --state / --name differ)")
    kept = read_site(folder)
    site = kept["site"]
    if "reference_recipe" not in site:
        raise MedVeilError(f"{folder / SITE}: written by an older MedVeil coordinator (no reference recipe); "
                           f"rerun the federation")
    held = {**site, **({"eval_split": nonmembers} if nonmembers else {}),
            **({"max_test": max_nonmembers} if max_nonmembers else {})}
    data = load_site(name, kept["data"], held)
    try:
        start = torch.load(folder / REFERENCE_START, map_location="cpu", weights_only=True)
        last = torch.load(folder / LAST_UPDATE, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is one line to the user
        raise MedVeilError(f"{folder}: unreadable release record ({type(err).__name__})") from None
    model_cfg = start["model_config"]
    update = (int(last["stage"]), build_backbone(model_cfg, last["backbone"]),
              build_head(last["head"], data.num_classes, f"{folder / LAST_UPDATE}"))
    pair = None
    if model is not None:
        universal = load_universal(model)
        if name not in universal.heads:
            raise MedVeilError(f"{model}: has no head for site {name!r} (tasks: {', '.join(universal.heads)})")
        if universal.cfg.to_dict() != ViTConfig(**model_cfg).to_dict():
            raise MedVeilError(f"{model}: another model shape than the run this site last trained in "
                               f"({folder}); audit the model of that run")
        pair = (universal.backbone, universal.heads[name])
    recipe = TrainRecipe(**site["reference_recipe"])
    result: dict[str, Any] = {"run": f"site {name} ({folder})", "dp": bool(site.get("privacy", {}).get("dp")),
                              "nonmembers": nonmembers or str(site.get("eval_split", "test")),
                              "reference_split": reference_split,
                              "sites": {name: audit_one(data, model_cfg, start["backbone"], recipe, update, pair,
                                                        int(site["seed"]), reference_split)},
                              "chance": CHANCE,
                              "reference": f"the backbone this site first trained from (stage {int(start['stage'])}) "
                                           f"+ head fine-tuned ({recipe.epochs} epochs) on half of its held-out images"}
    dest = Path(out) if out is not None else folder
    dest.mkdir(parents=True, exist_ok=True)
    plot_roc(result, dest / "audit_roc.png")
    write_json_atomic(dest / "audit.json", strip_curves(result))
    return result


def strip_curves(result: dict[str, Any]) -> dict[str, Any]:
    """The result without the ROC points (they go to the figure, not the JSON)."""
    sites = {name: {t: ({a: {k: v for k, v in m.items() if k != "roc"} for a, m in r.items()}
                        if isinstance(r, dict) else r) for t, r in per.items()}
             for name, per in result["sites"].items()}
    return {**result, "sites": sites}


def plot_roc(result: dict[str, Any], path: Path) -> Path:
    from medveil.report.plots import plt

    sites = result["sites"]
    fig, axes = plt.subplots(1, max(1, len(sites)), figsize=(3.2 * max(1, len(sites)), 3.2), squeeze=False)
    for ax, (name, per) in zip(axes[0], sites.items(), strict=False):
        for target, attacks in per.items():
            if not isinstance(attacks, dict):
                continue
            for attack, m in attacks.items():
                fpr, tpr = m["roc"]
                ax.loglog(np.maximum(fpr, 1e-4), np.maximum(tpr, 1e-4), label=f"{target} {attack} ({m['auc']:.2f})")
        ax.loglog([1e-4, 1], [1e-4, 1], "k--", linewidth=0.8, label="chance")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("FPR")
        ax.set_ylabel("TPR")
        ax.legend(fontsize=6, loc="lower right")
    fig.suptitle("membership inference" + (" (DP)" if result.get("dp") else " (no DP)"), fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def format_table(result: dict[str, Any]) -> str:
    lines = [f"membership inference on {result['run']} ({'with' if result['dp'] else 'without'} DP); "
             "chance: AUC 0.5, TPR@1%FPR 0.01, TPR@0.1%FPR 0.001; in brackets the 95th percentile an attacker "
             "without signal reaches on these sample sizes; * above it",
             f"{'site':<14}{'target':<11}{'attack':<12}{'AUC':>15}{'TPR@1%':>16}{'TPR@0.1%':>10}{'members':>9}{'non':>6}"]
    for name, per in result["sites"].items():
        if "unavailable" in per:
            lines.append(f"{name:<14}not audited: {per['unavailable']}")
        for target, attacks in per.items():
            if not isinstance(attacks, dict):
                continue
            for attack, m in attacks.items():
                band = m.get("chance_95", {})

                def cell(key: str) -> str:
                    if key not in band:
                        return f"{m[key]:.3f}"
                    return f"{m[key]:.3f}{'*' if m[key] > band[key] else ' '}({band[key]:.3f})"

                lines.append(f"{name:<14}{target:<11}{attack:<12}{cell('auc'):>15}{cell('tpr_at_1pct_fpr'):>16}"
                             f"{m['tpr_at_0.1pct_fpr']:>10.3f}{m['n_members']:>9}{m['n_nonmembers']:>6}")
    return "\n".join(lines)
