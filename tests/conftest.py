"""Shared fixtures. Tests that need ``../shared/data`` skip with a reason when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

# Tests use small tensors: one thread each for torch and the BLAS behind numpy / scikit-learn
# is as fast and never oversubscribes a busy machine (set before numpy / torch load).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEDVEIL_SHARED_DATA", REPO.parent / "shared" / "data"))

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests that take the real data (``shared_data`` or ``aptos_dir``) carry the ``shared_data``
    marker, so ``-m "not shared_data"`` selects the ones that run anywhere."""
    for item in items:
        if {"shared_data", "aptos_dir"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.shared_data)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Every test starts with one torch thread, whatever an earlier test (a CLI --threads) set."""
    torch.set_num_threads(1)
    yield


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
