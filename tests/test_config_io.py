"""One TOML writer and reader, one unknown-key check, for every config MedVeil reads."""

from __future__ import annotations

import tomllib

import pytest

from medveil.config_io import apply_overrides, dataclass_from_dict, dumps_toml, read_toml, reject_unknown
from medveil.errors import ConfigError
from medveil.models import ViTConfig


def test_dumps_toml_round_trips_awkward_strings_and_tables(tmp_path):
    d = {"seed": 3, "name": 'say "hi"\\n\tnew\nline é', "ratio": 1e-6, "big": float("inf"), "on": True,
         "sizes": [1, 2], "model": {"depth": 4, "path": "C:\\data\\x.npz"},
         "clients": [{"name": "a"}, {"name": "b", "sample": "bloodmnist"}]}
    text = dumps_toml(d)
    assert tomllib.loads(text) == d
    (tmp_path / "c.toml").write_text(text)
    assert read_toml(tmp_path / "c.toml") == d


def test_read_toml_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        read_toml(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("seed = = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_toml(tmp_path / "bad.toml")


def test_unknown_keys_named_with_the_known_ones():
    with pytest.raises(ConfigError, match=r"\[local\]: unknown key\(s\) epocs, lrr \(known: epochs, lr\)"):
        reject_unknown({"epocs": 1, "lrr": 2, "lr": 3}, ["epochs", "lr"], "[local]")
    reject_unknown({"lr": 3}, ["epochs", "lr"], "[local]")
    with pytest.raises(ConfigError, match="ViT config: unknown key.*embed_dimm"):
        dataclass_from_dict(ViTConfig, {"embed_dimm": 8}, "ViT config")
    assert dataclass_from_dict(ViTConfig, {"depth": 2}, "ViT config").depth == 2


def test_the_shipped_medmnist6_config_loads_with_its_recipe(shared_data, monkeypatch):
    """The recipe chosen on validation is what `medveil federate --config ...medmnist6.toml` runs."""
    from pathlib import Path

    from medveil.federated.config import load_config

    monkeypatch.setenv("MEDVEIL_DATA_ROOT", str(shared_data))
    cfg = load_config(Path(__file__).resolve().parents[1] / "src" / "medveil" / "configs" / "medmnist6.toml")
    assert (cfg.model.stem, cfg.model.depth, cfg.federation.rounds, cfg.local.epochs) == ("cnn", 2, 3, 15)
    assert cfg.curation.pool_balance and cfg.curation.epochs == 20.0 and cfg.data.max_pool == 3000
    assert [c.name for c in cfg.clients] == ["bloodmnist", "organamnist", "retinamnist", "breastmnist",
                                             "pneumoniamnist", "ham10000"]


def test_overrides_set_toml_values_and_plain_strings_without_touching_the_file():
    raw = {"seed": 0, "data": {"max_train": 2000}, "clients": [{"path": "a.npz"}]}
    out = apply_overrides(raw, ["data.max_train=0", "data.max_test = 0", "seed=3", "local.lr=1e-3",
                                "federation.strategy=fedavg", 'model.global_pool="token"', "local.augment=flip"])
    assert out == {"seed": 3, "data": {"max_train": 0, "max_test": 0}, "clients": [{"path": "a.npz"}],
                   "local": {"lr": 1e-3, "augment": "flip"}, "federation": {"strategy": "fedavg"},
                   "model": {"global_pool": "token"}}
    assert raw["data"] == {"max_train": 2000}  # the caller's dict is unchanged
    for bad in ("data.max_train", "a.b.c=1", ".x=1", "seed.x=1"):
        with pytest.raises(ConfigError, match="--set"):
            apply_overrides(raw, [bad])


def test_federate_set_reaches_the_run_and_unknown_keys_are_one_line(tmp_path, capsys):
    """`medveil federate --set`: the run's config.toml holds the changed value (so --resume keeps it)."""
    from fed_helpers import tiny_config

    from medveil.cli.main import main
    from medveil.federated.config import dump_toml, load_config

    config = tmp_path / "tiny.toml"
    config.write_text(dump_toml(tiny_config(tmp_path, rounds=1)))
    assert main(["federate", "--config", str(config), "--set", "federation.rounds=0", "--set", "data.max_train=20",
                 "--out", str(tmp_path / "run"), "--quiet"]) == 0
    cfg = load_config(tmp_path / "run" / "config.toml")
    assert (cfg.federation.rounds, cfg.data.max_train) == (0, 20)
    assert main(["federate", "--config", str(config), "--set", "data.max_trian=20", "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err
    assert "max_trian" in err and "with --set" in err and not (tmp_path / "r2").exists()
