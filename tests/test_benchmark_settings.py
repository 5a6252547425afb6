"""The MedUniverse benchmark's full mode measures the shipped recipe (benchmarks/meduniverse.py,
FULL): every training section of src/medveil/configs/medmnist6.toml, only smaller sizes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from medveil.federated.config import config_from_dict

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import meduniverse as bench  # noqa: E402
from shipped import shipped_raw  # noqa: E402

SHIPPED = shipped_raw()


@pytest.mark.parametrize("section", ["pretrain", "federation", "local", "curation", "evaluation"])
def test_full_mode_runs_the_shipped_recipe(section):
    assert bench.FULL[section] == SHIPPED[section]


def test_full_mode_keeps_the_shipped_architecture_at_smaller_sizes():
    model, data = bench.FULL["model"], bench.FULL["data"]
    assert (model["stem"], model["depth"], model["global_pool"]) == (
        SHIPPED["model"]["stem"], SHIPPED["model"]["depth"], SHIPPED["model"]["global_pool"])
    assert model["embed_dim"] < SHIPPED["model"]["embed_dim"]
    assert data["max_train"] < SHIPPED["data"]["max_train"]
    # the pool cap stays at the previous shipped 1000 scaled to the sites' size (300 for 600 of
    # 2000 train images), below the shipped 3000: the full mode's 90 minutes (meduniverse_settings)
    assert data["max_pool"] == 300 < SHIPPED["data"]["max_pool"]


def test_full_mode_configs_are_valid_and_baselines_drop_pool_balance(tmp_path):
    for name in ("bloodmnist", "b"):  # the config only checks that a client's file exists
        (tmp_path / f"{name}.npz").touch()
    for method, overrides in bench.FEDERATED.items():
        cfg = bench.make_config(bench.FULL, tmp_path, 0, ("bloodmnist",), overrides)
        assert cfg.curation.pool_balance is (method == "meduniverse")
        assert cfg.federation.calibrate_heads is True
    assert bench.FULL["methods"] == ("meduniverse", "fedavg")
    assert "methods" not in bench.QUICK  # quick mode runs every method
    config_from_dict({"clients": [{"name": "b", "path": "b.npz"}], **{s: bench.FULL_PREVIOUS[s]
                      for s in bench.SECTIONS}}, tmp_path)


def test_site_alone_jobs_are_cached_by_the_sites_data_only():
    """A change of the ViT recipe reuses the site-alone jobs (their CNNs never see it); a change of
    the sites' data, seed or ResNet-18 seeds does not."""
    key = bench.alone_key(("alone", 0, ""), bench.FULL, Path("d"))
    vit = {**bench.FULL, "model": {**bench.FULL["model"], "embed_dim": 128, "global_pool": "token"},
           "local": {**bench.FULL["local"], "epochs": 3}}
    assert bench.alone_key(("alone", 0, ""), vit, Path("d")) == key
    for other in ({**bench.FULL, "data": {**bench.FULL["data"], "max_train": 100}},
                  {**bench.FULL, "model": {**bench.FULL["model"], "img_size": 32}},
                  {**bench.FULL, "resnet_seeds": 3}):
        assert bench.alone_key(("alone", 0, ""), other, Path("d")) != key
    assert bench.alone_key(("alone", 1, ""), bench.FULL, Path("d")) != key


def test_demo_config_carries_the_shipped_recipe_at_the_demo_width():
    """demo.toml (what `medveil demo` federates) runs medmnist6.toml's architecture and stage lengths,
    smaller only in width and batch (chosen on the samples' val splits: benchmarks/demo_recipe.py)."""
    from medveil.config_io import read_toml
    from medveil.federated.demo import demo_config_path

    demo = read_toml(demo_config_path())
    for key in ("img_size", "patch_size", "stem", "depth", "global_pool"):
        assert demo["model"][key] == SHIPPED["model"][key], key
    assert demo["model"]["embed_dim"] < SHIPPED["model"]["embed_dim"]
    assert demo["federation"]["rounds"] == SHIPPED["federation"]["rounds"]
    for section, key in (("local", "epochs"), ("local", "augment"), ("local", "schedule"), ("curation", "epochs"),
                         ("curation", "pool_balance"), ("federation", "calibrate_heads")):
        assert demo[section][key] == SHIPPED[section][key], (section, key)


def test_a_kept_privacy_run_is_reused_only_with_the_jobs_config(tmp_path, monkeypatch):
    """benchmarks/privacy.py's kept runs (studied by audit_grouped.py, dp_head_refit.py) are reused
    only when their config.toml is the job's: a finished run of the job comes back as it is, one
    kept from an older setting is refused in one line before any training, not audited as if it
    were current."""
    import privacy
    from medveil.federated.config import ConfigError, dump_toml

    for name in privacy.DATASETS:  # the config only checks that a client's file exists
        (tmp_path / "data" / f"{name}.npz").parent.mkdir(exist_ok=True)
        (tmp_path / "data" / f"{name}.npz").touch()
    monkeypatch.setattr(privacy, "REPO", tmp_path)
    folder = tmp_path / "runs" / "bench" / "privacy-shipped-eps8-seed0-val-refit10"
    run = folder / "run"
    run.mkdir(parents=True)
    job = privacy.job_config(bench.FULL, tmp_path / "data", 0, 8.0, "val", calibration=10)
    (run / "config.toml").write_text(dump_toml(job))
    (run / "metrics.json").write_text('{"final": {}}')
    (run / "complete").touch()
    assert privacy.kept_run(bench.FULL, tmp_path / "data", 0, 8.0, "val", calibration=10) == run
    older = {**bench.FULL, "data": {**bench.FULL["data"], "max_pool": 200}}
    (run / "config.toml").write_text(dump_toml(privacy.job_config(older, tmp_path / "data", 0, 8.0, "val",
                                                                  calibration=10)))
    with pytest.raises(ConfigError, match="different config"):
        privacy.kept_run(bench.FULL, tmp_path / "data", 0, 8.0, "val", calibration=10)
    # nothing trained or written for either: no site folder, the run as it was
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == [
        "run", "run/complete", "run/config.toml", "run/metrics.json"]
