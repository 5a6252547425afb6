"""What we know about MedMNIST-format files by name: task, class names, modality.

File names follow the ``medmnist`` package (``bloodmnist.npz``, ``organamnist_64.npz`` ...),
so users can drop in the official files at any size (28/64/128/224).
"""

from __future__ import annotations

from dataclasses import dataclass

from medveil.data.dataset import Task


@dataclass(frozen=True)
class DatasetInfo:
    task: Task
    class_names: tuple[str, ...]
    modality: str


MEDMNIST: dict[str, DatasetInfo] = {
    "bloodmnist": DatasetInfo(
        Task.MULTICLASS,
        ("basophil", "eosinophil", "erythroblast", "immature granulocytes",
         "lymphocyte", "monocyte", "neutrophil", "platelet"),
        "blood-cell microscopy",
    ),
    "organamnist": DatasetInfo(
        Task.MULTICLASS,
        ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right",
         "liver", "lung-left", "lung-right", "pancreas", "spleen"),
        "abdominal CT (axial)",
    ),
    "retinamnist": DatasetInfo(
        Task.ORDINAL, ("grade 0", "grade 1", "grade 2", "grade 3", "grade 4"), "colour fundus"
    ),
    "breastmnist": DatasetInfo(
        Task.BINARY, ("malignant", "normal, benign"), "breast ultrasound"
    ),
    "pneumoniamnist": DatasetInfo(Task.BINARY, ("normal", "pneumonia"), "paediatric chest X-ray"),
    "ham10000": DatasetInfo(
        Task.MULTICLASS, ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"), "dermoscopy"
    ),
    "dermamnist": DatasetInfo(
        Task.MULTICLASS, ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"), "dermoscopy"
    ),
    "pathmnist": DatasetInfo(
        Task.MULTICLASS,
        ("adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
         "normal colon mucosa", "cancer-associated stroma", "colorectal adenocarcinoma epithelium"),
        "colon pathology",
    ),
    "octmnist": DatasetInfo(
        Task.MULTICLASS, ("choroidal neovascularization", "diabetic macular edema", "drusen",
                          "normal"), "retinal OCT"
    ),
    "organcmnist": DatasetInfo(
        Task.MULTICLASS,
        ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right",
         "liver", "lung-left", "lung-right", "pancreas", "spleen"),
        "abdominal CT (coronal)",
    ),
    "organsmnist": DatasetInfo(
        Task.MULTICLASS,
        ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right",
         "liver", "lung-left", "lung-right", "pancreas", "spleen"),
        "abdominal CT (sagittal)",
    ),
    "chestmnist": DatasetInfo(
        Task.MULTILABEL,
        ("atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule",
         "pneumonia", "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis",
         "pleural", "hernia"),
        "chest X-ray",
    ),
}


def medmnist_key(stem: str) -> str:
    """``organamnist_64`` -> ``organamnist``; ``bloodmnist`` -> ``bloodmnist``."""
    base, _, size = stem.rpartition("_")
    return base if base and size.isdigit() else stem


# Image-folder datasets recognised by folder name (prefix match, lower case). Used only when
# the caller names neither classes nor task; labels must then be 0..K-1 integers.
FOLDERS: dict[str, DatasetInfo] = {
    "aptos": DatasetInfo(
        Task.ORDINAL,
        ("no DR", "mild", "moderate", "severe", "proliferative DR"),
        "colour fundus",
    ),
}


def folder_info(name: str) -> DatasetInfo | None:
    """What we know about an image folder from its name (``aptos2019`` -> APTOS DR grades)."""
    lowered = name.lower()
    return next((info for key, info in FOLDERS.items() if lowered.startswith(key)), None)
