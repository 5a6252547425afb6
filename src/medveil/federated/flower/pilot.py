"""A whole Flower deployment on one machine (loopback): PKI, a SuperLink with TLS and SuperNode
authentication, one SuperNode per site, ``flwr run`` of the MedVeil app. For the tests, the
overhead benchmark and trying the site/coordinator commands locally; real sites run the same
commands on their own machines (docs/running_across_sites.md).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any, Self

from medveil.errors import MedVeilError
from medveil.federated.flower import launch
from medveil.federated.flower.certs import create_pki, server_files, site_files
from medveil.federated.flower.site_node import READY


class LocalPilot:
    """Start with ``start_link()``, ``register(...)``, ``start_site(...)`` (``wait_ready(...)``);
    ``run(...)``; always ``close()`` (or use as a context manager): every process tree is killed."""

    def __init__(self, workdir: Path, sites: dict[str, str], threads: int = 1,
                 extra_env: dict[str, str] | None = None, app_runtime: str = "warm") -> None:
        self.workdir = Path(workdir)
        self.sites = dict(sites)  # name -> dataset (path / sample:NAME)
        self.threads = threads
        self.app_runtime = app_runtime  # site_node.APP_RUNTIMES
        self.extra_env = dict(extra_env or {})
        self.pki = self.workdir / "pki"
        self.link_home = self.workdir / "coordinator"
        self.procs = launch.Processes()
        self.port = 0
        self._log_offset: dict[str, int] = {}  # site -> size of its log when it was last started

    # ---- setup ---------------------------------------------------------------------------
    def create_pki(self, unregistered: list[str] = ()) -> None:
        create_pki(self.pki, ["127.0.0.1"], [*self.sites, *unregistered])

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start_link(self, timeout: float = 60.0, env: dict[str, str] | None = None) -> None:
        self.port = launch.free_port()
        cmd = launch.superlink_command(server_files(self.pki), "127.0.0.1", self.port)
        proc = self.procs.start("superlink", cmd, self.workdir / "logs" / "superlink.log",
                                launch.flower_env(self.link_home, {**self.extra_env, **(env or {})}),
                                cwd=self.workdir)
        try:
            launch.wait_port("127.0.0.1", self.port, timeout, proc)
        except MedVeilError as err:
            raise MedVeilError(f"{err}\n{self.procs.log_tail('superlink')}") from None
        launch.write_connection(self.link_home, self.address, server_files(self.pki).ca)

    def register(self, names: list[str] | None = None) -> None:
        """Register sites' public keys, concurrently (each ``flwr`` call costs ~1 s of start-up)."""
        names = list(self.sites) if names is None else names
        env = launch.flower_env(self.link_home)
        procs = [subprocess.Popen(["flwr", "supernode", "register", str(server_files(self.pki).site_pub(n)),
                                   launch.CONNECTION], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for n in names]
        for name, proc in zip(names, procs, strict=True):
            out, _ = proc.communicate(timeout=60)
            if proc.returncode != 0:
                raise MedVeilError(f"registering site {name!r} failed: {out.strip()[-300:]}")

    def start_site(self, name: str, data: str | None = None, max_wait: float | None = None) -> subprocess.Popen:
        self._mark_log(name)
        cmd = launch.supernode_command(site_files(self.pki, name), self.address,
                                       data if data is not None else self.sites[name],
                                       launch.free_port(), threads=self.threads, max_wait=max_wait,
                                       app_runtime=self.app_runtime,
                                       state_dir=str(self.workdir / f"site_{name}" / "privacy"))
        return self.procs.start(f"site:{name}", cmd, self._site_log(name),
                                launch.flower_env(self.workdir / f"site_{name}", self.extra_env),
                                cwd=self.workdir)

    def start_site_command(self, name: str, retry_for: float = 180.0) -> subprocess.Popen:
        """The site operator's way, ``medveil site start``: it retries while the SuperLink refuses
        the site (e.g. until the session of a crashed SuperNode with this key has expired)."""
        cmd = [str(launch.bin_dir() / "medveil"), "site", "start", "--name", name,
               "--data", self.sites[name], "--server", self.address,
               "--certs", str(site_files(self.pki, name).folder),
               "--runtime-port", str(launch.free_port()), "--threads", str(self.threads),
               "--app-runtime", self.app_runtime,
               "--retry-for", str(retry_for),
               "--state", str(self.workdir / f"site_{name}")]
        self._mark_log(name)
        return self.procs.start(f"site:{name}", cmd, self._site_log(name),
                                launch.flower_env(None, self.extra_env), cwd=self.workdir)

    def _site_log(self, name: str) -> Path:
        return self.workdir / "logs" / f"site_{name}.log"

    def _mark_log(self, name: str) -> None:
        log = self._site_log(name)
        self._log_offset[name] = log.stat().st_size if log.is_file() else 0

    def wait_ready(self, names: list[str] | None = None, timeout: float = 180.0) -> None:
        """Until every site started last is activated by the SuperLink and (warm runtime) has its
        ClientApp runtime loaded; a site that exits first, or takes longer, raises with its log."""
        names = list(self.sites) if names is None else names
        markers = ["SuperNode ID", *([READY] if self.app_runtime == "warm" else [])]
        deadline = time.monotonic() + timeout
        for name in names:
            log, proc = self._site_log(name), self.procs.procs.get(f"site:{name}")
            while True:
                text = log.read_bytes()[self._log_offset.get(name, 0):].decode(errors="replace") \
                    if log.is_file() else ""
                if all(m in text for m in markers):
                    break
                if proc is None or proc.poll() is not None or time.monotonic() > deadline:
                    why = "is not running" if proc is None or proc.poll() is not None else \
                        f"is not ready after {timeout:.0f} s"
                    raise MedVeilError(f"site {name!r} {why}\n{self.procs.log_tail(f'site:{name}', 40)}")
                time.sleep(0.2)

    def kill_site(self, name: str) -> None:
        self.procs.kill(f"site:{name}")

    # ---- runs ----------------------------------------------------------------------------
    def submit(self, config: Path, out: Path, **run_config: Any) -> int:
        values = {"config": str(Path(config).resolve()), "out": str(Path(out).resolve()),
                  "threads": self.threads, **{k.replace("_", "-"): v for k, v in run_config.items()}}
        app = launch.write_app(self.link_home / "app")
        rc = launch.write_run_config(self.link_home / "runs" / f"{Path(out).name}.toml", values)
        return launch.start_run(self.link_home, app, rc)

    def wait(self, run_id: int, out: Path, timeout: float, status_every: float = 15.0) -> str:
        """Until the run folder is complete or Flower reports the run finished; returns the status."""
        try:
            return launch.wait_for_run(self.link_home, run_id, out, timeout, status_every)
        except MedVeilError as err:
            raise MedVeilError(f"{err}\n{self.procs.log_tail('superlink', 40)}") from None

    def run(self, config: Path, out: Path, timeout: float = 600.0, **run_config: Any) -> str:
        return self.wait(self.submit(config, out, **run_config), out, timeout)

    def close(self) -> None:
        self.procs.stop_all()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
