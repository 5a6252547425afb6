"""DICOM reader on the test files pydicom ships (CT, MR, US colour, truncated MR)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from medveil.data import load_dataset
from medveil.data.dicom import dicom_header, dicom_pixels
from medveil.errors import DataError

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402


def dicom_file(name: str) -> Path:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} not available offline")
    return Path(path)


def test_single_ct_file_modality_patient_and_pixels():
    ds = load_dataset(dicom_file("CT_small.dcm"))
    assert ds.modality == "CT" and ds.source_kind == "DICOM"
    split = ds.split("train")
    assert split.patient_ids.tolist() == ["1CT1"] and split.ids.tolist() == ["CT_small"]
    assert ds.image_shape == (128, 128, 1)
    img = split.images
    assert img.shape == (1, 128, 128, 1) and img.dtype == np.uint8
    assert img.min() == 0 and img.max() == 255  # no window in the file -> min-max


def test_windowing_uses_file_window_or_the_callers():
    mr = dicom_file("MR_small.dcm")  # carries WindowCenter 600 / WindowWidth 1600
    raw = pydicom.dcmread(mr).pixel_array.astype(float)
    lo, hi = 600 - 800, 600 + 800
    expected = np.rint(np.clip((raw - lo) / (hi - lo), 0, 1) * 255)
    np.testing.assert_array_equal(dicom_pixels(mr), expected.astype(np.uint8))
    c = float(np.median(raw))
    narrow = dicom_pixels(mr, window=(c, 10.0))  # everything outside c +- 5 saturates
    assert np.all(narrow[raw <= c - 5] == 0) and np.all(narrow[raw >= c + 5] == 255)


def test_folder_of_mixed_dicom_and_labels_csv(tmp_path):
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(dicom_file(name), tmp_path / name)
    (tmp_path / "scans").mkdir()
    shutil.copy(dicom_file("examples_rgb_color.dcm"), tmp_path / "scans" / "us.dcm")
    plain = load_dataset(tmp_path)
    assert plain.class_names == ["unlabelled"] and len(plain.split("train")) == 3
    assert set(plain.modality.split("/")) == {"CT", "MR", "US"}
    assert plain.split("train").images.shape[-1] == 1  # grey is the majority

    (tmp_path / "labels.csv").write_text("file,label\nCT_small,tumour\nMR_small,normal\n")
    labelled = load_dataset(tmp_path, size=32)
    split = labelled.split("train")
    assert labelled.class_names == ["normal", "tumour"] and split.labels.tolist() == [1, 0]
    assert split.patient_ids.tolist() == ["1CT1", "4MR1"]  # from PatientID, no CSV column
    assert labelled.modality == "CT/MR" or labelled.modality == "MR/CT"
    assert split.images.shape == (2, 32, 32, 1)


def test_truncated_dicom_is_a_one_line_error():
    bad = dicom_file("MR_truncated.dcm")
    assert dicom_header(bad).shape == (64, 64, 1)  # the header is fine
    with pytest.raises(DataError, match=r"MR_truncated\.dcm: corrupt or unreadable DICOM"):
        load_dataset(bad).split("train").images


def test_missing_pydicom_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom -> ImportError
    with pytest.raises(DataError, match=r"pip install medveil\[dicom\]"):
        dicom_header(dicom_file("CT_small.dcm"))
