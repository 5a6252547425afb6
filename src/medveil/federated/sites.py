"""Who holds what: each client's private labelled splits and the server's unlabelled pool.

Every image is converted once to the model's size and channels (``medveil.data.to_tensor``), so
datasets of different modalities, sizes and colour share one backbone.

Server pool (default): from every dataset's train split a seeded random ``pool_fraction`` is held
apart, its labels dropped; those images are never given to any client. Alternatively the user
names a folder of images or an ``.npz`` (``pool_path``); then clients keep their whole train split.
Subsampling caps (``max_*``; 0 = no cap) are seeded, so a run rebuilds the same sites on resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medveil.data import Task, load_dataset, to_tensor
from medveil.data.augment import AugmentPolicy, policy_for
from medveil.data.imagefiles import IMAGE_EXTENSIONS, ImageFiles
from medveil.data.roots import resolve_path
from medveil.data.samples import sample_path
from medveil.errors import ConfigError, DataError
from medveil.federated.training import derive_seed


@dataclass
class ClientSpec:
    """One ``[[clients]]`` entry: a dataset by ``path`` or by shipped ``sample`` name."""

    name: str = ""
    path: str = ""
    sample: str = ""
    num_classes: int = 0  # optional: asserted against the dataset when > 0

    def resolve(self) -> Path:
        if bool(self.path) == bool(self.sample):
            raise ConfigError(f"client {self.name!r}: give exactly one of 'path' or 'sample'")
        if self.path:
            try:  # an existing path, or a bare name under $MEDVEIL_DATA_ROOT
                return resolve_path(self.path)
            except DataError as err:
                raise ConfigError(f"client {self.name!r}: dataset not found: {err}") from None
        return sample_dataset_path(self.sample, f"client {self.name!r}")


def sample_dataset_path(name: str, where: str) -> Path:
    """Path of a shipped sample dataset (``src/medveil/samples/<name>.npz``)."""
    try:
        return sample_path(name)
    except DataError as err:
        raise ConfigError(f"{where}: {err}") from None


@dataclass
class ClientData:
    """One client's private data, as model-ready tensors. Never leaves the client."""

    name: str
    task: Task
    class_names: list[str]
    modality: str
    source: str
    x_train: torch.Tensor  # (N, C, H, W) float in [0, 1]
    y_train: torch.Tensor  # (N,) int64, or (N, K) for multi-label
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_pool: int = 0  # train images this client's dataset gave the server pool (unlabelled)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def augmentation(self, mode: str) -> AugmentPolicy:
        """The training augmentation of this client's images (``[local] augment``)."""
        return policy_for(self.modality, self.class_names, mode)


UNUSED_TRAIN = "unused-train"
# the held-out images a client scores on: a split of its dataset, or (UNUSED_TRAIN) train images that
# neither it nor the pool uses (random draws of the members' own population: the membership audit's
# sound non-members)
EVAL_SPLITS = ("test", "val", UNUSED_TRAIN)


@dataclass
class SiteOptions:
    """The ``[data]`` config section."""

    pool_fraction: float = 0.2   # of every train split, held apart for the server
    pool_path: str = ""          # a folder / .npz of unlabelled images instead
    max_train: int = 0           # per client, 0 = all
    max_test: int = 0            # per client, 0 = all
    max_pool: int = 0            # pool images per dataset (or in total for pool_path), 0 = all
    eval_split: str = "test"     # the held-out split each client scores on; "val" to choose a recipe
                                 # without ever touching the test images; "unused-train" (EVAL_SPLITS)

    def __post_init__(self) -> None:  # a config and a Flower site's options are both checked here
        if self.eval_split not in EVAL_SPLITS:
            raise ConfigError(f"[data] eval_split must be one of {', '.join(EVAL_SPLITS)}, got {self.eval_split!r}")


def _subset(n: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    idx = rng.permutation(n)
    return np.sort(idx[:cap] if 0 < cap < n else idx)


def load_site(name: str, data: str, site: dict[str, Any]) -> ClientData:
    """A Flower site's private splits from its own dataset and the server's data options
    (``flower.transport.site_options``): exactly the clients the in-process engine builds."""
    opts = SiteOptions(pool_fraction=float(site["pool_fraction"]), max_train=int(site["max_train"]),
                       max_test=int(site["max_test"]), max_pool=int(site["max_pool"]),
                       eval_split=str(site.get("eval_split", "test")))
    client, _held_apart = load_client(ClientSpec(name=name, path=data), opts, int(site["img_size"]),
                                      int(site["in_chans"]), int(site["seed"]))
    return client


def load_client(spec: ClientSpec, opts: SiteOptions, img_size: int, channels: int,
                seed: int) -> tuple[ClientData, torch.Tensor | None]:
    """One client's private splits, plus the share of its train split held apart for the server
    pool (None when ``pool_path`` is set or ``pool_fraction`` is 0). A Flower site calls this
    with its own dataset; the split depends only on (seed, client name, options)."""
    path = spec.resolve()
    ds = load_dataset(path)
    if spec.num_classes and spec.num_classes != ds.num_classes:
        raise DataError(f"{path}: client {spec.name!r} has {ds.num_classes} classes but the "
                        f"config declares num_classes = {spec.num_classes}")
    rng = np.random.default_rng(derive_seed(seed, "sites", spec.name))
    if opts.eval_split not in (*ds.splits, UNUSED_TRAIN):
        raise DataError(f"{path}: client {spec.name!r} has no {opts.eval_split!r} split "
                        f"(splits: {', '.join(ds.splits)}); set [data] eval_split")
    train = ds.split("train")
    order = rng.permutation(len(train))
    n_pool = 0 if opts.pool_path else int(round(opts.pool_fraction * len(train)))
    pool_idx, train_idx = order[:n_pool], order[n_pool:]
    pool_idx = np.sort(pool_idx[:opts.max_pool] if opts.max_pool else pool_idx)
    if opts.max_train and len(train_idx) > opts.max_train:
        train_idx = train_idx[:opts.max_train]
    unused = order[n_pool + len(train_idx):]  # after the client's share: no one trains on these
    train_idx = np.sort(train_idx)
    if len(train_idx) == 0:
        raise DataError(f"{path}: client {spec.name!r} has no training images left")
    if opts.eval_split == UNUSED_TRAIN:
        if len(unused) == 0:
            raise DataError(f"{path}: client {spec.name!r} trains on every train image outside the pool, so none "
                            f"is left unused to hold out (set [data] max_train, or use val / test)")
        test = train
        test_idx = np.sort(unused[_subset(len(unused), opts.max_test, rng)])
    else:
        test = ds.split(opts.eval_split)
        test_idx = _subset(len(test), opts.max_test, rng)
    if len(test_idx) == 0:
        raise DataError(f"{path}: client {spec.name!r} has an empty test split")
    images = train.images
    pool = to_tensor(images[pool_idx], size=img_size, channels=channels) if n_pool else None
    client = ClientData(
        name=spec.name, task=ds.task, class_names=list(ds.class_names), modality=ds.modality,
        source=str(path),
        x_train=to_tensor(images[train_idx], size=img_size, channels=channels),
        y_train=torch.from_numpy(train.labels[train_idx]),
        x_test=to_tensor(test.images[test_idx], size=img_size, channels=channels),
        y_test=torch.from_numpy(test.labels[test_idx]),
        n_pool=len(pool_idx) if n_pool else 0,
    )
    return client, pool


def build_sites(
    specs: list[ClientSpec], opts: SiteOptions, img_size: int, channels: int, seed: int
) -> tuple[list[ClientData], torch.Tensor]:
    """Load every client's dataset and the server pool. Returns (clients, pool (M, C, H, W))."""
    if not specs:
        raise ConfigError("no clients configured (add [[clients]] entries)")
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"client names must be unique; repeated: {', '.join(dupes)}")
    if not 0.0 <= opts.pool_fraction < 1.0:
        raise ConfigError(f"[data] pool_fraction must be in [0, 1), got {opts.pool_fraction}")
    clients: list[ClientData] = []
    pool_parts: list[torch.Tensor] = []
    for spec in specs:
        client, part = load_client(spec, opts, img_size, channels, seed)
        clients.append(client)
        if part is not None:
            pool_parts.append(part)
    if opts.pool_path:
        pool = load_pool(Path(opts.pool_path), img_size, channels, opts.max_pool, seed)
    elif pool_parts:
        pool = torch.cat(pool_parts)
    else:
        pool = torch.empty(0, channels, img_size, img_size)
    return clients, pool


def pool_groups(clients: list[ClientData], pool: torch.Tensor) -> torch.Tensor | None:
    """Which dataset each pool image came from (int64, (M,)): the server knows where its own
    unlabelled images came from, though not their labels. None for a ``pool_path`` pool (one source)."""
    sizes = [c.n_pool for c in clients]
    if not any(sizes) or sum(sizes) != len(pool):
        return None
    return torch.repeat_interleave(torch.arange(len(clients)), torch.tensor(sizes))


def load_pool(path: Path, img_size: int, channels: int, cap: int = 0, seed: int = 0) -> torch.Tensor:
    """Unlabelled server images from a folder (searched recursively) or a dataset file (all its
    splits, labels ignored), as (M, C, H, W) float in [0, 1]. Since every split is taken, a
    client's own dataset is refused as the pool (config validation): its test images would leak."""
    if not path.exists():
        raise DataError(f"server pool not found: {path}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DataError(f"{path}: the server pool folder holds no images "
                            f"({', '.join(IMAGE_EXTENSIONS)})")
        idx = _subset(len(files), cap, np.random.default_rng(derive_seed(seed, "pool")))
        images = ImageFiles([files[i] for i in idx], size=(img_size, img_size)).decode()
        return to_tensor(images, size=img_size, channels=channels)
    ds = load_dataset(path)
    parts = [to_tensor(s.images, size=img_size, channels=channels) for s in ds.splits.values() if len(s)]
    if not parts:
        raise DataError(f"{path}: the server pool dataset holds no images")
    pool = torch.cat(parts)
    idx = _subset(len(pool), cap, np.random.default_rng(derive_seed(seed, "pool")))
    return pool[torch.from_numpy(idx)]
