"""Write a k-anonymous release atomically, and keep finished group work across kills.

Layout of an output folder ``OUT``::

    OUT/release/images/<32 random hex>.png   the synthetic images (share only release/)
    OUT/release/labels.csv                    file, label (majority class index), frac_<class>...
    OUT/audit/groups.csv                      file, member_id[, patient_id], label - KEEP APART
    OUT/audit/README.txt                      why audit/ must never be shared with release/
    OUT/report.json                           written last, with "complete": true
    OUT/.work/                                finished groups of an unfinished run (ReleaseState)

:func:`write_release` builds release/ and audit/ in ``OUT/.partial-<id>/``, moves them into
place with ``os.replace`` and only then writes report.json, so a killed run never leaves a
release that claims to be complete. File names come from ``secrets`` (or a seeded RNG), never
from member ids; rows of both CSVs are sorted by that random name, not by group order.
"""

from __future__ import annotations

import csv
import json
import os
import random
import secrets
import shutil
import sys
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medveil.anonymize.grouping import group_problems, require_k
from medveil.errors import DataError, MedVeilError
from medveil.io import atomic_file, jsonable, write_json_atomic

AUDIT_NOTE = (
    "keep audit/ apart from release/: audit/groups.csv links every released image to the real "
    "people it was made from; share only the release/ folder"
)
REPORT = "report.json"


@dataclass(frozen=True)
class ReleaseResult:
    out_dir: Path
    release_dir: Path
    audit_dir: Path
    report_path: Path
    files: list[str]  # image file names, in the order of ``groups``


def write_release(
    out_dir: str | Path,
    images: np.ndarray,
    groups: Sequence[Sequence[Hashable]],
    labels: Mapping[Hashable, int],
    class_names: Sequence[str],
    k: int,
    patient_ids: Mapping[Hashable, Hashable] | None = None,
    report: Mapping[str, Any] | None = None,
    *,
    seed: int | None = None,
    overwrite: bool = False,
    quiet: bool = False,
) -> ReleaseResult:
    """Write images[g] as the release image of groups[g] (a list of member ids).

    images: uint8 (G, H, W, C), C in {1, 3}. labels: member id -> class index.
    patient_ids: member id -> patient id; when given, k counts distinct patients.
    report: extra fields for report.json (config, metrics); "complete" is set here, last.
    seed: None draws names from ``secrets``; an int makes names reproducible.
    overwrite: replace an existing complete release in OUT (an incomplete one is always
    replaced). Refuses (MedVeilError) to write anything that is not k-anonymous.
    One writer per OUT. A resumable run calls ``ReleaseState.clear()`` after this returns.
    """
    out = Path(out_dir)
    _check_inputs(images, groups, labels, class_names, k, patient_ids)
    report_path = out / REPORT
    if report_is_complete(report_path) and not overwrite:
        raise MedVeilError(f"{out}: already holds a complete release; pass overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".partial-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)

    names = _random_names(len(groups), seed)
    partial = out / f".partial-{secrets.token_hex(4)}"
    (partial / "release" / "images").mkdir(parents=True)
    (partial / "audit").mkdir()
    for name, image in zip(names, images):
        _write_png(partial / "release" / "images" / name, image)
    _write_labels(partial / "release" / "labels.csv", names, groups, labels, class_names)
    _write_audit(partial / "audit" / "groups.csv", names, groups, labels, patient_ids)
    (partial / "audit" / "README.txt").write_text(AUDIT_NOTE + "\n")

    report_path.unlink(missing_ok=True)  # from here on OUT does not look complete
    for part in ("release", "audit"):
        if (out / part).exists():
            os.replace(out / part, partial / f"old-{part}")
        os.replace(partial / part, out / part)
    write_json_atomic(report_path, _report(report, groups, labels, class_names, k, patient_ids))
    shutil.rmtree(partial, ignore_errors=True)
    if not quiet:
        print(f"medveil: wrote {len(names)} images to {out / 'release'}; {AUDIT_NOTE}",
              file=sys.stderr)
    return ReleaseResult(out, out / "release", out / "audit", report_path, names)


def groups_to_members(index_groups: Sequence[np.ndarray], member_ids: Sequence[Hashable]
                      ) -> list[list[Hashable]]:
    """Row-index groups (from :mod:`grouping`) -> lists of member ids."""
    ids = list(member_ids)
    return [[ids[i] for i in np.asarray(g).tolist()] for g in index_groups]


class ReleaseState:
    """Per-group outputs of an anonymize run, kept in ``OUT/.work/`` so a killed run resumes.

    Each :meth:`save` writes one ``batch-NNNNNN.npz`` (group indices + arrays) atomically.
    ``config`` (seed, k, method, data fingerprint, groups hash ...) is stored on first use; a
    later run with another config gets a one-line ConfigError instead of mixed results.
    """

    def __init__(self, out_dir: str | Path, n_groups: int, config: Mapping[str, Any]) -> None:
        from medveil.generative.checkpoint import config_mismatch  # torch; only needed here

        self.dir = Path(out_dir) / ".work"
        self.n_groups = int(n_groups)
        expected = jsonable({"n_groups": self.n_groups, "config": dict(config)})
        state_path = self.dir / "state.json"
        if state_path.is_file():
            try:
                found = json.loads(state_path.read_text())
            except (OSError, ValueError):
                raise DataError(f"{state_path}: unreadable; delete {self.dir} to start "
                                "over") from None
            config_mismatch(expected, found, str(self.dir))
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(state_path, expected)
        self._done = np.zeros(self.n_groups, dtype=bool)
        for path in self._batches():
            self._done[self._read(path, "groups")] = True

    def done(self) -> np.ndarray:
        """(n_groups,) bool: groups already finished."""
        return self._done.copy()

    def pending(self) -> list[int]:
        return np.flatnonzero(~self._done).tolist()

    def save(self, group_indices: Sequence[int], **arrays: np.ndarray) -> Path:
        """Persist finished groups; every array's first axis matches ``group_indices``."""
        idx = np.asarray(group_indices, dtype=np.int64).reshape(-1)
        if idx.size == 0 or idx.min() < 0 or idx.max() >= self.n_groups:
            raise ValueError(f"group indices must be in [0, {self.n_groups}), got {idx.tolist()}")
        if self._done[idx].any() or len(np.unique(idx)) != idx.size:
            raise ValueError(f"groups {idx[self._done[idx]].tolist()} already saved or repeated")
        for name, arr in arrays.items():
            if name == "groups" or len(arr) != idx.size:
                raise ValueError(f"array {name!r} must have {idx.size} rows (one per group)")
        existing = [int(p.stem.split("-")[1]) for p in self._batches()]
        path = self.dir / f"batch-{max(existing, default=-1) + 1:06d}.npz"
        with atomic_file(path) as f:
            np.savez(f, groups=idx, **arrays)
        self._done[idx] = True
        return path

    def load(self, name: str = "images") -> np.ndarray:
        """(n_groups, ...) array ``name`` in group order; all groups must be done."""
        if not self._done.all():
            raise MedVeilError(f"{self.dir}: {int((~self._done).sum())} groups not finished yet")
        out: np.ndarray | None = None
        for path in self._batches():
            idx, arr = self._read(path, "groups"), self._read(path, name)
            if out is None:
                out = np.empty((self.n_groups, *arr.shape[1:]), dtype=arr.dtype)
            out[idx] = arr
        assert out is not None
        return out

    def clear(self) -> None:
        """Delete OUT/.work (call after :func:`write_release` succeeded)."""
        shutil.rmtree(self.dir, ignore_errors=True)

    def _batches(self) -> list[Path]:
        return sorted(self.dir.glob("batch-*.npz"))

    def _read(self, path: Path, name: str) -> np.ndarray:
        try:
            with np.load(path, allow_pickle=False) as data:
                return data[name]
        except KeyError:
            raise DataError(f"{path}: has no array {name!r}") from None
        except (OSError, ValueError, EOFError) as err:
            raise DataError(f"{path}: corrupt ({err}); delete it to recompute its groups") from None


# ----------------------------------------------------------------------------- internals


def _check_inputs(images: np.ndarray, groups: Sequence[Sequence[Hashable]],
                  labels: Mapping[Hashable, int], class_names: Sequence[str], k: int,
                  patient_ids: Mapping[Hashable, Hashable] | None) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
        raise MedVeilError(f"release images must be uint8 (G,H,W,1|3), got {images.dtype} "
                           f"{images.shape}")
    if len(images) != len(groups) or not len(groups):
        raise MedVeilError(f"{len(images)} images for {len(groups)} groups; need one per group")
    require_k(k)
    members = [m for g in groups for m in g]
    if len({str(m) for m in members}) != len(set(members)):
        raise MedVeilError("two different member ids print the same; ids must be distinct as text")
    for m in members:
        if m not in labels:
            raise MedVeilError(f"member {m} has no label")
        if not 0 <= int(labels[m]) < len(class_names):
            raise MedVeilError(f"member {m} has label {labels[m]} outside the "
                               f"{len(class_names)} classes")
        if patient_ids is not None and m not in patient_ids:
            raise MedVeilError(f"member {m} has no patient id")
    problems = [p for ps in group_problems(groups, k, patient_ids).values() for p in ps]
    if problems:
        raise MedVeilError(f"refusing to write a release that is not {k}-anonymous: {problems[0]}"
                           f" ({len(problems)} problems)")


def report_is_complete(report_path: Path) -> bool:
    """Whether a release's (or an anonymize run's) report says ``"complete": true``."""
    try:
        return json.loads(report_path.read_text()).get("complete") is True
    except (OSError, ValueError, AttributeError):
        return False


def _random_names(n: int, seed: int | None) -> list[str]:
    rng = random.Random(f"medveil-release-{seed}") if seed is not None else None
    names: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        name = f"{rng.getrandbits(128):032x}" if rng else secrets.token_hex(16)
        if name not in names:
            names.add(name)
            out.append(f"{name}.png")
    return out


def _write_png(path: Path, image: np.ndarray) -> None:
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)


def _fractions(members: Sequence[Hashable], labels: Mapping[Hashable, int], n_classes: int
               ) -> np.ndarray:
    counts = np.bincount([int(labels[m]) for m in members], minlength=n_classes)
    return counts / counts.sum()


def _write_labels(path: Path, names: list[str], groups: Sequence[Sequence[Hashable]],
                  labels: Mapping[Hashable, int], class_names: Sequence[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "label", *[f"frac_{c}" for c in class_names]])
        for g in sorted(range(len(names)), key=names.__getitem__):
            frac = _fractions(groups[g], labels, len(class_names))
            # majority label; ties go to the lower class index
            writer.writerow([names[g], int(frac.argmax()), *[f"{x:.6g}" for x in frac]])


def _write_audit(path: Path, names: list[str], groups: Sequence[Sequence[Hashable]],
                 labels: Mapping[Hashable, int],
                 patient_ids: Mapping[Hashable, Hashable] | None) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        patient_col = ["patient_id"] if patient_ids is not None else []
        writer.writerow(["file", "member_id", *patient_col, "label"])
        for g in sorted(range(len(names)), key=names.__getitem__):
            for m in sorted(groups[g], key=str):
                patient = [patient_ids[m]] if patient_ids is not None else []
                writer.writerow([names[g], m, *patient, int(labels[m])])


def _report(extra: Mapping[str, Any] | None, groups: Sequence[Sequence[Hashable]],
            labels: Mapping[Hashable, int], class_names: Sequence[str], k: int,
            patient_ids: Mapping[Hashable, Hashable] | None) -> dict[str, Any]:
    people = [len(set(g)) if patient_ids is None else len({patient_ids[m] for m in g})
              for g in groups]
    return {
        **(extra or {}),
        "k": int(k),
        "group_by": "image" if patient_ids is None else "patient",
        "n_images": len(groups),
        "n_members": sum(len(g) for g in groups),
        "n_patients": None if patient_ids is None else len({patient_ids[m] for g in groups
                                                            for m in g}),
        "people_per_image": {"min": min(people), "max": max(people)},
        "class_names": list(class_names),
        "label_counts": np.bincount([int(labels[m]) for g in groups for m in g],
                                    minlength=len(class_names)).tolist(),
        "layout": {"release": "release/", "audit": "audit/groups.csv"},
        "audit_note": AUDIT_NOTE,
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "complete": True,
    }
