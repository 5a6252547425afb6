"""Aggregation, curation strategies, update screening and the join protocol, on a tiny ViT."""

from __future__ import annotations

import math

import pytest
import torch

from medveil.errors import ConfigError, DataError, UpdateRejected
from medveil.federated.client import join_request, local_fit
from medveil.federated.curation import (
    CurationParams,
    DistillCurator,
    FedAvgCurator,
    RelayCurator,
    distill_kl,
    interpolate,
    make_curator,
    pool_batches,
    transfer_set,
    weighted_average,
)
from medveil.federated.messages import ClientUpdate, JoinRequest, message_nbytes, to_payload
from medveil.federated.server import Server
from medveil.federated.sites import build_sites, pool_groups
from medveil.federated.training import TrainRecipe
from medveil.federated.updates import check_update, screen_updates
from medveil.models import ViTConfig

from fed_helpers import TINY_MODEL, tiny_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A server with a pool and two joined clients, plus one real local update per client."""
    folder = tmp_path_factory.mktemp("core")
    cfg = tiny_config(folder)
    clients, pool = build_sites(cfg.clients, cfg.data, 16, 3, cfg.seed)
    return cfg, clients, pool


def fresh_server(setup) -> Server:
    cfg, clients, pool = setup
    server = Server(ViTConfig(**TINY_MODEL), pool, seed=0)
    for i, data in enumerate(clients):
        server.join(join_request(data), stage=1, seed=i)
    return server


def real_updates(setup, server: Server) -> list[ClientUpdate]:
    _, clients, _ = setup
    recipe = TrainRecipe(epochs=1, batch_size=16, lr=1e-3)
    return [local_fit(d, server.instructions(d.name, 1), recipe, seed=7) for d in clients]


def assert_state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_weighted_average_is_exact():
    a = {"w": torch.tensor([1.0, 2.0, -3.0]), "step": torch.tensor(5)}
    b = {"w": torch.tensor([5.0, 6.0, 1.0]), "step": torch.tensor(9)}
    assert_state_equal(weighted_average([a, a], [10, 30]), a)
    avg = weighted_average([a, b], [1, 3])
    assert torch.allclose(avg["w"], (a["w"] + 3 * b["w"]) / 4, atol=0, rtol=1e-7)
    assert avg["step"].item() == 5  # non-float tensors are taken from the first state
    mid = interpolate(a, b, 0.5)
    assert torch.allclose(mid["w"], torch.tensor([3.0, 4.0, -1.0]))


def test_fedavg_of_two_identical_updates_is_that_update(setup):
    server = fresh_server(setup)
    update = real_updates(setup, server)[0]
    twin = ClientUpdate("beta", 1, {k: v.clone() for k, v in update.backbone.items()},
                        server.instructions("beta", 1).head, n_samples=3)
    FedAvgCurator().curate(server, [update, twin], seed=0, progress=False)
    assert_state_equal(server.backbone_state(), update.backbone)
    assert_state_equal(server.heads["alpha"].state_dict(), update.head)  # FedPer: own head kept


def test_fedavg_weights_by_sample_count(setup):
    server = fresh_server(setup)
    u1, u2 = real_updates(setup, server)
    FedAvgCurator().curate(server, [u1, u2], seed=0, progress=False)
    n1, n2 = u1.n_samples, u2.n_samples
    key = "blocks.0.attn.qkv.weight"
    expected = (u1.backbone[key].double() * n1 + u2.backbone[key].double() * n2) / (n1 + n2)
    assert torch.allclose(server.backbone_state()[key].double(), expected, atol=1e-7)
    assert not torch.equal(server.backbone_state()[key], u1.backbone[key])


def test_relay_copies_and_interpolates(setup):
    server = fresh_server(setup)
    base = server.backbone_state()
    u1, _ = real_updates(setup, server)
    RelayCurator(1.0).curate(server, [u1], seed=0, progress=False)
    assert_state_equal(server.backbone_state(), u1.backbone)
    server.load_backbone(base)
    RelayCurator(0.25).curate(server, [u1], seed=0, progress=False)
    key = "patch_embed.proj.weight"
    assert torch.allclose(server.backbone_state()[key], 0.75 * base[key] + 0.25 * u1.backbone[key], atol=1e-6)


def test_distill_reduces_kl_and_guards_other_heads(setup):
    server = fresh_server(setup)
    u1, _ = real_updates(setup, server)
    before = server.backbone_state()
    curator = DistillCurator(CurationParams(init="base", epochs=6.0, batch_size=16, lr=1e-3))
    result = curator.curate(server, [u1], seed=0, progress=False)
    assert result["kd_after"] < 0.7 * result["kd_before"]
    assert result["forget_kl_before"] == pytest.approx(0.0, abs=1e-6)  # beta's target: its own outputs
    assert result["forget_kl_after"] < result["kd_after"] + 0.05
    assert not torch.equal(server.backbone_state()["blocks.0.mlp.fc1.weight"], before["blocks.0.mlp.fc1.weight"])


def test_pool_groups_name_each_pool_image_s_source(setup):
    _, clients, pool = setup
    groups = pool_groups(clients, pool)
    assert [c.n_pool for c in clients] == [12, 10]  # a quarter of 48 and of 40 train images
    assert groups.tolist() == [0] * 12 + [1] * 10
    assert pool_groups(clients, pool[:5]) is None  # sizes that do not add up: no groups


def test_pool_batches_plain_passes_and_balanced_sources():
    plain = pool_batches(10, 4, 4, torch.Generator().manual_seed(0))
    assert [len(b) for b in plain] == [4, 4, 2, 4]  # shuffled passes, as before the option existed
    assert sorted(torch.cat(plain[:3]).tolist()) == list(range(10))
    groups = torch.tensor([0] * 90 + [1] * 10)  # a source of 10 beside one of 90
    batches = pool_batches(100, 200, 50, torch.Generator().manual_seed(0), groups)
    drawn = groups[torch.cat(batches)]
    assert len(batches) == 200 and all(len(b) == 50 for b in batches)
    assert abs(float((drawn == 1).double().mean()) - 0.5) < 0.02  # each source half the draws
    again = pool_batches(100, 200, 50, torch.Generator().manual_seed(0), groups)
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))


def test_distill_with_pool_balance_trains_and_says_so(setup):
    server = fresh_server(setup)
    _, clients, pool = setup
    server.pool_groups = pool_groups(clients, pool)
    u1, u2 = real_updates(setup, server)
    curator = DistillCurator(CurationParams(epochs=2.0, batch_size=16, pool_balance=True))
    result = curator.curate(server, [u1, u2], seed=0, progress=False)
    assert result["pool_balanced"] is True and result["steps"] == 3
    assert result["kd_after"] < result["kd_before"]


def test_distill_kl_properties():
    t = torch.randn(5, 4)
    assert distill_kl(t, t, 2.0, "multi-class").item() == pytest.approx(0.0, abs=1e-6)
    assert distill_kl(t, t, 2.0, "multi-label").item() == pytest.approx(0.0, abs=1e-6)
    assert distill_kl(torch.zeros(5, 4), t, 2.0, "multi-class").item() > 0
    assert distill_kl(torch.zeros(5, 4), t, 1.0, "multi-label").item() > 0
    for task in ("multi-class", "multi-label"):  # weighted: a weighted mean of the per-example terms
        s = torch.randn(5, 4)
        plain = distill_kl(s, t, 2.0, task)
        assert distill_kl(s, t, 2.0, task, torch.full((5,), 3.0)).item() == pytest.approx(plain.item(), rel=1e-5)
        only_first = torch.tensor([1.0, 0, 0, 0, 0])
        assert distill_kl(s, t, 2.0, task, only_first).item() == pytest.approx(
            distill_kl(s[:1], t[:1], 2.0, task).item(), rel=1e-5)


def test_distill_own_source_weight(setup):
    """[curation] own_source_weight: each teacher weighs the pool images of its own dataset w
    times the others'; it changes the curated model, needs the pool's sources (else every image
    weighs the same, as at w = 1), and is refused outside distill or at w <= 0."""
    _, clients, pool = setup
    curated = {}
    for w in (1.0, 4.0):
        server = fresh_server(setup)
        server.pool_groups, server.pool_sources = pool_groups(clients, pool), [c.name for c in clients]
        curator = DistillCurator(CurationParams(epochs=2.0, batch_size=16, own_source_weight=w))
        weights = curator.own_source_weights(server, [c.name for c in clients])
        if w == 1.0:
            assert weights == {}
        else:
            assert weights["alpha"].tolist() == [4.0] * 12 + [1.0] * 10
            assert weights["beta"].tolist() == [1.0] * 12 + [4.0] * 10
        curator.curate(server, real_updates(setup, server), seed=0, progress=False)
        curated[w] = server.backbone_state()
    assert any(not torch.equal(curated[1.0][k], curated[4.0][k]) for k in curated[1.0])
    unknown = fresh_server(setup)  # a pool_path pool: sources unknown
    assert DistillCurator(CurationParams(own_source_weight=4.0)).own_source_weights(unknown, ["alpha"]) == {}
    with pytest.raises(ConfigError, match="own_source_weight must be > 0"):
        make_curator("distill", CurationParams(own_source_weight=0.0))
    with pytest.raises(ConfigError, match="applies to strategy 'distill' only"):
        make_curator("fedavg", CurationParams(own_source_weight=4.0))


def test_distill_views_label_augmented_copies_of_the_pool(setup):
    """[curation] views: the transfer set is the pool and views - 1 seeded augmented copies (same
    sources, same seed -> same copies); views = 1 is the pool itself; the student still takes
    epochs passes' worth of steps over the pool; refused outside distill or below 1."""
    _, clients, pool = setup
    groups = pool_groups(clients, pool)
    same, g1 = transfer_set(pool, groups, 1, seed=3)
    assert same is pool and g1 is groups
    images, g3 = transfer_set(pool, groups, 3, seed=3)
    assert images.shape == (3 * len(pool), *pool.shape[1:]) and torch.equal(images[:len(pool)], pool)
    assert g3.tolist() == groups.tolist() * 3
    assert not torch.equal(images[len(pool):2 * len(pool)], pool)  # augmented, and in [0, 1]
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert torch.equal(transfer_set(pool, groups, 3, seed=3)[0], images)
    assert not torch.equal(transfer_set(pool, groups, 3, seed=4)[0], images)
    curated = {}
    for views in (1, 3):
        server = fresh_server(setup)
        server.pool_groups, server.pool_sources = groups, [c.name for c in clients]
        curator = DistillCurator(CurationParams(epochs=2.0, batch_size=16, pool_balance=True, views=views,
                                                own_source_weight=4.0))
        if views == 3:  # each view keeps its source image's site: the own-source weights follow it
            weights = curator.own_source_weights(server, ["alpha"], g3)
            assert weights["alpha"].tolist() == ([4.0] * 12 + [1.0] * 10) * 3
        result = curator.curate(server, real_updates(setup, server), seed=0, progress=False)
        assert result["steps"] == 3 and result.get("views", 1) == views  # 2 passes over 22 images
        assert result["kd_after"] < result["kd_before"]
        curated[views] = server.backbone_state()
    assert any(not torch.equal(curated[1][k], curated[3][k]) for k in curated[1])
    for bad in (0, 2.5, True):
        with pytest.raises(ConfigError, match="views must be an integer >= 1"):
            make_curator("distill", CurationParams(views=bad))
    with pytest.raises(ConfigError, match="applies to strategy 'distill' only"):
        make_curator("fedavg", CurationParams(views=2))


def test_bad_updates_are_rejected_and_not_aggregated(setup, caplog):
    server = fresh_server(setup)
    good, other = real_updates(setup, server)
    spec, heads = server.backbone_spec(), server.head_specs()

    def variant(**changes) -> ClientUpdate:
        u = ClientUpdate(other.client_name, 1, dict(other.backbone), dict(other.head), other.n_samples)
        for k, v in changes.items():
            setattr(u, k, v)
        return u

    nan_backbone = dict(other.backbone)
    nan_backbone["norm.weight"] = nan_backbone["norm.weight"].clone()
    nan_backbone["norm.weight"][0] = math.nan
    inf_head = {"weight": other.head["weight"].clone(), "bias": other.head["bias"]}
    inf_head["weight"][0, 0] = math.inf
    wrong_shape = dict(other.backbone)
    wrong_shape["blocks.1.mlp.fc2.bias"] = torch.zeros(7)
    missing = {k: v for k, v in other.backbone.items() if k != "cls_token"}
    bad = [variant(backbone=nan_backbone), variant(head=inf_head), variant(backbone=wrong_shape),
           variant(backbone=missing), variant(n_samples=0), variant(client_name="stranger"),
           variant(head={"weight": torch.zeros(3, 32), "bias": torch.zeros(3)})]  # beta has 2 classes
    with caplog.at_level("WARNING", logger="medveil.federated"):
        accepted, rejected = screen_updates([good, *bad], spec, heads)
    assert accepted == [good]
    assert len(rejected) == len(bad)
    reasons = " | ".join(r.reason for r in rejected)
    for needle in ("NaN or Inf", "shape (7,)", "missing keys ['cls_token']", "n_samples", "has not joined"):
        assert needle in reasons
    assert all("\n" not in r.reason for r in rejected)
    assert len([r for r in caplog.records if "rejected" in r.getMessage()]) == len(bad)
    with pytest.raises(UpdateRejected):
        check_update(bad[0], spec, heads["beta"])
    # only the good update reaches the curator: FedAvg of one update == that update
    FedAvgCurator().curate(server, accepted, seed=0, progress=False)
    assert_state_equal(server.backbone_state(), good.backbone)


def test_join_protocol_and_class_count_mismatch(setup):
    server = fresh_server(setup)
    _, clients, _ = setup
    ins = server.instructions("alpha", 2)
    assert ins.head["weight"].shape == (clients[0].num_classes, 32)
    assert server.registry["alpha"].class_names == ["0", "1", "2"]
    again = server.join(JoinRequest("alpha", 3), stage=2, seed=99)  # a known client keeps its head
    assert torch.equal(again.head["weight"], ins.head["weight"])
    with pytest.raises(DataError, match="has 5 classes but its head has 3 outputs"):
        server.join(JoinRequest("alpha", 5), stage=2, seed=0)
    wrong = server.instructions("beta", 2)  # a 2-output head sent to the 3-class client
    wrong.client_name = "alpha"
    with pytest.raises(DataError, match="3 classes but its head has 2 outputs"):
        local_fit(clients[0], wrong, TrainRecipe(), seed=0)


def test_messages_payload_and_size(setup):
    server = fresh_server(setup)
    ins = server.instructions("alpha", 1)
    payload = to_payload(ins)
    assert set(payload) == {"client_name", "stage", "model_config", "backbone", "head"}
    assert all(hasattr(v, "dtype") and not isinstance(v, torch.Tensor) for v in payload["backbone"].values())
    raw = sum(v.numel() * v.element_size() for v in ins.backbone.values())
    size = message_nbytes(ins)
    assert raw < size < raw * 1.2 + 50_000
    assert message_nbytes(JoinRequest("alpha", 3)) < 2_000


def test_make_curator_rejects_unknown_strategy():
    with pytest.raises(Exception, match="unknown strategy 'magic'"):
        make_curator("magic", CurationParams())
    with pytest.raises(ConfigError, match="pool_balance applies to strategy 'distill' only"):
        make_curator("fedavg", CurationParams(pool_balance=True))


def test_eval_split_val_scores_on_the_validation_images_and_leaves_train_alone(tmp_path, setup):
    """[data] eval_split = "val": each client holds out its val split instead of its test split
    (to choose a recipe on validation), with the same train images and pool; a bad value or a
    dataset without that split is one line."""
    import numpy as np

    from medveil.data import load_dataset, to_tensor
    from medveil.errors import ConfigError

    _, test_clients, test_pool = setup
    cfg = tiny_config(tmp_path, data={"eval_split": "val"})
    clients, pool = build_sites(cfg.clients, cfg.data, 16, 3, cfg.seed)
    assert torch.equal(pool, test_pool)
    for c, t in zip(clients, test_clients, strict=True):
        assert torch.equal(c.x_train, t.x_train) and torch.equal(c.y_train, t.y_train)
        val = load_dataset(c.source).split("val")
        assert len(c.x_test) == len(val.labels) != len(t.x_test)
        assert torch.equal(c.x_test, to_tensor(val.images, size=16, channels=3))
        assert np.array_equal(c.y_test.numpy(), val.labels)
    with pytest.raises(ConfigError, match="eval_split must be one of test, val"):
        tiny_config(tmp_path, data={"eval_split": "train"})
    no_val = tmp_path / "noval"
    no_val.mkdir()
    cfg = tiny_config(no_val, data={"eval_split": "val"})
    arrays = dict(np.load(cfg.clients[0].path))
    np.savez(cfg.clients[0].path, **{k: v for k, v in arrays.items() if not k.startswith("val_")})
    with pytest.raises(DataError, match="has no 'val' split"):
        build_sites(cfg.clients, cfg.data, 16, 3, cfg.seed)


def test_a_run_on_val_says_val_in_its_report(tmp_path):
    """With [data] eval_split = "val" the report's table and curves name the split they show."""
    from medveil.federated.engine import run_federation
    from medveil.report.run_report import federated_page

    cfg = tiny_config(tmp_path, rounds=1, data={"eval_split": "val"})
    run_federation(cfg, tmp_path / "run", progress=False)
    page = federated_page(tmp_path / "run")
    assert "val images" in page and "per-site val accuracy by stage" in page and "test images" not in page
