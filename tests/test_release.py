"""Release writer (atomic, resumable), verify-release checks and CLI exit codes."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from medveil.anonymize import release as release_mod
from medveil.anonymize.grouping import make_groups
from medveil.anonymize.release import ReleaseState, groups_to_members, write_release
from medveil.anonymize.verify import verify_release
from medveil.cli import main as cli_main
from medveil.errors import ConfigError, DataError, MedVeilError

K = 3
CLASSES = ["grade 0", "grade 1", "grade 2", "grade 3", "grade 4"]


def _cohort(n: int = 22, seed: int = 0, patients: bool = True):
    """n members with APTOS-like hex ids, labels, and patients owning 1-2 images each."""
    rng = np.random.default_rng(seed)
    ids = [f"{int(x):012x}" for x in rng.integers(2**40, 2**47, size=n)]
    labels = dict(zip(ids, rng.integers(0, len(CLASSES), size=n).tolist()))
    pid = [f"P{i // 2:03d}" for i in range(n)] if patients else None  # both eyes of a person
    latents = rng.normal(size=(n, 4, 8))
    groups = make_groups(latents, K, "greedy", seed=seed, subject_ids=pid)
    members = groups_to_members(groups, ids)
    images = rng.integers(0, 256, size=(len(members), 8, 8, 3), dtype=np.uint8)
    return images, members, labels, (dict(zip(ids, pid)) if pid else None)


def _write(out: Path, patients: bool = True, **kw) -> release_mod.ReleaseResult:
    images, members, labels, pids = _cohort(patients=patients)
    return write_release(out, images, members, labels, CLASSES, K, pids, {"seed": 0}, quiet=True,
                         **kw)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _save_rows(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _cli(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(cli_main, "COMMAND_MODULES", ("anonymize_cmd",))  # this command alone
    return cli_main.main(argv)


def _failed(out: Path) -> set[str]:
    return {c.name for c in verify_release(out).failed}


# ----------------------------------------------------------------------------- writer


def test_good_release_layout_and_contents(tmp_path: Path) -> None:
    images, members, labels, pids = _cohort()
    res = write_release(tmp_path, images, members, labels, CLASSES, K, pids, {"seed": 0},
                        quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit", "release", "report.json"]
    pngs = sorted(p.name for p in (tmp_path / "release" / "images").iterdir())
    assert pngs == sorted(res.files) and len(pngs) == len(members)
    assert all(re.fullmatch(r"[0-9a-f]{32}\.png", n) for n in pngs)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["complete"] is True and report["k"] == K and report["group_by"] == "patient"
    assert report["n_members"] == 22 and report["n_patients"] == 11 and report["seed"] == 0
    assert "keep audit/ apart" in (tmp_path / "audit" / "README.txt").read_text()
    assert "keep audit/ apart" in report["audit_note"]

    # images, labels and audit line up with the groups they came from
    rows = {r["file"]: r for r in _rows(tmp_path / "release" / "labels.csv")}
    audit = _rows(tmp_path / "audit" / "groups.csv")
    assert len(audit) == 22 and set(audit[0]) == {"file", "member_id", "patient_id", "label"}
    for name, image, group in zip(res.files, images, members):
        from PIL import Image
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "release/images" / name)),
                                      image)
        frac = np.bincount([labels[m] for m in group], minlength=5) / len(group)
        np.testing.assert_allclose([float(rows[name][f"frac_{c}"]) for c in CLASSES], frac,
                                   atol=1e-6)
        assert int(rows[name]["label"]) == int(frac.argmax())
        assert {r["member_id"] for r in audit if r["file"] == name} == set(group)
    assert list(rows) == sorted(rows)  # rows in random-name order, not group order
    assert verify_release(tmp_path).passed


def test_names_are_random_or_seeded_never_ids(tmp_path: Path) -> None:
    a = _write(tmp_path / "a", seed=4).files
    b = _write(tmp_path / "b", seed=4).files
    c = _write(tmp_path / "c").files
    d = _write(tmp_path / "d").files
    assert a == b and set(c).isdisjoint(d) and set(a).isdisjoint(c)


def test_writer_refuses_what_is_not_k_anonymous(tmp_path: Path) -> None:
    images, members, labels, pids = _cohort()
    small = [list(members[0][: K - 1]), *members[1:]]
    with pytest.raises(MedVeilError, match="not 3-anonymous: group 0 has 2 distinct"):
        write_release(tmp_path, images, small, labels, CLASSES, K, None, quiet=True)
    twice = [members[0], [*members[1], members[0][0]], *members[2:]]
    with pytest.raises(MedVeilError, match=f"member {members[0][0]} is in group 0 and group 1"):
        write_release(tmp_path, images, twice, labels, CLASSES, K, pids, quiet=True)
    with pytest.raises(MedVeilError, match="images for"):
        write_release(tmp_path, images[:-1], members, labels, CLASSES, K, pids, quiet=True)
    with pytest.raises(MedVeilError, match="uint8"):
        write_release(tmp_path, images.astype(float), members, labels, CLASSES, K, quiet=True)
    bad_labels = {**labels, members[0][0]: 7}
    with pytest.raises(MedVeilError, match="label 7 outside the 5 classes"):
        write_release(tmp_path, images, members, bad_labels, CLASSES, K, quiet=True)
    assert not (tmp_path / "release").exists() and not (tmp_path / "report.json").exists()


def test_one_k_rule_for_release_anonymize_and_verify(tmp_path: Path) -> None:
    """A release stands for >= 2 people: the writer, ``anonymize``'s check and verify-release
    apply the same rule (the grouping algorithms alone accept k = 1)."""
    from medveil.anonymize.grouping import RELEASE_MIN_K
    from medveil.anonymize.pipeline import check_k

    images, members, labels, pids = _cohort()
    for bad in (1, 0, 2.0, True):
        with pytest.raises(MedVeilError, match=f"k must be an integer >= {RELEASE_MIN_K}"):
            write_release(tmp_path, images, members, labels, CLASSES, bad, pids, quiet=True)
        with pytest.raises(MedVeilError, match=f"k must be an integer >= {RELEASE_MIN_K}"):
            check_k(bad, 10, None)
    assert [len(g) for g in make_groups(np.zeros((3, 2)), 1, "greedy")] == [1, 1, 1]
    _write(tmp_path / "ok")
    assert not verify_release(tmp_path / "ok", k=1).passed


def test_overwrite_is_explicit_and_replaces_everything(tmp_path: Path) -> None:
    first = _write(tmp_path)
    with pytest.raises(MedVeilError, match="already holds a complete release"):
        _write(tmp_path)
    second = _write(tmp_path, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "release" / "images").iterdir()) == \
        sorted(second.files)
    assert set(first.files).isdisjoint(second.files)
    assert not list(tmp_path.glob(".partial-*")) and verify_release(tmp_path).passed


def test_crash_while_writing_images_leaves_nothing_that_looks_complete(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real, calls = release_mod._write_png, []

    def dying(path: Path, image: np.ndarray) -> None:
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the run is killed mid-write
        real(path, image)

    monkeypatch.setattr(release_mod, "_write_png", dying)
    with pytest.raises(KeyboardInterrupt):
        _write(tmp_path)
    assert not (tmp_path / "report.json").exists() and not (tmp_path / "release").exists()
    with pytest.raises(DataError, match="missing release images"):
        verify_release(tmp_path)
    assert _cli(["verify-release", str(tmp_path)], monkeypatch) == 2

    monkeypatch.setattr(release_mod, "_write_png", real)  # rerun finishes and cleans up
    _write(tmp_path)
    assert not list(tmp_path.glob(".partial-*")) and verify_release(tmp_path).passed


def test_crash_before_report_fails_verification(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path)

    def dying(path: Path, obj: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(release_mod, "write_json_atomic", dying)
    with pytest.raises(KeyboardInterrupt):
        _write(tmp_path, overwrite=True)
    assert not (tmp_path / "report.json").exists()
    report = verify_release(tmp_path)  # no report -> no k either
    assert [c.name for c in report.failed] == ["report complete", "k-anonymous"]
    assert "did not finish" in report.failed[0].detail and "k unknown" in report.failed[1].detail
    assert [c.name for c in verify_release(tmp_path, k=K).failed] == ["report complete"]
    assert _cli(["verify-release", str(tmp_path)], monkeypatch) == 1
    monkeypatch.undo()
    _write(tmp_path)  # an incomplete release is replaced without overwrite
    assert verify_release(tmp_path).passed


# ----------------------------------------------------------------------------- resume


def _anonymize(out: Path, n_groups: int, config: dict, die_after: int | None = None
               ) -> np.ndarray:
    """Stand-in for the per-group GAN work: deterministic per group, saved 2 groups a batch."""
    state = ReleaseState(out, n_groups, config)
    for batch_no, start in enumerate(range(0, len(state.pending()), 2)):
        if die_after is not None and batch_no == die_after:
            raise KeyboardInterrupt
        todo = state.pending()[:2]
        imgs = np.stack([np.random.default_rng([config["seed"], g]).integers(
            0, 256, (4, 4, 3), dtype=np.uint8) for g in todo])
        state.save(todo, images=imgs, latents=imgs.reshape(len(todo), -1).astype(np.float32))
    return state.load("images")


def test_release_state_resumes_where_it_stopped(tmp_path: Path) -> None:
    config = {"seed": 3, "k": K, "method": "greedy"}
    full = _anonymize(tmp_path / "ref", 7, config)
    with pytest.raises(KeyboardInterrupt):
        _anonymize(tmp_path / "run", 7, config, die_after=2)
    state = ReleaseState(tmp_path / "run", 7, config)
    assert state.done().tolist() == [True] * 4 + [False] * 3 and state.pending() == [4, 5, 6]
    with pytest.raises(MedVeilError, match="3 groups not finished"):
        state.load()
    resumed = _anonymize(tmp_path / "run", 7, config)
    np.testing.assert_array_equal(resumed, full)
    assert ReleaseState(tmp_path / "run", 7, config).load("latents").shape == (7, 48)
    with pytest.raises(ValueError, match="already saved"):
        state.save([0], images=full[:1])
    with pytest.raises(ConfigError, match=r"another config: config\.seed \(3 there, 4 here\)"):
        ReleaseState(tmp_path / "run", 7, {**config, "seed": 4})
    state.clear()
    assert not (tmp_path / "run" / ".work").exists()


def test_release_state_reports_a_corrupt_batch(tmp_path: Path) -> None:
    state = ReleaseState(tmp_path, 2, {"seed": 0})
    path = state.save([0], images=np.zeros((1, 2, 2, 1), np.uint8))
    path.write_bytes(b"not an npz")
    with pytest.raises(DataError, match=r"batch-000000\.npz: corrupt"):
        ReleaseState(tmp_path, 2, {"seed": 0})


# ----------------------------------------------------------------------------- verify


@pytest.fixture()
def good(tmp_path: Path) -> Path:
    _write(tmp_path / "pat")
    return tmp_path / "pat"


def test_verify_passes_and_cli_exit_0(good: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    report = verify_release(good)
    assert report.passed and report.k == K and report.n_images == 3 and report.n_members == 22
    assert {c.name for c in report.checks} >= {"k-anonymous", "members disjoint",
                                                "patients disjoint", "no ids in release"}
    assert _cli(["verify-release", str(good), "--json", str(good.parent / "v.json")],
                monkeypatch) == 0
    out = capsys.readouterr()
    assert "PASS: release is complete and k-anonymous" in out.out and "keep audit/" in out.err
    assert json.loads((good.parent / "v.json").read_text())["passed"] is True


def test_group_with_k_minus_1_patients_fails(good: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    audit = _rows(good / "audit" / "groups.csv")
    people: dict[str, set[str]] = {}
    for r in audit:
        people.setdefault(r["file"], set()).add(r["patient_id"])
    file = next(f for f, ps in sorted(people.items()) if len(ps) == K)
    victim = sorted(people[file])[0]
    kept = [r for r in audit if not (r["file"] == file and r["patient_id"] == victim)]
    _save_rows(good / "audit" / "groups.csv", kept)
    assert "k-anonymous" in _failed(good)
    assert _cli(["verify-release", str(good)], monkeypatch) == 1
    err = capsys.readouterr().err
    assert f"check failed: k-anonymous: {file} has 2 distinct patients < k=3" in err


def test_image_level_release_with_k_minus_1_members_fails(tmp_path: Path) -> None:
    _write(tmp_path, patients=False)
    audit = _rows(tmp_path / "audit" / "groups.csv")
    assert "patient_id" not in audit[0]
    file = audit[0]["file"]
    n = sum(r["file"] == file for r in audit)
    drop = {r["member_id"] for r in audit if r["file"] == file}
    drop = set(sorted(drop)[: n - (K - 1)])
    _save_rows(tmp_path / "audit" / "groups.csv",
               [r for r in audit if not (r["file"] == file and r["member_id"] in drop)])
    report = verify_release(tmp_path)
    assert {c.name for c in report.failed} == {"k-anonymous", "labels valid"}
    assert f"{file} has 2 distinct members < k=3" in report.failed[0].detail


def test_member_in_two_groups_fails(good: Path) -> None:
    audit = _rows(good / "audit" / "groups.csv")
    other = next(r["file"] for r in audit if r["file"] != audit[0]["file"])
    _save_rows(good / "audit" / "groups.csv", [*audit, {**audit[0], "file": other}])
    assert {"members disjoint", "patients disjoint"} <= _failed(good)


@pytest.mark.parametrize("pattern", ["img_{}.png", "{}.png", "x{}y.png"])
def test_member_id_in_a_file_name_fails(good: Path, pattern: str) -> None:
    audit = _rows(good / "audit" / "groups.csv")
    old, member = audit[0]["file"], audit[0]["member_id"]
    new = pattern.format(member)
    (good / "release" / "images" / old).rename(good / "release" / "images" / new)
    for path in (good / "audit" / "groups.csv", good / "release" / "labels.csv"):
        _save_rows(path, [{**r, "file": new if r["file"] == old else r["file"]}
                          for r in _rows(path)])
    report = verify_release(good)
    assert [c.name for c in report.failed] == ["no ids in release"]
    assert f"contains id {member}" in report.failed[0].detail


def test_numeric_ids_give_no_false_alarms(tmp_path: Path) -> None:
    # MedMNIST-style members: row numbers 0..N-1, small integer patient ids, labels 0..4
    images, members, labels, pids = _cohort()
    as_int = {m: i for i, m in enumerate(labels)}
    members = [[as_int[m] for m in g] for g in members]
    labels = {as_int[m]: v for m, v in labels.items()}
    pids = {as_int[m]: int(p[1:]) for m, p in pids.items()}
    write_release(tmp_path, images, members, labels, CLASSES, K, pids, quiet=True)
    assert verify_release(tmp_path).passed


def test_member_with_two_patient_ids_fails(good: Path) -> None:
    audit = _rows(good / "audit" / "groups.csv")
    _save_rows(good / "audit" / "groups.csv", [*audit, {**audit[0], "patient_id": "P999"}])
    report = verify_release(good)
    assert {c.name for c in report.failed} == {"patients disjoint", "labels valid"}
    assert "has patient ids" in report.failed[0].detail


def test_patient_id_in_labels_csv_fails(good: Path) -> None:
    rows = _rows(good / "release" / "labels.csv")
    pid = _rows(good / "audit" / "groups.csv")[0]["patient_id"]
    _save_rows(good / "release" / "labels.csv", [{**r, "source": f"from {pid}"} for r in rows])
    assert {"no ids in release", "labels valid"} <= _failed(good)


def test_missing_audit_is_bad_input(good: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    (good / "audit" / "groups.csv").unlink()
    with pytest.raises(DataError, match="missing audit"):
        verify_release(good)
    assert _cli(["verify-release", str(good)], monkeypatch) == 2
    assert "medveil: error:" in capsys.readouterr().err
    assert _cli(["verify-release", str(good / "nope")], monkeypatch) == 2


@pytest.mark.parametrize(
    ("damage", "fails"),
    [
        (lambda d: shutil.copy(d / "audit/groups.csv", d / "release/groups.csv"),
         {"release clean"}),
        (lambda d: (d / "report.json").write_text('{"complete": false, "k": 3}'),
         {"report complete"}),
        (lambda d: shutil.copy(next((d / "release/images").iterdir()),
                               d / "release/images/0123456789abcdef0123456789abcdef.png"),
         {"audit matches images", "labels match images"}),
        (lambda d: next((d / "release/images").iterdir()).write_bytes(b"broken"),
         {"images readable"}),
    ],
)
def test_other_damage_is_caught(good: Path, damage, fails: set[str]) -> None:
    damage(good)
    assert _failed(good) == fails


def test_required_k_can_be_raised(good: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert verify_release(good, k=2).passed
    assert {c.name for c in verify_release(good, k=4).failed} == {"k-anonymous"}
    assert _cli(["verify-release", str(good), "--k", "4"], monkeypatch) == 1


def test_bad_csv_is_a_one_line_error(good: Path) -> None:
    (good / "audit" / "groups.csv").write_text("file,who\na.png,x\n")
    with pytest.raises(DataError, match=r"groups\.csv: missing column\(s\) member_id"):
        verify_release(good)
    (good / "audit" / "groups.csv").write_text("file,member_id\na.png,\n")
    with pytest.raises(DataError, match=r"line 2 has an empty member_id"):
        verify_release(good)
