"""A SuperNode whose ClientApps start warm:
``python -m medveil.federated.flower.site_node <flower-supernode arguments>``.

Flower 1.41 answers every message with a fresh ``flwr-clientapp`` process, started by a SuperExec:
~4 s of CPU importing flwr, torch and medveil before the site's code runs, for every message, at
every site. And an idle SuperNode asks the SuperLink for work every 3 s (fixed in flwr 1.41).
This launcher runs Flower's own SuperNode (``--isolation process``) and, forked off before it
starts, a SuperExec (Flower's loop) that has imported all of that once and forks a child per
message (copy-on-write, so nothing is imported again); the child runs Flower's ``run_clientapp``
exactly as ``flwr-clientapp`` would. The SuperExec sleeps until the SuperNode wakes it (a signal,
sent once a message and its payload are stored; Flower's would poll the Runtime API over TLS, at
~10 ms of CPU per poll); Flower's other fixed waits are shortened (:mod:`.latency`).
TLS, authentication, node config, tokens and messages are Flower's, unchanged.

``medveil site start --app-runtime flower`` runs the plain ``flower-supernode`` instead.
Process tree: SuperNode (this process) -> SuperExec (fork) -> one ClientApp per message (fork);
each child exits when its parent does (Flower's parent-process monitor).
"""

from __future__ import annotations

import os
import signal
import sys
import traceback

APP_RUNTIMES = ("warm", "flower")  # this launcher, or Flower's own fresh process per message
RUNTIME_WAIT_SECONDS = 60.0  # the SuperExec waits this long for the SuperNode's Runtime API
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

    import medveil.evaluate.metrics  # noqa: F401 - sklearn, scipy.stats (~2 s)
    import medveil.federated.client  # noqa: F401
    import medveil.federated.flower.app  # noqa: F401
    import medveil.federated.sites  # noqa: F401
    import medveil.federated.training  # noqa: F401


def _exit_with(body, *args) -> None:
    """In a forked child: run ``body(*args)`` and leave with its exit code; never returns (the
    parent's stack must not run on in the child)."""
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
        pid = os.fork()
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


def run_superexec(runtime_api_address: str, root_certificates: str | None, parent_pid: int) -> None:
    """Flower's SuperExec loop with :class:`ForkExecutor`, after :func:`preload`."""
    from flwr.supercore.superexec import run_superexec as flower_loop

    from medveil.federated.flower.latency import Clock, fast_object_pulls
    from medveil.federated.flower.launch import wait_port

    preload()
    fast_object_pulls()  # inherited by every ClientApp fork
    host, _, port = runtime_api_address.rpartition(":")
    wait_port(host.strip("[]"), int(port), RUNTIME_WAIT_SECONDS)
    executor = ForkExecutor()
    flower_loop.get_executor = lambda *args, **kwargs: executor
    flower_loop.time = Clock(executor.wait)
    flower_loop.run_superexec(runtime_api_address=runtime_api_address, insecure=root_certificates is None,
                              root_certificates_path=root_certificates, parent_pid=parent_pid,
                              runtime_dependency_install=False)


def run_supernode(argv: list[str], superexec_pid: int) -> None:
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
                try:
                    os.kill(superexec_pid, WAKE)
                except ProcessLookupError:
                    pass
            return run_id

        node_loop._pull_and_store_message = pull_store_and_wake
    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


def main(argv: list[str]) -> None:
    if _value(argv, "--isolation") not in (None, "process"):
        raise SystemExit("site_node runs its own SuperExec: do not pass --isolation")
    if _value(argv, "--isolation") is None:
        argv = [*argv, "--isolation", "process"]
    host, port = _value(argv, "--host") or "127.0.0.1", _value(argv, "--port")
    if port is None:
        raise SystemExit("site_node needs --port (the SuperNode's Runtime API port)")
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    node_pid = os.getpid()
    sys.stdout.flush()
    signal.pthread_sigmask(signal.SIG_BLOCK, {WAKE})  # queued for sigtimedwait, never delivered
    superexec_pid = os.fork()
    if superexec_pid == 0:  # the SuperExec; nothing of Flower's or torch's is imported yet
        _exit_with(run_superexec, address, _value(argv, "--ssl-ca-certfile"), node_pid)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {WAKE})
    run_supernode(argv, superexec_pid)


if __name__ == "__main__":
    main(sys.argv[1:])
