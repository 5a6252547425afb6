"""The k-SALSA release pipeline: load -> invert -> group -> centroid -> align -> write.

:func:`anonymize` turns a private image set into ``OUT/release`` (one synthetic image per group
of >= k people + labels.csv), ``OUT/audit/groups.csv`` (group -> members: keep it apart) and
``OUT/report.json`` (k, grouping, feature nets, weights, steps, timings; ``complete: true``
last). Resumable: the inversion (``OUT/.work/inversion/chunk-*.npz``) and every finished
alignment batch (``OUT/.work/batch-*.npz``, :class:`~medveil.anonymize.release.ReleaseState`)
are persisted atomically; a killed run started again with the same arguments redoes only what
is missing and gives the same images (all steps are deterministic: no random draws, noise const).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medveil.anonymize.alignment import AlignConfig, align_groups
from medveil.anonymize.grouping import group_means, make_groups, require_k
from medveil.anonymize.release import (
    REPORT, ReleaseResult, ReleaseState, groups_to_members, report_is_complete, write_release,
)
from medveil.data.dataset import ImageDataset
from medveil.data.tensors import to_tensor
from medveil.errors import DataError, MedVeilError, at
from medveil.generative.checkpoint import config_mismatch
from medveil.io import atomic_file, write_json_atomic
from medveil.progress import timed
from medveil.generative.encoder_training import generator_fingerprint
from medveil.generative.invert import invert_images
from medveil.models.encoder import Encoder
from medveil.models.features import build_feature_net
from medveil.models.stylegan2 import Generator

DEFAULT_FEATURE_NET = "random-conv:seed=0"
INVERT_CHUNK = 256  # images per persisted inversion chunk


@dataclass
class PrivateSet:
    """The images to anonymise. ids: one distinct text id per image (never released)."""

    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,)
    ids: list[str]
    class_names: list[str]
    patient_ids: np.ndarray | None = None  # (N,) when k must count patients
    source: str = ""

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.labels.ndim != 1:
            raise DataError(f"{self.source}: anonymize needs one class label per image "
                            f"(got labels of shape {self.labels.shape})")
        if len(self.labels) != n or len(self.ids) != n:
            raise DataError(f"{self.source}: {n} images, {len(self.labels)} labels, "
                            f"{len(self.ids)} ids; need one of each per image")
        if len(set(self.ids)) != n:
            dup = next(i for i in self.ids if self.ids.count(i) > 1)
            raise DataError(f"{self.source}: image id {dup!r} appears more than once")


def private_set(dataset: ImageDataset, split: str = "train", use_patients: bool = True
                ) -> PrivateSet:
    """One split of a loaded dataset; images without ids get ``<split>-<row>``."""
    s = dataset.split(split)
    ids = ([str(i) for i in s.ids] if s.ids is not None
           else [f"{split}-{i}" for i in range(len(s))])
    return PrivateSet(s.images, np.asarray(s.labels, dtype=np.int64), ids,
                      list(dataset.class_names),
                      s.patient_ids if use_patients else None, f"{dataset.source} [{split}]")


@dataclass
class AnonymizeConfig:
    k: int = 5
    grouping: str = "greedy"  # greedy | mdav | random (grouping.METHODS)
    stratify_labels: bool = False  # group each label class on its own (label-pure groups)
    feature_net: str = DEFAULT_FEATURE_NET  # content embedding (and inversion losses)
    style_net: str | None = None  # style feature maps; None = feature_net
    align: AlignConfig = field(default_factory=AlignConfig)
    invert_steps: int = 100  # projector steps after the encoder (0: encoder only)
    batch_groups: int = 64  # groups optimised together
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["align"] = self.align.to_dict()
        return d


@dataclass
class Models:
    G: Generator
    encoder: Encoder | None = None
    info: dict[str, Any] = field(default_factory=dict)  # where they came from, for the report


@dataclass
class AnonymizeResult:
    release: ReleaseResult
    report: dict[str, Any]
    groups: list[np.ndarray]  # row indices of each group, in release order (release.files)
    images: np.ndarray  # uint8 (G, R, R, C) aligned (released) images
    centroid_images: np.ndarray  # uint8 (G, R, R, C) G(w_bar), the no-alignment baseline
    ws: np.ndarray  # float32 (N, num_ws, w_dim) inverted latents
    recons: np.ndarray  # uint8 (N, R, R, C) G(w_i) reconstructions
    reals: np.ndarray  # uint8 (N, R, R, C) the private images at G's resolution


def check_k(k: int, n_images: int, patient_ids: np.ndarray | None, where: str = "") -> None:
    """One-line MedVeilError when k cannot be met (k > N images, or fewer than k patients)."""
    require_k(k)
    prefix = at(where)
    if k > n_images:
        raise MedVeilError(f"{prefix}k={k} is larger than the {n_images} images; "
                           "a release needs at least k images")
    if patient_ids is not None:
        n_patients = len(set(map(str, patient_ids)))
        if n_patients < k:
            raise MedVeilError(f"{prefix}only {n_patients} distinct patients but k={k}; "
                               "a release needs at least k patients")


def anonymize(data: PrivateSet, models: Models, out_dir: str | Path,
              cfg: AnonymizeConfig = AnonymizeConfig(), *, overwrite: bool = False,
              progress: bool | None = None,
              on_batch: Callable[[list[int]], None] | None = None,
              inversion_dir: str | Path | None = None) -> AnonymizeResult:
    """Run the pipeline on ``data`` and write the release to ``out_dir``.

    on_batch(group_indices) runs after each alignment batch has been persisted (tests use it
    to simulate a kill). inversion_dir: where the inversion is persisted (default
    ``OUT/.work/inversion``, deleted with .work at the end); a folder outside OUT lets several
    releases of the same images (e.g. several k) share one inversion. Raises MedVeilError for k > N, too few patients, a complete release
    already in ``out_dir`` (unless overwrite) or leftovers of a run with another config.
    """
    out = Path(out_dir)
    check_k(cfg.k, len(data.images), data.patient_ids, data.source)
    if report_is_complete(out / REPORT) and not overwrite:
        raise MedVeilError(f"{out}: already holds a complete release; choose another --out or "
                           "pass --overwrite")
    G = models.G.eval()
    device = next(G.parameters()).device
    content_net = build_feature_net(cfg.feature_net).to(device)
    style_net = (build_feature_net(cfg.style_net).to(device) if cfg.style_net else content_net)
    timings: dict[str, float] = {}
    with timed(timings, "load_s"):
        x = to_tensor(data.images, size=G.resolution, channels=G.img_channels)  # (N, C, R, R)
    with timed(timings, "invert_s"):
        inv_dir = Path(inversion_dir) if inversion_dir is not None else out / ".work" / "inversion"
        ws, recon = invert_resumable(x, models, inv_dir, cfg, data, progress)
    with timed(timings, "group_s"):
        groups = make_groups(ws.reshape(len(ws), -1).numpy(), cfg.k, cfg.grouping, cfg.seed,
                             subject_ids=data.patient_ids,
                             labels=data.labels if cfg.stratify_labels else None)
        centroids = torch.from_numpy(group_means(ws.numpy(), groups, dtype=np.float32))
    state = ReleaseState(out, len(groups), _state_config(cfg, x, models, data, groups))
    resumed = int(state.done().sum())
    pending = state.pending()
    with timed(timings, "align_s"):
        aligned = align_groups(G, centroids, x, recon, groups, content_net, style_net, cfg.align,
                               batch_size=cfg.batch_groups, which=pending,
                               on_batch=_persister(G, centroids, state, on_batch), progress=progress)
    report = _report(data, cfg, models, (content_net, style_net), state, {
        **timings, "groups_aligned_this_run": len(pending), "groups_resumed": resumed,
        "align_groups_per_s": len(pending) / aligned.seconds if aligned.seconds else None})
    return _write_release(out, data, cfg, groups, state, report, overwrite, ws, recon, x)


def _state_config(cfg: AnonymizeConfig, x: torch.Tensor, models: Models, data: PrivateSet,
                  groups: list[np.ndarray]) -> dict[str, Any]:
    """What a resumed alignment must share with the run that started it."""
    return {**cfg.to_dict(), "inversion": _inversion_key(x, models, cfg, data),
            "groups_sha256": _sha([g.tobytes() for g in groups]),
            "group_by": "patient" if data.patient_ids is not None else "image"}


def _persister(G: Generator, centroids: torch.Tensor, state: ReleaseState,
               on_batch: Callable[[list[int]], None] | None) -> Callable[[list[int], dict], None]:
    """Save each aligned batch (and its groups' centroid images) as soon as it is done."""
    device = next(G.parameters()).device

    def persist(idx: list[int], res: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            cen = _unit(G.synthesis(centroids[idx].to(device), noise_mode="const")).cpu()
        state.save(idx, images=to_uint8(res["images"]), centroid_images=to_uint8(cen),
                   ws=res["ws"].float().numpy(), loss_start=res["loss_start"].numpy(),
                   loss_end=res["loss_end"].numpy(), content=res["content"].numpy(),
                   style=res["style"].numpy())
        if on_batch is not None:
            on_batch(idx)

    return persist


def _report(data: PrivateSet, cfg: AnonymizeConfig, models: Models, nets: tuple[Any, Any],
            state: ReleaseState, timings: dict[str, Any]) -> dict[str, Any]:
    """The release's report.json body: method, settings, models, alignment losses, timings."""
    G = models.G
    losses = {name: state.load(name) for name in ("loss_start", "loss_end", "content", "style")}
    return {
        "method": "k-SALSA (local style alignment)",
        "source": data.source,
        "config": cfg.to_dict(),
        "grouping": cfg.grouping,
        "seed": cfg.seed,
        "weights": {"lambda_c": cfg.align.lambda_c, "lambda_s": cfg.align.lambda_s,
                    "gram_scale": cfg.align.gram_scale, "patches": cfg.align.patches},
        "steps": {"align": cfg.align.steps, "invert_projector": cfg.invert_steps,
                  "encoder_iterations": 5 if models.encoder is not None else 0},
        "feature_nets": {"content": nets[0].describe(), "style": nets[1].describe()},
        "models": models.info,
        "image_size": [int(G.resolution), int(G.resolution), int(G.img_channels)],
        "alignment_losses": {
            **{k: {"mean": float(v.mean()), "max": float(v.max())} for k, v in losses.items()},
            "groups_improved": float((losses["loss_end"] < losses["loss_start"]).mean())},
        "timings": timings,
    }


def _write_release(out: Path, data: PrivateSet, cfg: AnonymizeConfig, groups: list[np.ndarray],
                   state: ReleaseState, report: dict[str, Any], overwrite: bool, ws: torch.Tensor,
                   recon: torch.Tensor, x: torch.Tensor) -> AnonymizeResult:
    """Write the release (images, labels, audit, report), then drop the alignment state."""
    images = state.load("images")
    labels = {i: int(y) for i, y in zip(data.ids, data.labels)}
    patients = (None if data.patient_ids is None
                else {i: str(p) for i, p in zip(data.ids, data.patient_ids)})
    t = time.perf_counter()
    release = write_release(out, images, groups_to_members(groups, data.ids), labels,
                            data.class_names, cfg.k, patients, report, overwrite=overwrite,
                            quiet=True)
    report = json.loads(release.report_path.read_text())
    centroid_images = state.load("centroid_images")
    state.clear()
    report["timings"]["write_s"] = time.perf_counter() - t
    write_json_atomic(release.report_path, report)
    return AnonymizeResult(release, report, groups, images, centroid_images, ws.numpy(),
                           to_uint8(recon), to_uint8(x))


# ----------------------------------------------------------------------------- inversion


def invert_resumable(x: torch.Tensor, models: Models, work: Path, cfg: AnonymizeConfig,
                     data: PrivateSet, progress: bool | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ws (N, num_ws, w_dim), recon (N, C, R, R) in [0, 1]), persisted per chunk in ``work``."""
    key = _inversion_key(x, models, cfg, data)
    config_path = work / "config.json"
    if config_path.is_file():
        try:
            found = json.loads(config_path.read_text())
        except ValueError:
            raise DataError(f"{config_path}: unreadable; delete {work} to start over") from None
        config_mismatch(key, found, str(work))
    else:
        work.mkdir(parents=True, exist_ok=True)
        write_json_atomic(config_path, key)
    fnet = build_feature_net(cfg.feature_net).to(next(models.G.parameters()).device)
    ws, recon = [], []
    starts = range(0, len(x), INVERT_CHUNK)
    for c, start in enumerate(starts):
        path = work / f"chunk-{c:06d}.npz"
        if path.is_file():
            with np.load(path) as f:
                ws.append(torch.from_numpy(f["ws"]))
                recon.append(torch.from_numpy(f["recon"]).float())
            continue
        if progress is not False:
            print(f"medveil: inverting images {start}-{min(start + INVERT_CHUNK, len(x)) - 1} "
                  f"of {len(x)}", flush=True)
        w, r = invert_images(x[start: start + INVERT_CHUNK], models.G, models.encoder,
                             cfg.invert_steps, fnet=fnet, progress=progress)
        r16 = r.half()  # stored as float16; we use the stored values in this run too
        with atomic_file(path) as f:
            np.savez(f, ws=w.float().numpy(), recon=r16.numpy())
        ws.append(w.float())
        recon.append(r16.float())
    return torch.cat(ws), torch.cat(recon)


def _inversion_key(x: torch.Tensor, models: Models, cfg: AnonymizeConfig, data: PrivateSet
                   ) -> dict[str, Any]:
    return {"n": len(x), "data_sha256": _sha([x.numpy().tobytes(), "\n".join(data.ids).encode()]),
            "generator": generator_fingerprint(models.G),
            "encoder": None if models.encoder is None else generator_fingerprint(models.encoder),
            "invert_steps": cfg.invert_steps, "feature_net": cfg.feature_net,
            "chunk": INVERT_CHUNK}


# ----------------------------------------------------------------------------- helpers


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) float in [0, 1] -> uint8 (N, H, W, C)."""
    return (x.float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


def _unit(img: torch.Tensor) -> torch.Tensor:
    return ((img + 1) / 2).clamp(0, 1)


def _sha(chunks: Sequence[bytes]) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


__all__ = ["AnonymizeConfig", "AnonymizeResult", "Models", "PrivateSet",
           "anonymize", "check_k", "invert_resumable", "private_set", "to_uint8"]
