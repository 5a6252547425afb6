"""Check a release folder before it is shared: ``verify_release(OUT) -> VerifyReport``.

Reads ``OUT/audit/groups.csv`` (file, member_id[, patient_id][, label]),
``OUT/release/labels.csv`` (file, label, frac_<class>...), ``OUT/release/images/`` and
``OUT/report.json`` (layout: :mod:`medveil.anonymize.release`). Missing release/audit files
are bad input (:class:`DataError`); everything else is a named check that passes or fails.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from medveil.anonymize.grouping import RELEASE_MIN_K, group_problems
from medveil.anonymize.release import REPORT
from medveil.errors import DataError

HEX = re.compile(r"[0-9a-f]+", re.IGNORECASE)
SHOWN = 3  # problems quoted per failing check


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class VerifyReport:
    out_dir: Path
    k: int | None
    n_images: int
    n_members: int
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def table(self) -> str:
        width = max(len(c.name) for c in self.checks)
        lines = [f"{self.out_dir}: k={self.k}, {self.n_images} images, {self.n_members} members",
                 f"{'check':<{width}}  verdict  detail", f"{'-' * width}  -------  ------"]
        lines += [f"{c.name:<{width}}  {'PASS' if c.passed else 'FAIL':<7}  {c.detail}"
                  for c in self.checks]
        verdict = ("PASS: release is complete and k-anonymous" if self.passed else
                   "FAIL: " + ", ".join(c.name for c in self.failed))
        return "\n".join([*lines, verdict])

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "k": self.k, "passed": self.passed,
                "n_images": self.n_images, "n_members": self.n_members,
                "checks": [vars(c) for c in self.checks]}


def verify_release(out_dir: str | Path, k: int | None = None) -> VerifyReport:
    """Run every check on ``out_dir``; ``k`` overrides the k recorded in report.json."""
    out = Path(out_dir)
    images_dir, labels_csv = out / "release" / "images", out / "release" / "labels.csv"
    groups_csv = out / "audit" / "groups.csv"
    if not out.is_dir():
        raise DataError(f"{out}: no such folder")
    for path, what in ((images_dir, "release images"), (labels_csv, "release labels"),
                       (groups_csv, "audit")):
        if not path.exists():
            raise DataError(f"{path}: missing {what}; {out} is not a complete release folder")

    report, report_check = _report(out / REPORT)
    if k is None and isinstance(report, dict) and isinstance(report.get("k"), int):
        k = report["k"]
    audit_cols, audit = _read_csv(groups_csv, ("file", "member_id"))
    label_cols, label_rows = _read_csv(labels_csv, ("file", "label"))
    members_of: dict[str, list[str]] = defaultdict(list)  # release file -> member ids
    for row in audit:
        members_of[row["file"]].append(row["member_id"])
    members = {m for ms in members_of.values() for m in ms}
    patient_of, conflicts = _patients(audit) if "patient_id" in audit_cols else (None, [])
    patients = set(patient_of.values()) if patient_of is not None else set()
    pngs = sorted(p.name for p in images_dir.iterdir() if p.suffix == ".png" and p.is_file())

    problems = group_problems(list(members_of.values()), k or 1, patient_of,
                              names=list(members_of), subject_word="patient")
    checks = [
        report_check,
        _k_check(k, members_of, patient_of, problems["k_anonymous"]),
        _check("members disjoint", problems["members_disjoint"],
               f"{len(members)} members, each in one group"),
    ]
    if patient_of is not None:
        checks.append(_check("patients disjoint", conflicts + problems["subjects_disjoint"],
                             f"{len(patients)} patients, each in one group"))
    checks += [
        _same_files("audit matches images", "audit/groups.csv", set(members_of), set(pngs)),
        _labels_match(label_rows, pngs),
        _labels_valid(label_cols, label_rows, audit if "label" in audit_cols else None),
        _no_ids(members | patients, pngs, label_cols, label_rows),
        _release_clean(out / "release"),
        _images_readable(images_dir, pngs),
    ]
    return VerifyReport(out, k, len(pngs), len(members), checks)


# ----------------------------------------------------------------------------- checks


def _check(name: str, problems: list[str], ok_detail: str) -> Check:
    if not problems:
        return Check(name, True, ok_detail)
    more = f" (+{len(problems) - SHOWN} more)" if len(problems) > SHOWN else ""
    return Check(name, False, "; ".join(problems[:SHOWN]) + more)


def _report(path: Path) -> tuple[Any, Check]:
    name = "report complete"
    if not path.is_file():
        return None, Check(name, False, f"{REPORT} missing: the run did not finish")
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None, Check(name, False, f"{REPORT} is not readable JSON")
    if not isinstance(report, dict) or report.get("complete") is not True:
        return report, Check(name, False, f'{REPORT} does not say "complete": true')
    return report, Check(name, True, f"written {report.get('written_at', '?')}")


def _k_check(k: int | None, members_of: dict[str, list[str]],
             patient_of: dict[str, str] | None, problems: list[str]) -> Check:
    if k is None:
        return Check("k-anonymous", False, f"k unknown ({REPORT} has no k; pass --k)")
    if k < RELEASE_MIN_K:
        return Check("k-anonymous", False, f"k must be >= {RELEASE_MIN_K}, got {k}")
    if not members_of:
        return Check("k-anonymous", False, "audit lists no groups")
    people = [len(set(ms) if patient_of is None else {patient_of[m] for m in ms})
              for ms in members_of.values()]
    unit = "members" if patient_of is None else "patients"
    return _check("k-anonymous", problems, f"every image has >= {k} distinct {unit} "
                  f"(min {min(people)}, max {max(people)})")


def _same_files(name: str, where: str, listed: set[str], pngs: set[str]) -> Check:
    problems = [f"{f} in {where} but not in release/images" for f in sorted(listed - pngs)]
    problems += [f"{f} in release/images but not in {where}" for f in sorted(pngs - listed)]
    return _check(name, problems, f"{len(pngs)} images, all listed")


def _labels_match(rows: list[dict[str, str]], pngs: list[str]) -> Check:
    files = [r["file"] for r in rows]
    dupes = sorted(f for f, n in Counter(files).items() if n > 1)
    check = _same_files("labels match images", "labels.csv", set(files), set(pngs))
    if dupes:
        return Check(check.name, False,
                     f"files listed twice in labels.csv: {', '.join(dupes[:SHOWN])}")
    return check


def _labels_valid(cols: list[str], rows: list[dict[str, str]],
                  audit: list[dict[str, str]] | None) -> Check:
    classes = [c for c in cols if c.startswith("frac_")]
    extra = [c for c in cols if c not in ("file", "label") and not c.startswith("frac_")]
    if extra or not classes:
        return Check("labels valid", False, f"labels.csv columns must be file, label, frac_<class>"
                     f"...; got {', '.join(cols)}")
    audit_labels: dict[str, list[int]] = defaultdict(list)
    for row in audit or []:
        audit_labels[row["file"]].append(int(row["label"]) if row["label"].isdigit() else -1)
    problems = []
    for row in rows:
        try:
            label, frac = int(row["label"]), np.array([float(row[c]) for c in classes])
        except (TypeError, ValueError):
            problems.append(f"{row['file']}: label/fractions are not numbers")
            continue
        if not 0 <= label < len(classes) or (frac < 0).any() or abs(frac.sum() - 1) > 1e-3:
            problems.append(f"{row['file']}: label {label} / fractions {frac.tolist()} invalid")
        elif frac[label] < frac.max():
            problems.append(f"{row['file']}: label {label} is not the majority class")
        elif audit is not None:
            truth = np.bincount([x for x in audit_labels[row["file"]] if 0 <= x < len(classes)],
                                minlength=len(classes))
            if truth.sum() == 0 or np.abs(truth / truth.sum() - frac).max() > 1e-4:
                problems.append(f"{row['file']}: fractions differ from its members' labels")
    return _check("labels valid", problems, f"{len(rows)} rows, {len(classes)} classes, "
                  "majority labels" + (", match the audit" if audit is not None else ""))


def _no_ids(ids: set[str], pngs: list[str], cols: list[str], rows: list[dict[str, str]]) -> Check:
    """No member/patient id as a name token (any id) or substring (ids that cannot occur by
    chance in random hex: non-hex characters or >= 10 characters) of any released text."""
    tokens = {i.lower() for i in ids}
    long_ids = sorted((i for i in ids if len(i) >= 10 or not HEX.fullmatch(i)), key=len,
                      reverse=True)
    pattern = re.compile("|".join(map(re.escape, long_ids)), re.IGNORECASE) if long_ids else None

    def leak(text: str) -> str | None:
        for tok in re.split(r"[^0-9A-Za-z]+", text):
            if tok.lower() in tokens:
                return tok
        found = pattern.search(text) if pattern else None
        return found.group(0) if found else None

    n_classes = sum(c.startswith("frac_") for c in cols)
    problems = [f"file name {p} contains id {hit}" for p in pngs
                if (hit := leak(Path(p).stem))]
    for i, row in enumerate(rows, start=2):
        for col, cell in row.items():
            if col == "label" and cell.isdigit() and int(cell) < n_classes:
                continue
            if col.startswith("frac_") and _is_float(cell):
                continue
            if hit := leak(Path(cell).stem if col == "file" else str(cell)):
                problems.append(f"labels.csv line {i} column {col} contains id {hit}")
    return _check("no ids in release", problems,
                  f"none of {len(ids)} member/patient ids in file names or labels.csv")


def _release_clean(release: Path) -> Check:
    allowed = {release / "images", release / "labels.csv"}
    problems = [f"unexpected {p.relative_to(release)}" for p in sorted(release.rglob("*"))
                if p not in allowed and not (p.parent == release / "images" and p.suffix == ".png"
                                             and p.is_file())]
    return _check("release clean", problems, "only images/*.png and labels.csv")


def _images_readable(images_dir: Path, pngs: list[str]) -> Check:
    problems, sizes = [], set()
    for name in pngs:
        try:
            with Image.open(images_dir / name) as im:
                im.verify()
                sizes.add(f"{im.width}x{im.height} {im.mode}")
        except (OSError, UnidentifiedImageError, SyntaxError) as err:
            problems.append(f"{name}: {type(err).__name__}")
    return _check("images readable", problems, f"{len(pngs)} PNG ({', '.join(sorted(sizes))})")


# ----------------------------------------------------------------------------- reading


def _read_csv(path: Path, required: tuple[str, ...]) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            cols = list(reader.fieldnames or [])
            missing = [c for c in required if c not in cols]
            if missing:
                raise DataError(f"{path}: missing column(s) {', '.join(missing)} (has "
                                f"{', '.join(cols) or 'no header'})")
            rows = []
            for line, row in enumerate(reader, start=2):
                if None in row or any(v is None for v in row.values()):
                    raise DataError(f"{path}: line {line} does not have {len(cols)} columns")
                row = {c: v.strip() for c, v in row.items()}
                empty = [c for c in (*required, *(["patient_id"] if "patient_id" in cols else []))
                         if not row[c]]
                if empty:
                    raise DataError(f"{path}: line {line} has an empty {empty[0]}")
                rows.append(row)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: unreadable CSV ({err})") from None
    return cols, rows


def _patients(audit: list[dict[str, str]]) -> tuple[dict[str, str], list[str]]:
    """member -> patient from the audit rows, and any member given two patient ids."""
    patient_of: dict[str, str] = {}
    conflicts = []
    for row in audit:
        member, patient = row["member_id"], row["patient_id"]
        if patient_of.setdefault(member, patient) != patient:
            conflicts.append(f"member {member} has patient ids {patient_of[member]} and {patient}")
    return patient_of, conflicts


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
