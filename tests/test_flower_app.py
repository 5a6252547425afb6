"""The MedVeil Flower app without processes: the ServerApp's main and the ClientApp run in this
process, joined by a fake Grid (Flower's Message API objects, our codec, transport and app code;
no SuperLink). Fast checks of parity with the in-process engine, server restart from a checkpoint,
absent / returning sites, rejected updates (NaN, wrong shapes, malformed), unknown sites; plus the
pilot PKI and the site / server commands.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fed_helpers import TINY_MODEL, make_npz

from medveil.cli.main import main
from medveil.errors import ConfigError
from medveil.federated.config import config_from_dict
from medveil.federated.engine import run_federation

pytest.importorskip("flwr")
from flwr.app import Context, Error, Message, RecordDict

from medveil.federated.flower import codec
from medveil.federated.flower.app import client_app, server_main

SITES = {"alpha": (3, 24, False, 1), "beta": (2, 20, True, 2), "gamma": (4, 24, False, 3)}


@pytest.fixture(autouse=True)
def task_identity():
    """The identity a ServerApp process has (conftest gives every test one torch thread)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = {k: TaskIdentity.__dict__.get(k) for k in ("_task_id", "_run_id", "_node_id")}
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    for k, v in saved.items():
        setattr(TaskIdentity, k, v)


class FakeGrid:
    """Delivers each pushed message to an in-process ClientApp at once. ``silent``: nodes that
    never answer (killed); ``tamper``: node -> f(content, group) -> content (faulty sites)."""

    def __init__(self, node_configs: dict[int, dict]) -> None:
        self.nodes = node_configs
        self.silent: set[int] = set()
        self.tamper: dict[int, object] = {}
        self.replies: dict[str, Message] = {}
        self.count = 0
        self.sent: list[tuple[int, str]] = []

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            self.count += 1
            mid = f"m{self.count}"
            msg.metadata.__dict__["_message_id"] = mid
            node = msg.metadata.dst_node_id
            self.sent.append((node, msg.metadata.group_id))
            ids.append(mid)
            if node in self.silent:
                continue
            ctx = Context(run_id=1, node_id=node, node_config=self.nodes[node], state=RecordDict(),
                          run_config={})
            try:
                reply = client_app(msg, ctx)
            except Exception as err:  # noqa: BLE001 - what a SuperNode sends back when its ClientApp raises
                reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
            if node in self.tamper and reply.has_content():
                reply = Message(self.tamper[node](reply.content, msg.metadata.group_id), reply_to=msg)
            self.replies[mid] = reply
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


@pytest.fixture
def setup(tmp_path):
    files = {n: make_npz(tmp_path / f"{n}.npz", c, m, colour=col, seed=s) for n, (c, m, col, s) in SITES.items()}
    pool = make_npz(tmp_path / "pool.npz", 2, 16, seed=9)

    def raw(with_paths: bool, **fed):
        return {"seed": 3, "model": TINY_MODEL, "data": {"pool_path": str(pool)},
                "pretrain": {"epochs": 1, "batch_size": 16},
                "federation": {"strategy": "fedavg", "rounds": 2, **fed},
                "local": {"epochs": 1, "batch_size": 16, "lr": 1e-3},
                "curation": {"epochs": 1.0, "batch_size": 16},
                "clients": [{"name": n, "path": str(files[n])} if with_paths else {"name": n} for n in SITES]}

    def coordinator_config(path: Path, **fed) -> Path:
        import tomli_w

        path.write_text(tomli_w.dumps(raw(False, **fed)))
        return path

    nodes = {100 + i: {"name": n, "data": str(files[n]), "threads": 1} for i, n in enumerate(SITES)}
    return {"files": files, "raw": raw, "coordinator_config": coordinator_config, "nodes": nodes,
            "tmp": tmp_path}


def serve(grid, config: Path, out: Path, **rc) -> None:
    run_config = {"config": str(config), "out": str(out), "stage-timeout": 5.0, "join-timeout": 1.0,
                  "threads": 1, **rc}
    server_main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))


def tensors(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("calibrate", [False, True])
def test_flower_app_equals_in_process_engine_and_resumes(setup, calibrate):
    tmp = setup["tmp"]
    config = setup["coordinator_config"](tmp / "coordinator.toml", strategy="distill", calibrate_heads=calibrate)
    out = tmp / "flower"
    grid = FakeGrid(setup["nodes"])
    serve(grid, config, out, **{"max-stages": 2})  # the server stops after stage 1 ...
    assert not (out / "complete").exists()
    serve(FakeGrid(setup["nodes"]), config, out, resume=True)  # ... a new one resumes
    local = config_from_dict(setup["raw"](True, strategy="distill", calibrate_heads=calibrate), tmp)
    run_federation(local, tmp / "local", progress=False)
    a, b = tensors(out / "model.pt"), tensors(tmp / "local" / "model.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for name, head in a["extra"]["heads"].items():
        for key in head:
            assert torch.equal(head[key], b["extra"]["heads"][name][key])
    flower, inproc = (json.loads((d / "metrics.json").read_text()) for d in (out, tmp / "local"))
    assert flower["final"] == inproc["final"]
    assert flower["bytes_total"] == inproc["bytes_total"]  # same accounting of what crosses
    if calibrate:  # the last stage's head-only round went through Flower's messages too
        assert flower["stages"][-1]["calibration"]["calibrated"] == list(SITES)
        assert flower["stages"][-1]["calibration"] == inproc["stages"][-1]["calibration"]
    # what crossed the wire: the join query carries no path or dataset name
    assert {g for _, g in grid.sent} == {"join-1", "train-1"}  # stage 1 is evaluated in stage 2's round


def _poison(content, group):
    if group != "train-1":
        return content
    update, report = codec.decode_update(content, "test")
    update.backbone["blocks.0.norm1.weight"][0] = float("nan")
    return codec.encode_update(update, report)


def _wrong_shape(content, group):
    if group != "train-2":
        return content
    update, report = codec.decode_update(content, "test")
    update.head["weight"] = torch.zeros(7, TINY_MODEL["embed_dim"])
    return codec.encode_update(update, report)


def test_faulty_absent_and_unknown_sites(setup, caplog):
    tmp = setup["tmp"]
    nodes = dict(setup["nodes"])
    nodes[999] = {"name": "mallory", "data": str(setup["files"]["alpha"]), "threads": 1}  # not configured
    grid = FakeGrid(nodes)
    alpha, beta, gamma = 100, 101, 102
    grid.tamper[beta] = _poison          # NaN in stage 1
    grid.tamper[alpha] = _wrong_shape    # a 7-output head in stage 2
    config = setup["coordinator_config"](tmp / "coordinator.toml")
    out = tmp / "run"

    real_push = grid.push_messages

    def push(messages):  # gamma is down during stage 1's training, back for stage 2
        messages = list(messages)
        grid.silent = {gamma} if any(m.metadata.group_id == "train-1" for m in messages) else set()
        return real_push(messages)

    grid.push_messages = push
    with caplog.at_level("WARNING", logger="medveil.federated"):
        serve(grid, config, out, **{"stage-timeout": 0.5})
    m = json.loads((out / "metrics.json").read_text())
    s1, s2 = m["stages"][1], m["stages"][2]
    assert [a["client"] for a in s1["absent"]] == ["gamma"]
    assert "no reply" in s1["absent"][0]["reason"]
    assert [r["client"] for r in s1["rejected"]] == ["beta"] and "NaN or Inf" in s1["rejected"][0]["reason"]
    assert s1["curation"][0]["clients"] == ["alpha"]
    assert "test" not in s1["clients"]["gamma"]  # absent: not evaluated either
    # stage 1 is evaluated in stage 2's training messages: alpha's report counts although its
    # stage-2 update is rejected, beta's although its stage-1 update was
    assert {n for n, info in s1["clients"].items() if "test" in info} == {"alpha", "beta"}
    assert s1["evaluation"] == "next stage" and s2["evaluation"] == "own round"
    assert s2["absent"] == [] and "gamma" in s2["curation"][0]["clients"]  # came back
    assert [r["client"] for r in s2["rejected"]] == ["alpha"] and "shape" in s2["rejected"][0]["reason"]
    assert "mallory" not in json.dumps(m["stages"])
    assert "not a configured site" in caplog.text and "update rejected" in caplog.text
    model = tensors(out / "model.pt")
    assert all(torch.isfinite(v).all() for v in model["model"].values())
    assert model["extra"]["heads"]["alpha"]["weight"].shape == (3, TINY_MODEL["embed_dim"])


def test_site_errors_and_config_checks(setup, caplog):
    tmp = setup["tmp"]
    nodes = dict(setup["nodes"])
    nodes[102] = {"name": "gamma", "data": str(tmp / "missing.npz"), "threads": 1}
    config = setup["coordinator_config"](tmp / "c.toml")
    with caplog.at_level("WARNING", logger="medveil.federated"):
        serve(FakeGrid(nodes), config, tmp / "run")  # gamma's ClientApp fails: absent, run completes
    m = json.loads((tmp / "run" / "metrics.json").read_text())
    assert [a["client"] for a in m["stages"][1]["absent"]] == ["gamma"]
    assert "ConfigError at the site" in caplog.text
    assert "missing.npz" not in caplog.text + json.dumps(m)  # a site's paths never reach the server
    raw = setup["raw"](False, strategy="distill")
    raw["data"] = {"pool_fraction": 0.2}
    import tomli_w

    (tmp / "nopool.toml").write_text(tomli_w.dumps(raw))
    with pytest.raises(ConfigError, match="pool_path"):
        serve(FakeGrid(setup["nodes"]), tmp / "nopool.toml", tmp / "run2")
    with pytest.raises(ConfigError, match="no configured site"):
        serve(FakeGrid({}), config, tmp / "run3")


def test_pki_and_commands(tmp_path, capsys):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import (
        load_ssh_private_key,
        load_ssh_public_key,
    )

    pki = tmp_path / "pki"
    assert main(["certs", "create", "--out", str(pki), "--server-host", "coordinator.example.org",
                 "--site", "alpha", "--site", "beta"]) == 0
    ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((pki / "server" / "server.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "coordinator.example.org" in san.get_values_for_type(x509.DNSName)
    key = load_ssh_private_key((pki / "sites" / "alpha" / "auth_key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    pub = load_ssh_public_key((pki / "server" / "sites" / "alpha.pub").read_bytes())
    assert pub.public_numbers() == key.public_key().public_numbers()
    assert (pki / "sites" / "alpha" / "auth_key").stat().st_mode & 0o077 == 0
    before = (pki / "sites" / "alpha" / "auth_key").read_bytes()
    assert main(["certs", "create", "--out", str(pki), "--site", "gamma"]) == 0  # adds a site
    assert (pki / "sites" / "alpha" / "auth_key").read_bytes() == before
    assert main(["certs", "create", "--out", str(pki), "--site", "bad/name"]) == 2

    capsys.readouterr()
    assert main(["site", "start", "--name", "alpha", "--data", "sample:bloodmnist", "--server",
                 "coordinator.example.org:9092", "--certs", str(pki / "sites" / "alpha"), "--print"]) == 0
    site_cmd = capsys.readouterr().out
    for flag in ("medveil.federated.flower.site_node", "--root-certificates", "--auth-supernode-private-key",
                 'name="alpha"', "coordinator.example.org:9092"):
        assert flag in site_cmd
    assert "--insecure" not in site_cmd
    assert main(["site", "start", "--name", "alpha", "--data", "sample:bloodmnist", "--server",
                 "coordinator.example.org:9092", "--certs", str(pki / "sites" / "alpha"),
                 "--app-runtime", "flower", "--print"]) == 0
    plain = capsys.readouterr().out
    assert "flower-supernode" in plain and "site_node" not in plain
    assert main(["server", "start", "--certs", str(pki / "server"), "--state", str(tmp_path / "state"),
                 "--print"]) == 0
    link_cmd = capsys.readouterr().out
    for flag in ("flower-superlink", "--ssl-certfile", "--enable-supernode-auth",
                 "--disable-runtime-dependency-installation"):
        assert flag in link_cmd
    assert main(["site", "start", "--name", "alpha", "--data", "x.npz", "--server", "nohost",
                 "--certs", str(pki / "sites" / "alpha"), "--print"]) == 2


def test_print_shows_every_flower_setting_the_launcher_uses(tmp_path, capsys, monkeypatch):
    """``--print`` and the launcher take Flower's variables from one place: none is left out."""
    from medveil.federated.flower.launch import POLL_INTERVAL, flower_env, flower_settings

    monkeypatch.delenv(POLL_INTERVAL, raising=False)

    pki = tmp_path / "pki"
    assert main(["certs", "create", "--out", str(pki), "--site", "alpha"]) == 0
    capsys.readouterr()
    settings = flower_settings(tmp_path / "state" / "flwr")
    assert "FLWR_DISABLE_UPDATE_CHECK" in settings and "FLWR_TELEMETRY_ENABLED" in settings
    for cmd in (["site", "start", "--name", "alpha", "--data", "sample:bloodmnist", "--server",
                 "coordinator.example.org:9092", "--certs", str(pki / "sites" / "alpha"), "--print"],
                ["server", "start", "--certs", str(pki / "server"), "--print"]):
        assert main(cmd) == 0
        shown = capsys.readouterr().out
        assert all(f"{k}=" in shown for k in settings if k != "FLWR_HOME"), shown
    env = flower_env(tmp_path)
    assert all(env[k] == v for k, v in flower_settings(tmp_path).items())


def test_warm_site_runtime_parts(monkeypatch):
    """The pieces of the warm ClientApp runtime that need no processes (the deployment tests run
    it for real): argument parsing, the SuperExec's wake-up wait, Flower's pull back-off."""
    import signal
    import threading
    import time

    from flwr.supercore.inflatable import inflatable_utils

    from medveil.federated.flower import latency, site_node

    argv = ["--superlink", "h:1", "--port", "9094", "--ssl-ca-certfile=/ca.crt"]
    assert site_node._value(argv, "--port") == "9094"
    assert site_node._value(argv, "--ssl-ca-certfile") == "/ca.crt"
    assert site_node._value(argv, "--host") is None
    with pytest.raises(SystemExit, match="isolation"):
        site_node.main([*argv, "--isolation", "subprocess"])

    executor = site_node.ForkExecutor()
    monkeypatch.setattr(site_node, "IDLE_SECONDS", 0.3)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {site_node.WAKE})
    try:
        t0 = time.monotonic()
        executor.wait(0.0)  # nothing pending: sleeps IDLE_SECONDS
        assert 0.25 <= time.monotonic() - t0 < 2.0
        signal.pthread_kill(threading.get_ident(), site_node.WAKE)  # the SuperNode stored a message
        t0 = time.monotonic()
        executor.wait(0.0)
        assert time.monotonic() - t0 < 0.2
        executor.launched = True  # right after a launch: no wait at all
        t0 = time.monotonic()
        executor.wait(0.0)
        assert time.monotonic() - t0 < 0.05 and not executor.launched
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        monkeypatch.setattr(fn, "__kwdefaults__", {**fn.__kwdefaults__, "initial_backoff": 1})  # restored after
    assert latency.fast_object_pulls()
    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        assert fn.__kwdefaults__["initial_backoff"] == latency.PULL_BACKOFF[0]
        assert fn.__kwdefaults__["max_tries_per_object"] is None and fn.__kwdefaults__["max_time"] == 7200

    from medveil.federated.flower.certs import SiteFiles
    from medveil.federated.flower.launch import supernode_command

    site = SiteFiles("alpha", Path("/certs"))
    assert supernode_command(site, "h:1", "x.npz", 9094)[1:3] == ["-m", "medveil.federated.flower.site_node"]
    assert supernode_command(site, "h:1", "x.npz", 9094, app_runtime="flower")[0] == "flower-supernode"
    with pytest.raises(ConfigError, match="app runtime"):
        supernode_command(site, "h:1", "x.npz", 9094, app_runtime="docker")


def test_superexec_watch_restarts_a_dead_runtime_then_gives_up(tmp_path, monkeypatch):
    """A SuperExec that fails is started again (MAX_RESTARTS times), each time with WAKE blocked
    from its first instruction (a wake never kills it); then the SuperNode is stopped (code 1).
    One that stops cleanly stops the SuperNode (code 0)."""
    import signal
    import sys
    import threading

    from medveil.federated.flower import site_node

    monkeypatch.setattr(site_node, "MAX_RESTARTS", 2)
    monkeypatch.setattr(site_node, "RESTART_DELAY_SECONDS", 0.0)
    log = tmp_path / "starts.txt"
    child = ("import signal, sys; blocked = signal.SIGUSR1 in signal.pthread_sigmask(signal.SIG_BLOCK, set()); "
             f"open({str(log)!r}, 'a').write(f'{{blocked}}\\n'); sys.exit(3)")
    stops: list[int] = []
    watch = site_node.SuperExecWatch([sys.executable, "-c", child], stop_node=stops.append)
    assert signal.SIGUSR1 not in signal.pthread_sigmask(signal.SIG_BLOCK, set())  # this thread: unchanged
    thread = threading.Thread(target=watch.watch, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert stops == [1] and watch.restarts == 2
    assert log.read_text().split() == ["True"] * 3  # first start + 2 restarts, all with WAKE blocked
    watch.wake()  # the last one is gone: no error

    monkeypatch.setattr(site_node, "STOP_GRACE_SECONDS", 0.0)
    clean = site_node.SuperExecWatch([sys.executable, "-c", "pass"], stop_node=stops.append)
    clean.watch()  # stopped cleanly (Ctrl-C): not restarted, the SuperNode stops with code 0
    assert stops == [1, 0] and clean.restarts == 0


def test_fork_executor_falls_back_to_flower_subprocess_when_fork_fails(monkeypatch):
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import subprocess_executor
    from flwr.supercore.superexec.executor.types import LaunchResult

    from medveil.federated.flower import site_node

    launched = []

    def no_fork():
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(site_node.os, "fork", no_fork)
    monkeypatch.setattr(subprocess_executor.SubprocessExecutor, "launch",
                        lambda self, spec: launched.append(spec) or LaunchResult.accepted())
    spec = type("Spec", (), {"task_type": TaskType.CLIENT_APP})()
    executor = site_node.ForkExecutor()
    assert executor.launch(spec) == LaunchResult.accepted()
    assert launched == [spec] and not executor.children


def test_site_node_refuses_a_busy_runtime_port():
    import socket

    from medveil.federated.flower import site_node

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit, match=f"port 127.0.0.1:{port} is not free"):
            site_node.main(["--superlink", "h:1", "--port", str(port)])


def test_robust_fedavg_aggregation_bounds_an_outlier():
    from medveil.federated.curation import CurationParams, make_curator, robust_average

    states = [{"w": torch.tensor([1.0, 2.0, 3.0]), "n": torch.tensor([7])},
              {"w": torch.tensor([1.2, 2.2, 3.2]), "n": torch.tensor([7])},
              {"w": torch.tensor([1e6, -1e6, 1e6]), "n": torch.tensor([7])}]  # a poisoned site
    assert torch.allclose(robust_average(states, "median")["w"], torch.tensor([1.2, 2.0, 3.2]))
    five = states + [{"w": torch.tensor([0.8, 1.8, 2.8])}, {"w": torch.tensor([1.1, 2.1, 3.1])}]
    trimmed = robust_average(five, "trimmed_mean", 0.2)["w"]  # cuts the highest and the lowest
    assert torch.allclose(trimmed, torch.tensor([1.1, 5.9 / 3, 3.1]), atol=1e-6)
    assert trimmed.dtype == torch.float32 and robust_average(states, "median")["n"].item() == 7
    with pytest.raises(ConfigError, match="aggregation"):
        make_curator("fedavg", CurationParams(aggregation="mode"))
    with pytest.raises(ConfigError, match="trim_fraction"):
        make_curator("fedavg", CurationParams(aggregation="trimmed_mean", trim_fraction=0.5))
