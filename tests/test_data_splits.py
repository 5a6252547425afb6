"""Deterministic stratified / patient-grouped splits, the unlabelled hold-out, duplicate groups."""

from __future__ import annotations

import numpy as np
import pytest

from medveil.data import load_dataset
from medveil.data.duplicates import (duplicate_groups, exact_hashes, hamming, merge_groups,
                                     perceptual_hashes)
from medveil.data.samples import sample_path
from medveil.data.splits import hold_out_unlabelled, resplit, split_indices
from medveil.errors import ConfigError


def patients_and_labels(n_patients: int = 200, per_patient: int = 5, seed: int = 0):
    """Each patient has one label (imbalanced 50/25/15/10 %) and per_patient images."""
    rng = np.random.default_rng(seed)
    patient_label = rng.choice(4, size=n_patients, p=[0.5, 0.25, 0.15, 0.1])
    patients = np.repeat(np.arange(n_patients), per_patient)
    return patient_label[patients], np.char.add("p", patients.astype(str))


def test_stratified_split_sizes_classes_and_determinism():
    labels, _ = patients_and_labels()
    parts = split_indices(labels, val=0.1, test=0.2, seed=3)
    sizes = {k: len(v) for k, v in parts.items()}
    assert sizes == {"train": 700, "val": 100, "test": 200}
    assert len(np.unique(np.concatenate(list(parts.values())))) == 1000  # a partition
    overall = np.bincount(labels, minlength=4) / len(labels)
    for idx in parts.values():
        assert np.abs(np.bincount(labels[idx], minlength=4) / len(idx) - overall).max() < 0.02
    again = split_indices(labels, val=0.1, test=0.2, seed=3)
    assert all(np.array_equal(parts[k], again[k]) for k in parts)
    other = split_indices(labels, val=0.1, test=0.2, seed=4)
    assert not np.array_equal(parts["test"], other["test"])


def test_grouped_split_keeps_each_patient_in_one_split():
    labels, patients = patients_and_labels()
    parts = split_indices(labels, val=0.1, test=0.2, groups=patients, seed=0)
    seen = [set(patients[idx]) for idx in parts.values()]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert sum(len(v) for v in parts.values()) == len(labels)
    assert len(parts["test"]) == 200 and len(parts["val"]) == 100  # whole patients of 5 fit
    overall = np.bincount(labels, minlength=4) / len(labels)
    for idx in parts.values():  # stratification roughly kept
        assert np.abs(np.bincount(labels[idx], minlength=4) / len(idx) - overall).max() < 0.05
    again = split_indices(labels, val=0.1, test=0.2, groups=patients, seed=0)
    assert all(np.array_equal(parts[k], again[k]) for k in parts)


def test_grouped_split_meets_a_fraction_that_folds_miss():
    """0.18 of 3662 is 662; one of round(1/0.18) = 6 folds would hold ~610. Mostly single
    images, some duplicate groups of 2-3, imbalanced labels (like APTOS)."""
    rng = np.random.default_rng(1)
    labels = rng.choice(5, size=3662, p=[0.49, 0.10, 0.27, 0.05, 0.09])
    groups = np.arange(3662)
    groups[rng.choice(3662, 300, replace=False)] = rng.choice(3662, 300)  # copies join a group
    parts = split_indices(labels, val=0.0, test=662 / 3662, groups=groups, seed=0)
    assert len(parts["test"]) == 662 and len(parts["train"]) == 3000
    assert not set(groups[parts["test"]]) & set(groups[parts["train"]])
    overall = np.bincount(labels, minlength=5) / len(labels)
    assert np.abs(np.bincount(labels[parts["test"]], minlength=5) / 662 - overall).max() < 0.005
    again = split_indices(labels, val=0.0, test=662 / 3662, groups=groups, seed=0)
    assert np.array_equal(parts["test"], again["test"])
    # groups too big to fill the gap exactly: as close as whole groups allow, never split
    big = np.repeat(np.arange(10), 10)  # 10 patients x 10 images, 18% = 18 items
    part = split_indices(np.repeat(np.arange(2), 50), val=0.0, test=0.18, groups=big, seed=0)
    assert len(part["test"]) in (10, 20)
    assert not set(big[part["test"]]) & set(big[part["train"]])


def test_hold_out_unlabelled_pool():
    labels, patients = patients_and_labels()
    kept, pool = hold_out_unlabelled(labels, 0.25, seed=0)
    assert len(pool) == 250 and len(kept) == 750 and not set(kept) & set(pool)
    kept_g, pool_g = hold_out_unlabelled(labels, 0.25, groups=patients, seed=0)
    assert not set(patients[kept_g]) & set(patients[pool_g])
    assert len(pool_g) == 250
    assert hold_out_unlabelled(labels, 0.0)[1].size == 0
    with pytest.raises(ConfigError):
        hold_out_unlabelled(labels, 1.0)


def test_resplit_dataset_by_patient_keeps_images_lazy():
    ds = load_dataset(sample_path("breastmnist"))
    train = ds.split("train")
    train.patient_ids = np.char.add("p", (np.arange(len(train)) // 3).astype(str))
    new = resplit(ds, val=0.2, test=0.2, seed=0)
    assert list(new.splits) == ["train", "val", "test"]
    assert sum(len(s) for s in new.splits.values()) == len(train)
    assert not set(new.split("train").patient_ids) & set(new.split("test").patient_ids)
    test = new.split("test")
    assert test._images is None
    np.testing.assert_array_equal(test.images, train.images[np.isin(train.patient_ids, test.patient_ids)])


def test_merge_groups_joins_patients_and_duplicates():
    patients = np.array(["a", "a", "b", "c", "d"])
    dupes = np.array([0, 1, 2, 2, 3])  # image 2 and 3 are the same photograph
    assert merge_groups(patients, dupes).tolist() == [0, 0, 1, 1, 2]
    assert merge_groups(patients, None).tolist() == [0, 0, 1, 2, 3]


def test_duplicate_groups_exact_and_reencoded_copies():
    images = load_dataset(sample_path("bloodmnist")).split("test").images[:40].copy()
    noisy = np.clip(images[5].astype(int) + np.random.default_rng(0).integers(-2, 3, images[5].shape),
                    0, 255).astype(np.uint8)
    batch = np.concatenate([images, images[[3]], noisy[None]])  # 40: copy of 3, 41: ~copy of 5
    groups = duplicate_groups(batch)
    assert groups[40] == groups[3] and groups[41] == groups[5]
    assert len(np.unique(groups)) == 40
    exact = duplicate_groups(batch, min_similarity=None)
    assert exact[40] == exact[3] and exact[41] != exact[5]
    hashes = exact_hashes(batch)
    assert hashes[40] == hashes[3] and hashes[41] != hashes[5]
    ph = perceptual_hashes(batch)
    assert ph.dtype == np.uint64 and hamming(ph[40], ph[3]) == 0


def test_aptos_duplicates_found(aptos_dir):
    ds = load_dataset(aptos_dir)
    train = ds.split("train")
    wanted = ["00cb6555d108", "ca25745942b0",  # pixel-identical copies
              "16ce555748d8", "4d9fc85a8259",  # the same photograph re-encoded
              "000c1434d8d7", "001639a390f0", "0024cdab0c1e"]
    idx = np.array([int(np.flatnonzero(train.ids == i)[0]) for i in wanted])
    groups = duplicate_groups(train.subset(idx).images)
    assert groups[0] == groups[1] and groups[2] == groups[3]
    assert len(np.unique(groups)) == 5
