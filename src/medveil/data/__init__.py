"""Data layer: one interface (:class:`ImageDataset`) over MedMNIST ``.npz`` files,
image folders with a CSV, and DICOM files.

>>> ds = load_dataset("bloodmnist.npz")          # a path, or a name under the data root
>>> x = to_tensor(ds.split("train").images, size=32, channels=3)   # (N, 3, 32, 32) float
"""

from typing import Any

from medveil.data.dataset import ImageDataset, Split, Task
from medveil.data.loading import load_dataset

__all__ = ["ImageDataset", "Split", "Task", "load_dataset", "to_tensor"]


def __getattr__(name: str) -> Any:
    # to_tensor needs torch: imported on first use so that `medveil --help` stays fast.
    if name == "to_tensor":
        from medveil.data.tensors import to_tensor

        return to_tensor
    raise AttributeError(f"module 'medveil.data' has no attribute {name!r}")
