"""Starting Flower's processes the MedVeil way: TLS always, SuperNode authentication always,
runtime dependency installation off (sites are offline), telemetry off.

Used by the ``medveil server ...`` / ``medveil site start`` commands, the tests and the benchmark.
Every command is built here, so the documented sequence of raw Flower commands and what the
``medveil`` commands do are the same thing (``medveil ... --print`` shows them).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from medveil.config_io import reject_unknown, toml_value
from medveil.errors import ConfigError, MedVeilError
from medveil.federated.flower.app import RUN_CONFIG_DEFAULTS
from medveil.federated.flower.certs import ServerFiles, SiteFiles
from medveil.federated.flower.site_node import APP_RUNTIMES

CONNECTION = "medveil"  # the SuperLink connection name in FLWR_HOME/config.toml
APP_PYPROJECT = """\
# Flower app bundle (FAB) of MedVeil: the code itself is the installed `medveil` package
# (every site and the coordinator install the same MedVeil version; nothing is installed at run time).
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "medveil-universal"
version = "1.0.0"
description = "MedVeil federated universal medical-imaging model (MedUniverse)"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "medveil"

[tool.flwr.app.components]
serverapp = "medveil.federated.flower.app:server_app"
clientapp = "medveil.federated.flower.app:client_app"

[tool.flwr.app.config]
{config}
"""


def bin_dir() -> Path:
    """The folder of this Python's console scripts (flower-superlink, flwr, ... of the venv)."""
    return Path(sys.executable).parent


def flower_settings(flwr_home: Path | None = None) -> dict[str, str]:
    """Flower's environment variables for every MedVeil process, named once (the launcher and
    ``--print`` both show these): telemetry and update checks off (no calls to the internet from
    a hospital's machine), nothing installed at run time, a 0.2 s task poll (default 1 s: latency
    per message; an environment's own value is kept)."""
    home = {"FLWR_HOME": str(flwr_home)} if flwr_home is not None else {}
    return {**home, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", POLL_INTERVAL: "0.2"}


POLL_INTERVAL = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"


def flower_env(flwr_home: Path | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment with the venv's ``bin/`` first on PATH and
    :func:`flower_settings`."""
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir()}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: v for k, v in flower_settings(flwr_home).items() if k != POLL_INTERVAL or k not in env})
    env.update(extra or {})
    return env


def write_app(folder: Path) -> Path:
    """The Flower app folder that ``flwr run`` bundles (one pyproject.toml)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = "\n".join(f"{k} = {toml_value(v)}" for k, v in RUN_CONFIG_DEFAULTS.items())
    (folder / "pyproject.toml").write_text(APP_PYPROJECT.format(config=config))
    return folder


def write_run_config(path: Path, values: dict[str, object]) -> Path:
    reject_unknown(values, RUN_CONFIG_DEFAULTS, "run config")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()))
    return path


def write_connection(flwr_home: Path, address: str, ca_file: Path) -> Path:
    """FLWR_HOME/config.toml: the ``medveil`` SuperLink connection (TLS, verified by the pilot CA)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                    f'address = "{address}"\nroot-certificates = "{Path(ca_file).resolve()}"\n')
    return path


def superlink_command(server: ServerFiles, host: str, port: int, database: Path | None = None) -> list[str]:
    cmd = ["flower-superlink", "--ssl-ca-certfile", str(server.ca), "--ssl-certfile", str(server.cert),
           "--ssl-keyfile", str(server.key), "--enable-supernode-auth",
           "--disable-runtime-dependency-installation", "--host", host, "--port", str(port)]
    if database is not None:
        cmd += ["--database", str(database)]
    return cmd


def supernode_command(site: SiteFiles, superlink: str, data: str, runtime_port: int,
                      threads: int = 0, device: str = "cpu", data_root: str = "",
                      max_wait: float | None = None, app_runtime: str = "warm", state_dir: str = "",
                      max_epsilon: float = 0.0) -> list[str]:
    """The SuperNode of a site. ``app_runtime="warm"`` (default): Flower's SuperNode through
    :mod:`medveil.federated.flower.site_node` (ClientApps forked from a preloaded process, shorter
    waits); ``"flower"``: plain ``flower-supernode`` (a fresh ``flwr-clientapp`` per message)."""
    if app_runtime not in APP_RUNTIMES:
        raise ConfigError(f"app runtime must be one of {', '.join(APP_RUNTIMES)}, got {app_runtime!r}")
    node = [f'name="{site.name}"', f'data="{data}"', f'device="{device}"', f"threads={int(threads)}"]
    if data_root:
        node.append(f'data-root="{data_root}"')
    if state_dir:  # the site's own state (its DP secret and privacy ledger)
        node.append(f'state-dir="{state_dir}"')
    if max_epsilon > 0:  # the site's own privacy ceiling: it trains only with DP, within this epsilon
        node.append(f"max-epsilon={float(max_epsilon)}")
    start = (["flower-supernode"] if app_runtime == "flower"
             else [sys.executable, "-m", "medveil.federated.flower.site_node"])
    cmd = [*start, "--superlink", superlink, "--root-certificates", str(site.ca),
           "--auth-supernode-private-key", str(site.auth_key), "--node-config", " ".join(node),
           "--host", "127.0.0.1", "--port", str(runtime_port),
           "--ssl-certfile", str(site.cert), "--ssl-keyfile", str(site.key), "--ssl-ca-certfile", str(site.ca)]
    if max_wait is not None:
        cmd += ["--max-wait-time", str(max_wait)]
    return cmd


_GIVEN_PORTS: set[int] = set()  # free_port never hands out a port twice in one process


def free_port() -> int:
    """A loopback port free now and not handed out before by this process (sites and the
    SuperLink started one after another must not race for one port)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _GIVEN_PORTS:
            _GIVEN_PORTS.add(port)
            return port


def wait_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise MedVeilError(f"process exited (code {proc.returncode}) before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise MedVeilError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def flwr(args: list[str], flwr_home: Path, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run the ``flwr`` CLI against the ``medveil`` connection of ``flwr_home``."""
    proc = subprocess.run(["flwr", *args], check=False, env=flower_env(flwr_home), capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise MedVeilError(f"flwr {' '.join(args[:2])} failed: {_flwr_error(proc.stdout + proc.stderr)}")
    return proc


def _flwr_error(text: str) -> str:
    """The message inside flwr's error box (or the last line)."""
    boxed = [line.strip("│ ").strip() for line in text.splitlines() if line.startswith("│")]
    if boxed:
        return " ".join(b for b in boxed if b)
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def register_site(flwr_home: Path, public_key: Path, name: str = "") -> None:
    """Register a site's public key with the SuperLink (``flwr supernode register``)."""
    args = ["supernode", "register", str(public_key), CONNECTION]
    if name:
        args += ["--name", name]
    flwr(args, flwr_home)


def start_run(flwr_home: Path, app_dir: Path, run_config: Path) -> int:
    """``flwr run`` the MedVeil app; returns the run id."""
    proc = flwr(["run", str(app_dir), CONNECTION, "--run-config", str(run_config), "--format", "json"],
                flwr_home, timeout=120.0)
    text = proc.stdout
    payload = json.loads(text[text.index("{"):])
    if not payload.get("success"):
        raise MedVeilError(f"flwr run failed: {payload}")
    return int(payload["run-id"])


def run_status(flwr_home: Path, run_id: int) -> str:
    """Flower's status of a run, e.g. 'running', 'finished:completed', 'finished:failed'."""
    proc = flwr(["ls", CONNECTION, "--run-id", str(run_id), "--format", "json"], flwr_home)
    text = proc.stdout
    runs = json.loads(text[text.index("{"):]).get("runs", [])
    return str(runs[0].get("status", "")) if runs else ""


def wait_for_run(flwr_home: Path, run_id: int, out: Path, timeout: float | None = None,
                 status_every: float = 15.0, on_stage=None) -> str:
    """Until the run folder is complete or Flower reports the run finished; returns Flower's
    status ('finished:completed' when the folder is complete). ``on_stage(n)`` is called as each
    stage checkpoint appears. The folder is checked 4 times a second; Flower's status (a failed
    run) every ``status_every`` s, as each check is a ``flwr ls`` process (~2 CPU-s)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    next_status = time.monotonic() + status_every
    seen: set[str] = set()
    while deadline is None or time.monotonic() < deadline:
        if on_stage is not None:
            for ckpt in sorted((Path(out) / "checkpoints").glob("stage_*.pt")):
                if ckpt.name not in seen:
                    seen.add(ckpt.name)
                    on_stage(int(ckpt.stem.split("_")[1]))
        if (Path(out) / "complete").exists():
            return "finished:completed"
        if time.monotonic() >= next_status:
            status = run_status(flwr_home, run_id)
            if status.startswith("finished"):
                return status
            next_status = time.monotonic() + status_every
        time.sleep(0.25)
    raise MedVeilError(f"run {run_id} not finished after {timeout:.0f} s")


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


@dataclass
class Processes:
    """Child processes, each in its own process group; stopping kills the whole group (the
    SuperExec / ServerApp / ClientApp children too). Use as a context manager."""

    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    def start(self, name: str, cmd: list[str], log_file: Path, env: dict[str, str],
              cwd: Path | None = None) -> subprocess.Popen:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                    start_new_session=True)
        self.procs[name], self.logs[name] = proc, log_file
        return proc

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal the process group and every descendant (Flower's SuperExec starts its own
        session, so a group signal alone would miss it and its app processes)."""
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        _signal([proc.pid, *descendants(proc.pid)], sig)
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def stop_all(self) -> None:
        """SIGTERM every process tree, wait up to 5 s, then SIGKILL whatever is left."""
        trees = {name: [proc.pid, *descendants(proc.pid)] for name, proc in self.procs.items()}
        for pids in trees.values():
            _signal(pids, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for name, pids in trees.items():
            _signal(pids, signal.SIGKILL)
            self.kill(name)

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.logs.get(name)
        if path is None or not path.is_file():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
