"""Running across sites on Flower: ``medveil certs create``, ``medveil server start|register|run``
and ``medveil site start`` (docs/running_across_sites.md). Every command runs Flower's own
processes (flower-superlink, flower-supernode, flwr) with TLS, SuperNode authentication, no
runtime dependency installation and no telemetry; ``--print`` shows the command instead.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path

from medveil.errors import ConfigError, MedVeilError
from medveil.federated.flower.site_node import APP_RUNTIMES

DEFAULT_PORT = 9092
ACTIVATION_REFUSED = "Failed to activate SuperNode"  # flower-supernode's message (exit code 1)
RETRY_SECONDS = 15.0
PRIVACY_DIR = "privacy"  # in a site's --state: its DP ledger and kept releases, per site name
STATE_HELP = "folder for the Flower state of this machine (default: %(default)s)"


def register(subparsers: argparse._SubParsersAction) -> None:
    certs = subparsers.add_parser("certs", help="create the pilot CA, server certificate and site keys")
    csub = certs.add_subparsers(dest="certs_command", metavar="ACTION", required=True)
    create = csub.add_parser(
        "create", help="create (or extend) a pilot PKI: CA, server TLS certificate, per-site keys",
        description="Writes OUT/ca.{crt,key}, OUT/server/ (give it to the coordinator) and "
                    "OUT/sites/NAME/ (give each to its site). Re-running adds new sites and keeps "
                    "existing keys.")
    create.add_argument("--out", type=Path, required=True, metavar="DIR")
    create.add_argument("--server-host", action="append", default=[], metavar="HOST",
                        help="name or IP the sites use to reach the coordinator (repeatable; "
                             "127.0.0.1 and localhost are always included)")
    create.add_argument("--site", action="append", default=[], metavar="NAME",
                        help="a site name, as in the [[clients]] of the federation config (repeatable)")
    create.add_argument("--days", type=int, default=365, help="validity (default: %(default)s)")
    create.set_defaults(func=run_certs_create)

    server = subparsers.add_parser("server", help="the coordinator: SuperLink, site registration, runs")
    ssub = server.add_subparsers(dest="server_command", metavar="ACTION", required=True)
    start = ssub.add_parser("start", help="start the SuperLink (TLS, SuperNode auth) and register the "
                                          "site keys found in CERTS/sites/*.pub; runs until Ctrl-C")
    start.add_argument("--certs", type=Path, required=True, metavar="DIR",
                       help="the server/ folder written by `medveil certs create`")
    start.add_argument("--host", default="0.0.0.0", help="address to listen on (default: %(default)s)")
    start.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default: %(default)s)")
    _state(start, "coordinator")
    start.add_argument("--print", action="store_true", help="print the command instead of running it")
    start.set_defaults(func=run_server_start)

    reg = ssub.add_parser("register", help="register more site public keys with a running SuperLink")
    reg.add_argument("keys", type=Path, nargs="+", metavar="KEY.pub")
    _state(reg, "coordinator")
    reg.set_defaults(func=run_server_register)

    run = ssub.add_parser("run", help="run (or resume) a federation on the connected sites")
    run.add_argument("--config", type=Path, required=True, help="federation TOML ([[clients]] need "
                                                                "only their names; [data] pool_path)")
    run.add_argument("--out", type=Path, required=True, metavar="RUN_DIR")
    run.add_argument("--resume", action="store_true", help="continue RUN_DIR from its last checkpoint")
    run.add_argument("--stage-timeout", type=float, default=3600.0,
                     help="seconds to wait for the sites in each round (default: %(default)s)")
    run.add_argument("--straggler-timeout", type=float, default=0.0,
                     help="once most sites replied, seconds to wait for the rest (0 = off)")
    run.add_argument("--join-timeout", type=float, default=300.0,
                     help="seconds to wait for the sites to connect (default: %(default)s)")
    run.add_argument("--min-sites", type=int, default=0, help="sites to wait for (0 = all configured)")
    run.add_argument("--threads", type=int, default=0, help="torch threads of the server (0 = default)")
    _state(run, "coordinator")
    run.add_argument("--no-wait", action="store_true", help="submit and return the run id")
    run.set_defaults(func=run_server_run)

    site = subparsers.add_parser("site", help="a hospital: connect its private dataset to a federation")
    tsub = site.add_subparsers(dest="site_command", metavar="ACTION", required=True)
    sstart = tsub.add_parser("start", help="start this site's SuperNode; runs until Ctrl-C",
                             description="The dataset never leaves this machine: the site sends "
                                         "only model weights, sample counts and metrics.")
    sstart.add_argument("--name", required=True, help="this site's name (as in the coordinator's config)")
    sstart.add_argument("--data", required=True, help="private dataset: a path, a name under "
                                                       "--data-root, or sample:NAME")
    sstart.add_argument("--data-root", default="", help="folder for dataset names")
    sstart.add_argument("--server", required=True, metavar="HOST:PORT", help="the coordinator")
    sstart.add_argument("--certs", type=Path, required=True, metavar="DIR",
                        help="this site's folder written by `medveil certs create` (sites/NAME)")
    sstart.add_argument("--runtime-port", type=int, default=9094,
                        help="local port of the SuperNode's runtime API (default: %(default)s)")
    sstart.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    sstart.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    sstart.add_argument("--app-runtime", choices=APP_RUNTIMES, default="warm",
                        help="warm: each message's ClientApp is forked from a process that has "
                             "imported torch/medveil once; flower: Flower's fresh process per "
                             "message (~4 s of imports each) (default: %(default)s)")
    sstart.add_argument("--retry-for", type=float, default=180.0, metavar="SECONDS",
                        help="keep retrying when the coordinator refuses activation, e.g. after a "
                             "crash (Flower expires the old session ~60 s later) (default: %(default)s)")
    sstart.add_argument("--max-epsilon", type=float, default=0.0, metavar="EPS",
                        help="this site's own privacy ceiling: train only with differential privacy and never "
                             "past this epsilon, whatever the coordinator asks (default: 0, the run's settings)")
    _state(sstart, "site")
    sstart.add_argument("--print", action="store_true", help="print the command instead of running it")
    sstart.set_defaults(func=run_site_start)

    saudit = tsub.add_parser(
        "audit", help="membership-inference audit of what this site sent, on this site's own data",
        description="The same loss and calibrated attacks as `medveil audit RUN`, run at the site: members are "
                    "its train images used in the run, non-members half of its held-out test images. Targets: "
                    "the last update it sent (kept in --state by `medveil site start`) and, with --model, the "
                    "final universal model the coordinator shared, and its backbone alone (a head fit on non-members). "
                    "Writes audit.json and audit_roc.png.")
    saudit.add_argument("--name", required=True, help="this site's name")
    saudit.add_argument("--model", type=Path, metavar="MODEL", help="the final universal model (RUN/model.pt or an "
                                                                   "export), when the coordinator shared it")
    saudit.add_argument("--out", type=Path, metavar="DIR", help="where to write (default: the site's audit folder "
                                                                "in --state)")
    saudit.add_argument("--nonmembers", choices=("test", "val", "unused-train"),
                        help="the split the non-members come from (default: the run's eval split); as for "
                             "`medveil audit`")
    saudit.add_argument("--max-nonmembers", type=int, default=0, metavar="N",
                        help="held-out images, both halves (default 0: the run's max_test); as for `medveil audit`")
    saudit.add_argument("--reference-split", choices=("random", "grouped"), default="random",
                        help="random (default) or grouped halves of the non-members; as for `medveil audit`")
    saudit.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    _state(saudit, "site")
    saudit.set_defaults(func=run_site_audit)


def _state(parser: argparse.ArgumentParser, kind: str) -> None:
    parser.add_argument("--state", type=Path, default=Path.home() / ".medveil" / kind, help=STATE_HELP)


def _files_exist(*paths: Path) -> None:
    for path in paths:
        if not path.is_file():
            raise ConfigError(f"{path}: not found (run `medveil certs create` and copy the folder)")


def _show(cmd: list[str], env_keys: dict[str, str]) -> None:
    print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env_keys.items()) + " \\\n  "
          + " ".join(shlex.quote(c) for c in cmd))


def _wait(proc: subprocess.Popen) -> int:
    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 130


def _echo_until_exit(proc: subprocess.Popen) -> bool | None:
    """Copy the SuperNode's output to ours until it exits; True if the SuperLink refused to
    activate it, None on Ctrl-C / SIGTERM.

    The SuperNode is reaped as soon as it exits (not when its output ends): its SuperExec child
    shares our pipe and only stops once the SuperNode's pid is gone, so waiting for the end of
    the output would wait forever after a refused activation."""
    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    refused = threading.Event()

    def pump() -> None:
        for line in proc.stdout:
            print(line, end="", flush=True)
            if ACTIVATION_REFUSED in line:
                refused.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        proc.wait()
    except KeyboardInterrupt:
        return None
    reader.join(timeout=5.0)  # the rest of its output (the orphaned SuperExec exits in ~0.2 s)
    return refused.is_set()


# ---- certs -------------------------------------------------------------------------------
def run_certs_create(args: argparse.Namespace) -> int:
    from medveil.federated.flower.certs import create_pki

    paths = create_pki(args.out, args.server_host, args.site, days=args.days)
    print(f"CA: {paths['ca']} (keep {args.out / 'ca.key'} offline)")
    print(f"coordinator: copy {paths['server']} to the coordinator")
    for name in args.site:
        print(f"site {name}: copy {paths['sites'] / name} to that site only")
    return 0


# ---- server ------------------------------------------------------------------------------
def _connection_address(host: str, port: int) -> str:
    return f"127.0.0.1:{port}" if host in ("0.0.0.0", "::", "") else f"{host}:{port}"


def run_server_start(args: argparse.Namespace) -> int:
    from medveil.federated.flower import launch
    from medveil.federated.flower.certs import ServerFiles

    server = ServerFiles(args.certs)
    home = args.state / "flwr"
    cmd = launch.superlink_command(server, args.host, args.port, database=args.state / "superlink.db")
    if args.print:
        _show(cmd, launch.flower_settings(home))
        return 0
    _files_exist(server.ca, server.cert, server.key)
    args.state.mkdir(parents=True, exist_ok=True)
    launch.write_connection(home, _connection_address(args.host, args.port), server.ca)
    env = launch.flower_env(home)
    with launch.Processes() as procs:
        proc = procs.start("superlink", cmd, args.state / "superlink.log", env)
        launch.wait_port(_connection_address(args.host, args.port).rsplit(":", 1)[0], args.port, 60, proc)
        keys = sorted((server.folder / "sites").glob("*.pub"))
        for key in keys:
            _register(home, key)
        print(f"SuperLink listening on {args.host}:{args.port} (TLS, SuperNode authentication); "
              f"{len(keys)} site key(s) registered; log: {args.state / 'superlink.log'}", flush=True)
        print("next: `medveil server run --config CONFIG --out RUN_DIR` once the sites are up; "
              "Ctrl-C stops the SuperLink", flush=True)
        return _wait(proc)


def _register(home: Path, key: Path) -> None:
    from medveil.federated.flower import launch

    try:
        launch.register_site(home, key, name=key.stem)
        print(f"registered site key {key.name}")
    except MedVeilError as err:
        if "already" not in str(err).lower():
            raise
        print(f"site key {key.name} already registered")


def run_server_register(args: argparse.Namespace) -> int:
    for key in args.keys:
        _files_exist(key)
        _register(args.state / "flwr", key)
    return 0


def run_server_run(args: argparse.Namespace) -> int:
    from medveil.federated.config import load_config
    from medveil.federated.engine import check_run_folder, summary_table
    from medveil.federated.flower import launch
    from medveil.federated.flower.app import check_remote_config

    home = args.state / "flwr"
    if not (home / "config.toml").is_file():
        raise ConfigError(f"{home}: no SuperLink connection; start it first with `medveil server start`")
    config, out = args.config.resolve(), args.out.resolve()
    check_remote_config(load_config(config, remote_clients=True))  # fail here, not in the ServerApp
    check_run_folder(out, args.resume)
    values = {"config": str(config), "out": str(out), "resume": args.resume,
              "stage-timeout": args.stage_timeout, "straggler-timeout": args.straggler_timeout,
              "join-timeout": args.join_timeout, "min-sites": args.min_sites, "threads": args.threads}
    app = launch.write_app(args.state / "app")
    rc = launch.write_run_config(args.state / "runs" / f"{out.name}.toml", values)
    run_id = launch.start_run(home, app, rc)
    print(f"run {run_id} started; server log: `FLWR_HOME={home} flwr log {run_id} {launch.CONNECTION}`",
          flush=True)
    if args.no_wait:
        return 0
    status = launch.wait_for_run(home, run_id, out,
                                 on_stage=lambda s: print(f"stage {s} done (checkpoint saved)", flush=True))
    if status != "finished:completed":
        raise MedVeilError(f"run {run_id} ended with status {status}; see `flwr log {run_id}`; "
                           f"resume with --resume")
    if (out / "metrics.json").is_file():
        import json

        print(summary_table(json.loads((out / "metrics.json").read_text())))
    print(f"run folder: {out}")
    return 0


# ---- site --------------------------------------------------------------------------------
def run_site_start(args: argparse.Namespace) -> int:
    from medveil.federated.flower import launch
    from medveil.federated.flower.certs import SiteFiles, check_site_name

    check_site_name(args.name)
    host, _, port = args.server.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--server must be HOST:PORT, got {args.server!r}")
    site = SiteFiles(args.name, args.certs)
    home = args.state / "flwr"
    cmd = launch.supernode_command(site, args.server, args.data, args.runtime_port, threads=args.threads,
                                   device=args.device, data_root=args.data_root,
                                   app_runtime=args.app_runtime, state_dir=str(args.state.resolve() / PRIVACY_DIR),
                                   max_epsilon=args.max_epsilon)
    if args.print:
        _show(cmd, launch.flower_settings(home))
        return 0
    _files_exist(site.ca, site.auth_key, site.cert, site.key)
    from medveil.data.roots import resolve_path

    if args.data_root:
        os.environ["MEDVEIL_DATA_ROOT"] = args.data_root
    resolve_path(args.data)  # a missing dataset fails now, with a one-line error
    home.mkdir(parents=True, exist_ok=True)
    env = launch.flower_env(home, {"MEDVEIL_DATA_ROOT": args.data_root} if args.data_root else None)
    print(f"site {args.name}: connecting to {args.server} (TLS); the data stays here", flush=True)
    deadline = time.monotonic() + args.retry_for
    with launch.Processes() as procs:
        while True:
            proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, bufsize=1)
            procs.procs["supernode"] = proc
            refused = _echo_until_exit(proc)
            if refused is None:
                return 130  # Ctrl-C / SIGTERM: the context manager stops the SuperNode tree
            code = proc.wait()
            if not refused or time.monotonic() > deadline:
                if refused:
                    raise MedVeilError(f"the coordinator refused site {args.name!r}: is its key "
                                       f"registered (`medveil server register`)?")
                return code
            print(f"site {args.name}: activation refused (unregistered key, or the previous session "
                  f"of this site has not expired yet); retrying in {RETRY_SECONDS:.0f} s", flush=True)
            time.sleep(RETRY_SECONDS)


def run_site_audit(args: argparse.Namespace) -> int:
    from medveil.evaluate.audit import audit_site_state, format_table
    from medveil.federated.flower.certs import check_site_name

    check_site_name(args.name)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = audit_site_state(args.state.resolve() / PRIVACY_DIR, args.name, args.model, args.out, args.nonmembers,
                              args.reference_split, args.max_nonmembers)
    print(format_table(result))
    print(f"written: {(args.out or args.state / PRIVACY_DIR / args.name / 'audit')}/audit.json, audit_roc.png")
    return 0
