"""Shared fixtures. Tests that need ``../shared/data`` skip with a reason when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEDVEIL_SHARED_DATA", REPO.parent / "shared" / "data"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data of ``../shared/data``; skips the test when it is not there."""
    if not (SHARED_DATA / "medmnist").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (set MEDVEIL_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def aptos_dir(shared_data: Path) -> Path:
    path = shared_data / "aptos2019"
    if not (path / "train.csv").is_file():
        pytest.skip(f"APTOS not found at {path}")
    return path
