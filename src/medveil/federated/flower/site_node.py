"""A SuperNode whose ClientApps start warm:
``python -m medveil.federated.flower.site_node <flower-supernode arguments>``.

Flower 1.42 (as 1.41) answers every message with a fresh ``flwr-clientapp`` process, started by a
SuperExec: ~4 s of CPU importing flwr, torch and medveil before the site's code runs, for every
message, at every site. And an idle SuperNode asks the SuperLink for work every 3 s (fixed in
flwr 1.41 and 1.42).
This launcher runs Flower's own SuperNode (``--isolation process``) and, as its child, a SuperExec
(Flower's loop) that has imported all of that once and forks a child per
message (copy-on-write, so nothing is imported again); the child runs Flower's ``run_clientapp``
exactly as ``flwr-clientapp`` would. The SuperExec sleeps until the SuperNode wakes it (a signal,
sent once a message and its payload are stored; Flower's would poll the Runtime API over TLS, at
~10 ms of CPU per poll); Flower's other fixed waits are shortened (:mod:`.latency`).
TLS, authentication, node config, tokens and messages are Flower's, unchanged.

``medveil site start --app-runtime flower`` runs the plain ``flower-supernode`` instead.
Process tree: SuperNode (this process) -> SuperExec (``site_node superexec ...``, a child process)
-> one ClientApp per message (fork); each child exits when its parent does (Flower's
parent-process monitor). The SuperNode watches its SuperExec: one that dies is reported in the
site log and started again (MAX_RESTARTS times; then the SuperNode stops with exit code 1), so a
site never sits connected but deaf. The SuperExec prints READY once it serves messages.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback

APP_RUNTIMES = ("warm", "flower")  # this launcher, or Flower's own fresh process per message
READY = "MedVeil ClientApp runtime ready"  # the SuperExec's line in the site log
MAX_RESTARTS = 3  # a SuperExec that dies is started again this often, then the SuperNode stops
RESTART_DELAY_SECONDS = 2.0
STOP_GRACE_SECONDS = 10.0  # a SuperExec that stopped cleanly: the SuperNode has this long to stop too
IDLE_SECONDS = 2.0  # the SuperExec asks for a task at least this often (and when woken)
WAKE = signal.SIGUSR1  # SuperNode -> SuperExec: a message (with its payload) has been stored


def _value(argv: list[str], flag: str) -> str | None:
    """The value of ``flag VALUE`` or ``flag=VALUE`` in a flower-supernode command line."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def preload() -> None:
    """Everything a ClientApp message needs, imported once in the SuperExec before it forks."""
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401 - torch.optim imports it at the first optimizer (~3 s)
    from flwr.supernode.runtime import run_clientapp  # noqa: F401

    import medveil.metrics  # noqa: F401 - sklearn, scipy.stats (~2 s)
    import medveil.federated.client  # noqa: F401
    import medveil.federated.flower.app  # noqa: F401
    import medveil.federated.sites  # noqa: F401
    import medveil.federated.training  # noqa: F401


def _exit_with(body, *args) -> None:
    """In a child process: run ``body(*args)`` and leave with its exit code; never returns (in a
    fork, the parent's stack must not run on in the child)."""
    code = 1
    try:
        body(*args)
        code = 0
    except SystemExit as done:  # Flower's loops end in flwr_exit -> sys.exit
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:  # noqa: BLE001 - report, then leave with a failure code
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _run_clientapp(spec) -> None:
    """Flower's ``flwr-clientapp`` body for one task, in a fork of the SuperExec."""
    from flwr.supercore.exit import exit_handler
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    exit_handler.registered_exit_handlers.clear()  # the SuperExec's own (its client, executor)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {WAKE})
    run_clientapp(runtime_api_address=spec.runtime_api_address, token=spec.token, insecure=spec.insecure,
                  certificates=validate_and_resolve_root_certificates(spec.root_certificates_path,
                                                                       spec.insecure),
                  parent_pid=spec.parent_pid, runtime_dependency_install=spec.runtime_dependency_install)


class ForkExecutor:
    """Flower's executor interface (flwr.supercore.superexec.executor): a ClientApp task runs in
    a fork of this preloaded process; any other task type as Flower's subprocess."""

    def __init__(self) -> None:
        self.children: set[int] = set()
        self.launched = False  # a task was just taken: ask for the next one without waiting

    def get_eligible_capacity(self, supported_task_types, *, insecure: bool = False,
                              root_certificates_path: str | None = None):
        return supported_task_types, set()

    def wait_for_capacity(self, task_type=None, *, fab_hash=None, insecure: bool = False,
                          root_certificates_path: str | None = None) -> None:
        return None

    def launch(self, spec):
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor.subprocess_executor import (
            SubprocessExecutor,
        )
        from flwr.supercore.superexec.executor.types import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return SubprocessExecutor().launch(spec)
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as err:  # e.g. no memory for a copy of this process: Flower's own way
            print(f"site_node: cannot fork a ClientApp ({err.strerror}); this message runs in a "
                  f"fresh flwr-clientapp process", flush=True)
            return SubprocessExecutor().launch(spec)
        if pid == 0:
            _exit_with(_run_clientapp, spec)
        self.children.add(pid)
        self.launched = True
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished ClientApps (called by Flower's loop before every poll)."""
        for pid in list(self.children):
            try:
                done, _status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.children.discard(pid)

    def close(self) -> None:
        return None  # running ClientApps stop on their own when this process is gone

    def wait(self, _seconds: float) -> None:
        """Flower's loop sleeps here between polls: until woken, IDLE_SECONDS at most, or not at
        all right after a launch (signals coalesce: two messages may have come with one)."""
        if self.launched:
            self.launched = False
            return
        signal.sigtimedwait({WAKE}, IDLE_SECONDS)


def _wait_for_runtime_api(address: str, parent_pid: int) -> bool:
    """Until the SuperNode's Runtime API accepts connections (True), or the SuperNode is gone."""
    host, _, port = address.rpartition(":")
    waited = 0.0
    while os.getppid() == parent_pid:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                return True
        except OSError:
            time.sleep(0.2)
            waited += 0.2
            if waited >= 30.0:
                print(f"site_node: still waiting for the SuperNode's Runtime API at {address}", flush=True)
                waited = 0.0
    return False


def run_superexec(runtime_api_address: str, root_certificates: str | None, parent_pid: int) -> None:
    """Flower's SuperExec loop with :class:`ForkExecutor`, after :func:`preload`. Started with WAKE
    blocked (inherited mask): wakes queue for sigtimedwait; the handler only catches a wake that a
    thread with WAKE unblocked would otherwise die of."""
    from flwr.supercore.superexec import run_superexec as flower_loop

    from medveil.federated.flower.latency import Clock, fast_object_pulls

    signal.signal(WAKE, lambda *_: None)
    signal.pthread_sigmask(signal.SIG_BLOCK, {WAKE})
    start = time.perf_counter()
    preload()
    fast_object_pulls()  # inherited by every ClientApp fork
    if not _wait_for_runtime_api(runtime_api_address, parent_pid):
        return
    print(f"{READY}: preloaded in {time.perf_counter() - start:.1f} s, Runtime API {runtime_api_address}",
          flush=True)
    executor = ForkExecutor()
    flower_loop.get_executor = lambda *args, **kwargs: executor
    flower_loop.time = Clock(executor.wait)
    flower_loop.run_superexec(runtime_api_address=runtime_api_address, insecure=root_certificates is None,
                              root_certificates_path=root_certificates, parent_pid=parent_pid,
                              runtime_dependency_install=False)


class SuperExecWatch:
    """The SuperNode's SuperExec child (``cmd``): started with WAKE blocked in it from its first
    instruction, woken, and started again when it dies."""

    def __init__(self, cmd: list[str], stop_node=os._exit) -> None:
        self.cmd, self.stop_node = cmd, stop_node  # stop_node(exit code)
        self.restarts = 0
        self.proc = self._spawn()

    @classmethod
    def for_runtime_api(cls, address: str, root_certificates: str | None) -> SuperExecWatch:
        return cls([sys.executable, "-m", "medveil.federated.flower.site_node", "superexec", address,
                    str(os.getpid()), *([root_certificates] if root_certificates else [])])

    def _spawn(self) -> subprocess.Popen:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {WAKE})  # the child inherits this thread's mask
        try:
            return subprocess.Popen(self.cmd)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def wake(self) -> None:
        try:
            os.kill(self.proc.pid, WAKE)
        except ProcessLookupError:
            pass

    def watch(self) -> None:
        """In a daemon thread of the SuperNode: replace a SuperExec that failed; stop the SuperNode
        when it stopped cleanly (Ctrl-C / SIGTERM: the SuperNode is normally stopping already, and
        this thread ends with it) or failed MAX_RESTARTS times."""
        while True:
            code = self.proc.wait()
            if code == 0:
                time.sleep(STOP_GRACE_SECONDS)
                print("site_node: the ClientApp runtime (SuperExec) stopped; stopping this SuperNode", flush=True)
                self.stop_node(0)
                return
            if self.restarts >= MAX_RESTARTS:
                print(f"site_node: the ClientApp runtime (SuperExec) exited with code {code} after "
                      f"{MAX_RESTARTS} restarts; stopping this SuperNode", flush=True)
                self.stop_node(1)
                return
            self.restarts += 1
            print(f"site_node: the ClientApp runtime (SuperExec) exited with code {code}; starting it "
                  f"again ({self.restarts}/{MAX_RESTARTS})", flush=True)
            time.sleep(RESTART_DELAY_SECONDS)
            self.proc = self._spawn()


def run_supernode(argv: list[str], superexec: SuperExecWatch) -> None:
    """Flower's ``flower-supernode`` with ``argv``, with MedVeil's shorter waits (latency.py),
    waking the SuperExec whenever a message has been stored."""
    import flwr.supernode.start_client_internal as node_loop
    from flwr.supernode.cli.flower_supernode import flower_supernode

    from medveil.federated.flower.latency import fast_object_pulls, fast_supernode_poll

    fast_supernode_poll()
    fast_object_pulls()
    pull_and_store = getattr(node_loop, "_pull_and_store_message", None)
    if pull_and_store is not None:  # else the SuperExec finds tasks by its IDLE_SECONDS poll

        def pull_store_and_wake(*args, **kwargs):
            run_id = pull_and_store(*args, **kwargs)
            if run_id is not None:
                superexec.wake()
            return run_id

        node_loop._pull_and_store_message = pull_store_and_wake
    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the Runtime API binds it
        try:
            sock.bind((host, port))
        except OSError as err:
            raise SystemExit(f"site_node: the Runtime API port {host}:{port} is not free "
                             f"({err.strerror})") from None


def main(argv: list[str]) -> None:
    if argv[:1] == ["superexec"]:  # the child that SuperExecWatch starts
        address, parent_pid, *ca = argv[1:]
        _exit_with(run_superexec, address, ca[0] if ca else None, int(parent_pid))
    if _value(argv, "--isolation") not in (None, "process"):
        raise SystemExit("site_node runs its own SuperExec: do not pass --isolation")
    if _value(argv, "--isolation") is None:
        argv = [*argv, "--isolation", "process"]
    host, port = _value(argv, "--host") or "127.0.0.1", _value(argv, "--port")
    if port is None:
        raise SystemExit("site_node needs --port (the SuperNode's Runtime API port)")
    _check_port_free(host, int(port))
    superexec = SuperExecWatch.for_runtime_api(f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
                                               _value(argv, "--ssl-ca-certfile"))
    threading.Thread(target=superexec.watch, name="superexec-watch", daemon=True).start()
    run_supernode(argv, superexec)


if __name__ == "__main__":
    main(sys.argv[1:])
