"""The federation config: a TOML file read into dataclasses, every key checked.

```toml
seed = 0
device = "cpu"                  # or "cuda"
[model]                         # medveil.models.ViTConfig fields
img_size = 32
embed_dim = 192
[data]                          # medveil.federated.sites.SiteOptions
pool_fraction = 0.2
[[clients]]                     # one per hospital: a dataset by path or shipped sample name
name = "blood"
sample = "bloodmnist"           # or: path = "data/bloodmnist.npz" (relative to this file)
[pretrain]                      # stage 0, MAE on the server pool (PretrainRecipe)
[federation]                    # strategy, rounds, client_fraction, schedule, calibrate_heads
[local]                         # client fine-tuning (TrainRecipe; fedprox_mu)
[curation]                      # CurationParams (tau, lam, mim_mu, init, relay_alpha ...)
[evaluation]                    # fine-tune / linear-probe recipe of `medveil evaluate`
[privacy]                       # DP-SGD for every site's training (PrivacyOptions; off by default)
```
A relative ``path`` is taken from the config file's folder when it exists there, else it is a
name under ``$MEDVEIL_DATA_ROOT`` (:mod:`medveil.data.roots`). A missing dataset, an unknown
key or strategy fails at load time with a one-line error. The run folder keeps the resolved
config as ``config.toml``, so ``--resume`` and ``medveil evaluate`` need nothing else.

``remote_clients=True`` (the Flower server): the clients' datasets live at the sites, so a
``[[clients]]`` entry needs only its ``name`` and no dataset is looked up on this machine.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from medveil.config_io import apply_overrides, dumps_toml, read_toml, reject_unknown
from medveil.errors import ConfigError
from medveil.federated.curation import DEFAULT_SCHEDULE, STRATEGIES, CurationParams, make_curator
from medveil.federated.privacy import PrivacyOptions
from medveil.federated.server import PretrainRecipe
from medveil.federated.sites import ClientSpec, SiteOptions
from medveil.federated.training import TrainRecipe
from medveil.models import ViTConfig

SCHEDULES = ("auto", "parallel", "sequential")


@dataclass
class FederationOptions:
    """The ``[federation]`` section."""

    strategy: str = "distill"          # distill | relay | fedavg
    rounds: int = 3                    # stages after stage 0
    client_fraction: float = 1.0       # share of clients sampled per stage (at least one)
    schedule: str = "auto"             # parallel | sequential | auto (the strategy's default)
    calibrate_heads: bool = False      # after the last stage, clients refit their heads (calibration.py)

    def resolved_schedule(self) -> str:
        return DEFAULT_SCHEDULE[self.strategy] if self.schedule == "auto" else self.schedule


@dataclass
class EvaluationOptions:
    """The ``[evaluation]`` section: one recipe for every backbone and dataset."""

    finetune_epochs: int = 3
    finetune_lr: float = 5e-4
    finetune_batch_size: int = 64
    probe_C: float = 1.0             # inverse L2 strength of the logistic-regression probe
    probe_max_iter: int = 1000

    def finetune_recipe(self, local: TrainRecipe) -> TrainRecipe:
        """The clients' recipe (weight decay, head lr, class weighting, augmentation, schedule,
        label smoothing, layer decay, drop path) with these epochs / lr / batch size and no
        FedProx term."""
        return replace(local, epochs=self.finetune_epochs, lr=self.finetune_lr,
                       batch_size=self.finetune_batch_size, fedprox_mu=0.0)


@dataclass
class FederationConfig:
    seed: int = 0
    device: str = "cpu"
    model: ViTConfig = field(default_factory=ViTConfig)
    data: SiteOptions = field(default_factory=SiteOptions)
    clients: list[ClientSpec] = field(default_factory=list)
    pretrain: PretrainRecipe = field(default_factory=PretrainRecipe)
    init_checkpoint: str = ""        # MAE / MedMAE / timm ViT weights to start the server from
    federation: FederationOptions = field(default_factory=FederationOptions)
    local: TrainRecipe = field(default_factory=TrainRecipe)
    curation: CurationParams = field(default_factory=CurationParams)
    evaluation: EvaluationOptions = field(default_factory=EvaluationOptions)
    privacy: PrivacyOptions = field(default_factory=PrivacyOptions)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def resume_identity(self) -> dict[str, Any]:
        """What a resumed run must share with the config it was started with: all of it, less the
        [privacy] options when DP is off (they change nothing then, so a later change of their
        defaults does not lock a run without DP out of its folder)."""
        d = self.to_dict()
        if not self.privacy.dp:
            del d["privacy"]
        return d


SECTIONS: dict[str, type] = {
    "model": ViTConfig, "data": SiteOptions, "pretrain": PretrainRecipe,
    "federation": FederationOptions, "local": TrainRecipe, "curation": CurationParams,
    "evaluation": EvaluationOptions, "privacy": PrivacyOptions,
}
TOP_LEVEL = ("seed", "device", "init_checkpoint")


def _coerce(value: Any, default: Any, where: str) -> Any:
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"{where} must be {type(default).__name__}, got {value!r}")
    return value


def _section(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table")
    defaults = cls()
    reject_unknown(raw, (f.name for f in fields(cls)), where)
    return cls(**{k: _coerce(v, getattr(defaults, k), f"{where} {k}") for k, v in raw.items()})


def _resolve(path: str, base: Path) -> str:
    """Relative to the config's folder when it exists there; else kept (a name under the data root)."""
    if path and not Path(path).is_absolute() and (base / path).exists():
        return str((base / path).resolve())
    return path


def config_from_dict(raw: dict[str, Any], base_dir: Path, where: str = "config",
                     remote_clients: bool = False) -> FederationConfig:
    reject_unknown(raw, [*SECTIONS, *TOP_LEVEL, "clients"], where)
    cfg = FederationConfig()
    for key in TOP_LEVEL:
        if key in raw:
            setattr(cfg, key, _coerce(raw[key], getattr(cfg, key), f"{where}: {key}"))
    for name, cls in SECTIONS.items():
        if name in raw:
            setattr(cfg, name, _section(cls, raw[name], f"{where}: [{name}]"))
    entries = raw.get("clients", [])
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where}: no [[clients]] entries")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: [[clients]] #{i + 1} must be a table")
        entry = dict(entry)
        entry.setdefault("name", Path(entry.get("path") or entry.get("sample") or f"client{i}").stem)
        spec = _section(ClientSpec, entry, f"{where}: [[clients]] #{i + 1}")
        spec.path = _resolve(spec.path, base_dir)
        cfg.clients.append(spec)
    cfg.data.pool_path = _resolve(cfg.data.pool_path, base_dir)
    cfg.init_checkpoint = _resolve(cfg.init_checkpoint, base_dir)
    validate(cfg, where, remote_clients)
    return cfg


def validate(cfg: FederationConfig, where: str = "config", remote_clients: bool = False) -> None:
    fed = cfg.federation
    if fed.strategy not in STRATEGIES:
        raise ConfigError(f"{where}: unknown strategy {fed.strategy!r} (choose from {', '.join(STRATEGIES)})")
    if fed.schedule not in SCHEDULES:
        raise ConfigError(f"{where}: [federation] schedule must be one of {', '.join(SCHEDULES)}")
    if fed.rounds < 0:
        raise ConfigError(f"{where}: [federation] rounds must be >= 0")
    if not 0.0 < fed.client_fraction <= 1.0:
        raise ConfigError(f"{where}: [federation] client_fraction must be in (0, 1]")
    if cfg.local.epochs < 1 or cfg.local.batch_size < 1 or cfg.pretrain.batch_size < 1:
        raise ConfigError(f"{where}: epochs and batch sizes of [local] / [pretrain] must be >= 1")
    try:
        cfg.local.check()
    except ConfigError as err:
        raise ConfigError(f"{where}: [local] {err}") from None
    try:
        cfg.privacy.check(need_opacus=not remote_clients)  # a Flower coordinator runs no DP-SGD
        cfg.privacy.check_recipe(cfg.local.class_weighting, cfg.local.fedprox_mu)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    make_curator(fed.strategy, cfg.curation)  # checks the [curation] values the strategy uses
    cfg.model.validate()
    if remote_clients:
        return
    pool = Path(cfg.data.pool_path).resolve() if cfg.data.pool_path else None
    for spec in cfg.clients:
        source = spec.resolve().resolve()  # a missing dataset fails now, not after pretraining
        inside = pool is not None and source.is_relative_to(pool) and source.suffix != ".npz"
        if pool is not None and (source == pool or inside):  # a pool folder reads its images, not .npz files
            raise ConfigError(f"{where}: [data] pool_path is (or holds) the dataset of client {spec.name!r}: every "
                              f"split of it, its test images too, would enter pretraining and distillation; use "
                              f"pool_fraction (a share of each client's train split) instead")


def load_config(path: str | Path, remote_clients: bool = False, overrides: Iterable[str] = ()) -> FederationConfig:
    """The config file at ``path``, with ``overrides`` ("SECTION.KEY=VALUE", :func:`apply_overrides`) laid over it."""
    path = Path(path)
    raw = apply_overrides(read_toml(path), overrides) if overrides else read_toml(path)
    return config_from_dict(raw, path.parent, str(path) + (" with --set" if overrides else ""), remote_clients)


def dump_toml(cfg: FederationConfig) -> str:
    """The resolved config as TOML (reads back with :func:`load_config` to an equal config)."""
    return dumps_toml(cfg.to_dict())
