"""A real local 3-node RabbitMQ cluster for integration tests, and its pytest fixture.

The cluster runs beside the shared broker (``rabbit@localhost``, AMQP 5672, dist
25672), which it never touches; it shares only the running epmd (4369).  Each
run gets its own temporary directory (``$TMPDIR/towerws-rabbitcluster-*``) that
holds everything the nodes write: the Erlang cookie (``home/.erlang.cookie``,
mode 400, random), an empty ``rabbitmq-env.conf`` (the system one forces
``NODENAME=rabbit@localhost``), ``rabbitmq.conf``, ``advanced.config``,
``enabled_plugins`` (``[].``), and per node its Mnesia and log bases, pid file,
plugins expand dir and ``stdout.log``.  Node names are unique per run
(``twsA-<hex>@localhost``, B, C); AMQP and distribution ports are picked free
at start, all on 127.0.0.1.  ``rabbitmq.conf`` sets ``net_ticktime = 15`` so a
hung node is declared down in seconds rather than minutes.

The nodes are started with ``/usr/lib/rabbitmq/bin/rabbitmq-server`` itself
(the ``/usr/sbin`` wrappers switch to the ``rabbitmq`` user and its cookie),
each in a session of its own (``setsid``): the ``rabbitmq-server`` shell and its
``beam.smp`` are one process group that teardown kills; what ``beam.smp``
spawns (``erl_child_setup``, ``inet_gethost``) calls ``setsid`` itself, so
teardown also finds those by the node name in their environment.  Nodes A, B
and C boot in parallel; B and C then join A (``stop_app; join_cluster;
start_app``).

Use it through the ``rabbit_cluster`` fixture (session-scoped: one cluster per
session, built only when a test asks for it, skipped when RabbitMQ is not
installed).  Before every test that uses it, except the first, the fixture
calls :meth:`RabbitCluster.reset` so each test starts with 3 healthy nodes.

API (node arguments are full node names, as in ``nodes``): ``nodes``, ``urls``,
``url_of(node)``, ``node_of_port(port)``; faults ``kill``, ``restart``,
``freeze``, ``thaw``, ``heal``, ``stop_all``, ``start_all``; health
``wait_healthy(timeout)``, ``reset()``, ``status(node)``, ``connected(node)``;
``queue_leader(queue)``; ``ctl(node, *args)`` runs any rabbitmqctl command.
These shell out and block for seconds; asyncio tests call them through
``await cluster.run_async(cluster.kill, node)`` (``loop.run_in_executor`` on a
worker thread of the cluster's own, bounded).

Measured here (RabbitMQ 3.10.8, Erlang 25.2.3, 2 cores shared with other test
runs; ranges over 6 runs, the high ends under load):

* boot of the three nodes in parallel, until ``await_startup`` returns: 11-16 s;
  clustering (B and C joined, all views healthy): 6-12 s.  The fixture's first
  test pays both, ~20-25 s.
* one ``rabbitmqctl`` call: 0.4-1.6 s (it boots an Erlang VM); a health check
  (``cluster_status`` of all three in parallel): 0.8-2 s.
* ``kill``: immediate; ``restart`` of the killed node until ``await_startup``:
  4.5-6.5 s, then 1-2.3 s until ``wait_healthy`` passes, so ~6-9 s in all.
* a SIGSTOP'd node is declared down (``net_tick_timeout`` in the others' logs,
  gone from their ``nodes()``) after 16-19 s (``net_ticktime = 15``, ± 25 %).
  Until then ``cluster_status`` of *any* node blocks (one call took 33 s):
  use :meth:`connected` to watch for it.  Right after SIGCONT, the thawed
  node was partitioned in 3 of 6 runs; ``heal`` takes 1.6-3.3 s, then ~1-2 s
  until healthy.
* ``stop_all`` 2-4 s, ``start_all`` until healthy 10-17 s, teardown 2-4 s;
  ``reset`` of one killed node plus one stopped app: ~8 s.

Version quirks (3.10.8): ``RABBITMQ_CONFIG_FILE`` works with or without the
``.conf`` suffix (without one, RabbitMQ appends it); ``rabbitmq-server`` run in
the foreground stays a shell that waits for ``beam.smp`` (it does not exec), so
the process to signal is the ``beam.smp`` child, not the started process.
``rabbitmqctl`` opens a distribution listener of its own in 35672-35682 by
default; ours use ephemeral ports (``RABBITMQ_CTL_DIST_PORT_MIN/MAX = 0``) so
many calls in parallel, here and in other test runs, never run out of ports.

Leftovers: :meth:`RabbitCluster.close` runs at session end and from an
``atexit`` handler; a run killed outright (SIGKILL) leaves its nodes running,
so :meth:`RabbitCluster.start` first sweeps the directories of runs whose
owning process is gone and kills the nodes marked with that directory.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

log = logging.getLogger(__name__)

T = TypeVar("T")

SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
CTL = Path("/usr/lib/rabbitmq/bin/rabbitmqctl")
DIR_PREFIX = "towerws-rabbitcluster-"
# Set in every node's environment: how a later run recognises a crashed run's nodes.
MARKER = "TOWERWS_RABBITCLUSTER_DIR"

# Ports never to hand to a node: the shared broker's, epmd's, and the range the
# default rabbitmqctl (of other users of the shared broker) listens in.
_RESERVED_PORTS = {4369, 5672, 15672, 25672, *range(35672, 35683)}

RABBITMQ_CONF = """\
loopback_users = none
vm_memory_high_watermark.relative = 0.1
cluster_partition_handling = pause_minority
net_ticktime = 15
"""


class ClusterError(RuntimeError):
    """The cluster did not do what was asked in time (the message names the node and its log tail)."""


def missing() -> str | None:
    """Why a cluster cannot be started here, or None when it can."""
    for binary in (SERVER, CTL):
        if not os.access(binary, os.X_OK):
            return f"RabbitMQ cluster tests need {binary} (the rabbitmq-server package): not found"
    return None


# -- processes -------------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[str, str, int] | None:
    """(comm, state, pgid) of a live process, or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm is in parentheses and may itself contain spaces or parentheses.
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    state, _ppid, pgid = stat[stat.rindex(")") + 2 :].split()[:3]
    return comm, state, int(pgid)


def _pids() -> Iterator[int]:
    return (int(entry) for entry in os.listdir("/proc") if entry.isdigit())


def _group(pgid: int) -> dict[int, str]:
    """The live (non-zombie) processes of a process group: pid -> command name."""
    members = {}
    for pid in _pids():
        stat = _proc_stat(pid)
        if stat is not None and stat[2] == pgid and stat[1] != "Z":
            members[pid] = stat[0]
    return members


def _killpg(pgid: int) -> None:
    if pgid == os.getpgrp():  # never our own group, whatever a stale file says
        return
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _marked(marker: str) -> dict[int, int]:
    """Live processes whose environment holds the entry ``marker`` (``NAME=value``): pid -> pgid."""
    entry = f"{marker}\0".encode()
    found = {}
    for pid in _pids():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # gone meanwhile, or not ours
        stat = _proc_stat(pid)
        # A zombie's environ reads empty; the check on the state is for a race.
        if entry in environ and stat is not None and stat[1] != "Z":
            found[pid] = stat[2]
    return found


def _kill_marked(marker: str, timeout: float) -> dict[int, int]:
    """SIGKILL every process marked with ``marker`` (and its process group); wait until none is left.

    Returns what it found alive at first (empty: nothing to kill).
    """
    found = _marked(marker)
    deadline = time.monotonic() + timeout
    while left := _marked(marker):
        for pid, pgid in left.items():
            _killpg(pgid)
            try:
                # erl_child_setup and inet_gethost call setsid(): groups of their own.
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise ClusterError(f"processes {left} still there {timeout:.0f} s after SIGKILL")
        time.sleep(0.05)
    return found


def _free_ports(count: int) -> list[int]:
    """``count`` distinct local ports nothing listens on (just now), none of the reserved ones."""
    socks: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            sock = socket.socket()
            socks.append(sock)  # held open until the end, so the kernel hands out distinct ports
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            if port not in _RESERVED_PORTS:
                ports.append(port)
    finally:
        for sock in socks:
            sock.close()
    return ports


@dataclass
class _Result:
    """What one rabbitmqctl call did; ``rc`` is None when it timed out (and was killed)."""

    rc: int | None
    out: str
    err: str

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def why(self) -> str:
        if self.rc is None:
            return "timed out"
        return f"exit {self.rc}: {(self.err or self.out).strip()[-500:]}"


def _run_many(commands: list[tuple[list[str], dict[str, str]]], timeout: float) -> list[_Result]:
    """Run commands in parallel (own sessions, so a timeout kills each whole tree), bounded."""
    procs = [
        subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True,
        )
        for argv, env in commands
    ]
    deadline = time.monotonic() + timeout
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            results.append(_Result(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")))
        except subprocess.TimeoutExpired:
            _killpg(proc.pid)
            try:
                out, err = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:  # something it spawned holds the pipes open
                proc.kill()
                out, err = b"", b""
            results.append(_Result(None, out.decode(errors="replace"), err.decode(errors="replace")))
    return results


# -- the nodes -------------------------------------------------------------------------


@dataclass
class _Node:
    name: str
    amqp_port: int
    dist_port: int
    dir: Path
    env: dict[str, str] = field(repr=False)
    proc: subprocess.Popen[bytes] | None = None
    frozen: bool = False

    @property
    def log(self) -> Path:
        return self.dir / "log" / f"{self.name}.log"

    @property
    def stdout(self) -> Path:
        return self.dir / "stdout.log"

    def alive(self) -> bool:
        """Its rabbitmq-server shell is still there (it exits when beam.smp does)."""
        return self.proc is not None and self.proc.poll() is None

    def beam(self) -> int | None:
        """The pid of the node's Erlang VM (a child of the rabbitmq-server shell), if it runs."""
        if self.proc is None:
            return None
        return next((pid for pid, comm in _group(self.proc.pid).items() if comm == "beam.smp"), None)

    def tail(self, lines: int = 15) -> str:
        """The end of its log (or of its stdout when the log is not there yet), for error messages."""
        parts = []
        for path in (self.stdout, self.log):
            try:
                text = path.read_text(errors="replace").splitlines()[-lines:]
            except FileNotFoundError:
                continue
            parts.append(f"--- {path}:\n" + "\n".join(text))
        return "\n".join(parts) or "(no log written)"


_open_clusters: set[RabbitCluster] = set()


@atexit.register
def _close_open_clusters() -> None:
    # A session that ends without running fixture teardown (an internal error,
    # a KeyboardInterrupt during setup) must not leave Erlang VMs behind.
    for cluster in list(_open_clusters):
        cluster.close(graceful=False)


class RabbitCluster:
    """A local RabbitMQ cluster of ``size`` nodes, controlled with rabbitmqctl and signals.

    Not thread-safe: drive it from one thread at a time (:meth:`run_async` runs
    every call in one worker thread).  Nodes are named by their full Erlang
    node name, as in :attr:`nodes`.
    """

    def __init__(self, size: int = 3, boot_timeout: float = 120.0) -> None:
        self.size = size
        self.boot_timeout = boot_timeout
        self.dir: Path | None = None
        self._nodes: dict[str, _Node] = {}
        self._ctl_env: dict[str, str] = {}  # rabbitmqctl's environment (the nodes' minus node specifics)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rabbitcluster")
        self.timings: dict[str, float] = {}  # seconds, as measured by start(): "boot", "cluster"

    # -- life cycle ----------------------------------------------------------------

    def start(self) -> RabbitCluster:
        """Create the files, boot all nodes in parallel, cluster them; returns when healthy."""
        sweep_leftovers()
        self.dir = Path(tempfile.mkdtemp(prefix=DIR_PREFIX))
        _open_clusters.add(self)
        # Our pid and start time: a later run sweeps this directory once they no longer match.
        (self.dir / "owner").write_text(_owner_id(os.getpid()))
        home = self.dir / "home"
        home.mkdir()
        cookie = home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(20).upper())
        cookie.chmod(0o400)  # Erlang refuses a cookie file others can read
        (self.dir / "rabbitmq-env.conf").write_text("")
        (self.dir / "rabbitmq.conf").write_text(RABBITMQ_CONF)
        (self.dir / "advanced.config").write_text("[].\n")
        (self.dir / "enabled_plugins").write_text("[].\n")
        base_env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        base_env.update(
            HOME=str(home),
            RABBITMQ_CONF_ENV_FILE=str(self.dir / "rabbitmq-env.conf"),
            RABBITMQ_CONFIG_FILE=str(self.dir / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.dir / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.dir / "enabled_plugins"),
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            # rabbitmqctl's own distribution listener: any free port (see the module
            # docstring), on the loopback only like the nodes'.
            RABBITMQ_CTL_DIST_PORT_MIN="0",
            RABBITMQ_CTL_DIST_PORT_MAX="0",
            RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            **{MARKER: str(self.dir)},
        )
        self._ctl_env.update(base_env)
        tag = secrets.token_hex(3)
        ports = _free_ports(2 * self.size)
        for i in range(self.size):
            letter = chr(ord("A") + i)
            name = f"tws{letter}-{tag}@localhost"
            node_dir = self.dir / letter
            node_dir.mkdir()
            env = dict(
                base_env,
                RABBITMQ_NODENAME=name,
                RABBITMQ_NODE_PORT=str(ports[2 * i]),
                RABBITMQ_DIST_PORT=str(ports[2 * i + 1]),
                RABBITMQ_MNESIA_BASE=str(node_dir / "mnesia"),
                RABBITMQ_LOG_BASE=str(node_dir / "log"),
                RABBITMQ_PID_FILE=str(node_dir / "rabbitmq.pid"),
                RABBITMQ_PLUGINS_EXPAND_DIR=str(node_dir / "plugins"),
            )
            self._nodes[name] = _Node(name, ports[2 * i], ports[2 * i + 1], node_dir, env)

        t0 = time.monotonic()
        for node in self._nodes.values():
            self._spawn(node)
        self._await_boot(list(self._nodes.values()), self.boot_timeout)
        t1 = time.monotonic()
        first, *others = self.nodes
        for name in others:
            self.ctl(name, "stop_app")
            self.ctl(name, "join_cluster", first)
            self.ctl(name, "start_app")
        self.wait_healthy(60)
        t2 = time.monotonic()
        self.timings.update(boot=t1 - t0, cluster=t2 - t1)
        log.info("rabbit cluster %s: booted in %.1f s, clustered in %.1f s", self.nodes, t1 - t0, t2 - t1)
        return self

    def close(self, graceful: bool = True) -> None:
        """Stop every node (``rabbitmqctl stop``, then SIGKILL to each whole process group), remove the directory.

        ``graceful=False`` skips the ``rabbitmqctl stop`` (the atexit path: quick and thread-free).
        """
        if self not in _open_clusters:
            return
        _open_clusters.discard(self)
        self._executor.shutdown(wait=False, cancel_futures=True)
        running = [node for node in self._nodes.values() if node.alive() and not node.frozen]
        if graceful and running:
            results = self._ctl_many(running, ["stop"], timeout=30)
            for node, result in zip(running, results):
                if not result.ok:
                    log.warning("rabbitmqctl stop of %s: %s; killing it", node.name, result.why())
        errors = []
        stopping = {node.name for node in running} if graceful else set()
        for node in self._nodes.values():
            try:
                # Frozen nodes too: SIGKILL needs no SIGCONT.
                self._reap(node, grace=10 if node.name in stopping else 0)
            except (ClusterError, subprocess.TimeoutExpired) as exc:
                errors.append(f"{node.name}: {exc}")
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
        if errors:
            raise ClusterError("could not kill every node: " + "; ".join(errors))

    # -- what the tests connect to -------------------------------------------------

    @property
    def nodes(self) -> list[str]:
        """The node names, A first (the one the others joined)."""
        return list(self._nodes)

    @property
    def urls(self) -> list[str]:
        """One AMQP URL per node (guest/guest, vhost ``/``), in the order of :attr:`nodes`."""
        return [self.url_of(name) for name in self._nodes]

    def url_of(self, node: str) -> str:
        """The AMQP URL of one node."""
        return f"amqp://guest:guest@127.0.0.1:{self._node(node).amqp_port}/%2F"

    def node_of_port(self, port: int) -> str:
        """The node whose AMQP listener is ``port`` (e.g. from a connection's peer address)."""
        for node in self._nodes.values():
            if node.amqp_port == port:
                return node.name
        raise KeyError(f"no node of this cluster listens for AMQP on port {port}")

    # -- rabbitmqctl --------------------------------------------------------------

    def ctl(self, node: str, *args: str, timeout: float = 60.0) -> str:
        """Run ``rabbitmqctl -q -n NODE ARGS``; its stdout, or :class:`ClusterError` on failure or timeout."""
        n = self._node(node)
        (result,) = self._ctl_many([n], list(args), timeout)
        if not result.ok:
            raise ClusterError(f"rabbitmqctl -n {node} {' '.join(args)}: {result.why()}")
        return result.out

    def _ctl_many(self, nodes: Iterable[_Node], args: list[str], timeout: float) -> list[_Result]:
        """The same rabbitmqctl command against several nodes at once."""
        commands = [([str(CTL), "-q", "-n", n.name, *args], self._ctl_env) for n in nodes]
        return _run_many(commands, timeout)

    def status(self, node: str, timeout: float = 20.0) -> dict[str, Any]:
        """``rabbitmqctl cluster_status`` as seen by ``node`` (``running_nodes``, ``partitions``, …)."""
        return json.loads(self.ctl(node, "cluster_status", "--formatter", "json", timeout=timeout))

    def queue_leader(self, queue: str, via: str | None = None) -> str:
        """The node that leads quorum queue ``queue`` (vhost ``/``), asked through ``via`` (default: A)."""
        rows = json.loads(self.ctl(via or self.nodes[0], "list_queues", "name", "leader", "--formatter", "json"))
        for row in rows:
            if row["name"] == queue:
                return row["leader"]
        raise ClusterError(f"no queue {queue!r} in {rows}")

    def connected(self, node: str, timeout: float = 20.0) -> list[str]:
        """The cluster nodes ``node`` has a distribution link to now (Erlang ``nodes()``).

        Unlike ``cluster_status``, which blocks while a peer is frozen, this answers
        at once; a frozen peer drops out of it when ``node`` declares it down.
        """
        out = self.ctl(node, "eval", "nodes().", timeout=timeout)
        return [name for name in re.findall(r"'([^']+)'", out) if name in self._nodes]

    # -- health ---------------------------------------------------------------------

    def _views(self, timeout: float = 20.0) -> dict[str, dict[str, Any] | str]:
        """Each node's cluster_status (or why it gave none), asked of all nodes at once."""
        nodes = list(self._nodes.values())
        results = self._ctl_many(nodes, ["cluster_status", "--formatter", "json"], timeout)
        views: dict[str, dict[str, Any] | str] = {}
        for node, result in zip(nodes, results):
            views[node.name] = json.loads(result.out) if result.ok else result.why()
        return views

    def _problems(self, views: dict[str, dict[str, Any] | str]) -> dict[str, str]:
        """Per node, what is wrong with its view of the cluster (empty: healthy)."""
        problems = {}
        everyone = set(self._nodes)
        for name, view in views.items():
            if isinstance(view, str):
                problems[name] = f"cluster_status {view}"
                continue
            missing_nodes = everyone - set(view.get("running_nodes", []))
            if missing_nodes:
                problems[name] = f"does not see running: {sorted(missing_nodes)}"
            elif view.get("partitions"):
                problems[name] = f"partitions: {view['partitions']}"
        return problems

    def wait_healthy(self, timeout: float = 60.0) -> float:
        """Wait until every node answers and sees all nodes running, with no partition; returns seconds taken."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        while True:
            remaining = deadline - time.monotonic()
            problems = self._problems(self._views(timeout=max(2.0, min(20.0, remaining))))
            if not problems:
                return time.monotonic() - t0
            if time.monotonic() >= deadline:
                details = "\n".join(f"{name}: {why}\n{self._nodes[name].tail(5)}" for name, why in problems.items())
                raise ClusterError(f"cluster not healthy within {timeout:.0f} s:\n{details}")
            time.sleep(0.5)

    def reset(self, timeout: float = 150.0) -> None:
        """Bring the cluster back to all nodes healthy, whatever a test left.

        Thaws frozen nodes (and heals them: a thawed node usually stays
        partitioned), restarts nodes whose VM is gone, starts the application
        of nodes where it is stopped, then, while some node's view is still
        wrong, heals the node the others see least.
        """
        deadline = time.monotonic() + timeout
        # A call that run_async's caller gave up on may still be running in the worker thread.
        self._executor.submit(lambda: None).result(timeout)
        thawed = [node for node in self._nodes.values() if node.frozen]
        for node in thawed:
            self.thaw(node.name)
        dead = [node for node in self._nodes.values() if not node.alive()]
        for node in dead:
            self._spawn(node)
        if dead:
            self._await_boot(dead, deadline - time.monotonic())
        for node in thawed:
            self._heal_or_restart(node.name, deadline)
        # A node whose RabbitMQ application is stopped (a test's stop_app, or paused by
        # pause_minority) refuses cluster_status; waiting would not help it.
        for name, view in self._views().items():
            if isinstance(view, str) or name not in view.get("running_nodes", []):
                self._heal_or_restart(name, deadline)
        for _ in range(self.size):
            try:
                self.wait_healthy(min(20.0, max(1.0, deadline - time.monotonic())))
                return
            except ClusterError:
                if time.monotonic() >= deadline:
                    raise
            self._heal_or_restart(self._outcast(), deadline)
        self.wait_healthy(max(1.0, deadline - time.monotonic()))

    def _outcast(self) -> str:
        """The node the fewest others see running (the one to heal first)."""
        views = self._views()
        seen = {name: 0 for name in self._nodes}
        for name, view in views.items():
            if isinstance(view, str):
                seen[name] = -1  # not even answering: worst
                continue
            for other in view.get("running_nodes", []):
                if other != name and other in seen and seen[other] >= 0:
                    seen[other] += 1
        return min(seen, key=seen.__getitem__)

    def _heal_or_restart(self, name: str, deadline: float) -> None:
        try:
            self.heal(name)
        except ClusterError as exc:
            log.warning("heal of %s failed (%s); restarting it", name, exc)
            node = self._nodes[name]
            self._spawn(node)
            self._await_boot([node], max(1.0, deadline - time.monotonic()))

    # -- faults ---------------------------------------------------------------------

    def kill(self, node: str) -> None:
        """SIGKILL the node's Erlang VM (``beam.smp``), as a crash would; returns once its processes are gone."""
        n = self._node(node)
        pid = n.beam()
        if pid is None:
            raise ClusterError(f"{node} has no running beam.smp to kill")
        os.kill(pid, signal.SIGKILL)
        self._reap(n, grace=5)

    def restart(self, node: str) -> None:
        """Start a node again from its data dir (stopping it first if it runs); returns once it has booted.

        A restarted node rejoins the cluster by itself; :meth:`wait_healthy` tells when.
        """
        n = self._node(node)
        if n.alive() and not n.frozen:
            self.ctl(node, "stop")
            self._reap(n, grace=30)
        self._spawn(n)  # kills a frozen VM first
        self._await_boot([n], self.boot_timeout)

    def freeze(self, node: str) -> None:
        """SIGSTOP the node's VM: it hangs (no ticks, no replies) until :meth:`thaw`."""
        n = self._node(node)
        self._signal(n, signal.SIGSTOP)
        n.frozen = True

    def thaw(self, node: str) -> None:
        """SIGCONT a frozen node.  It usually stays partitioned: follow with :meth:`heal`."""
        n = self._node(node)
        self._signal(n, signal.SIGCONT)
        n.frozen = False

    def heal(self, node: str) -> None:
        """Restart the RabbitMQ application of ``node`` (``stop_app``, ``start_app``) so it rejoins its peers."""
        self.ctl(node, "stop_app")
        self.ctl(node, "start_app", timeout=self.boot_timeout)

    def stop_all(self) -> None:
        """Stop every node (``rabbitmqctl stop``, in parallel); returns once their processes are gone."""
        running = [n for n in self._nodes.values() if n.alive()]
        for n in running:
            if n.frozen:
                self.thaw(n.name)
        results = self._ctl_many(running, ["stop"], timeout=60)
        for n, result in zip(running, results):
            if not result.ok:
                raise ClusterError(f"rabbitmqctl stop of {n.name}: {result.why()}\n{n.tail()}")
            self._reap(n, grace=30)

    def start_all(self) -> None:
        """Start every stopped node in parallel; returns once the cluster has re-formed and is healthy."""
        stopped = [n for n in self._nodes.values() if not n.alive()]
        for n in stopped:
            self._spawn(n)
        self._await_boot(stopped, self.boot_timeout)
        self.wait_healthy(60)

    # -- asyncio -------------------------------------------------------------------

    async def run_async(self, fn: Callable[..., T], *args: Any, timeout: float = 180.0) -> T:
        """Run a blocking call (``cluster.kill``, ``cluster.wait_healthy``…) off the event loop, bounded.

        Calls run one at a time in the cluster's worker thread, e.g.
        ``await cluster.run_async(cluster.kill, node)``.
        """
        loop = asyncio.get_running_loop()
        call = functools.partial(fn, *args)
        return await asyncio.wait_for(loop.run_in_executor(self._executor, call), timeout)

    # -- internals -----------------------------------------------------------------

    def _node(self, name: str) -> _Node:
        try:
            return self._nodes[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a node of this cluster: {self.nodes}") from None

    def _spawn(self, node: _Node) -> None:
        """Start the node's VM; whatever is left of an earlier one is killed first."""
        self._reap(node)
        with node.stdout.open("ab") as out:
            # start_new_session: setsid, so the node is one process group of its own
            # (and a Ctrl-C in the terminal does not reach it).
            node.proc = subprocess.Popen(
                [str(SERVER)], env=node.env, cwd=node.dir, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        node.frozen = False

    def _await_boot(self, nodes: list[_Node], timeout: float) -> None:
        """Poll ``ping`` until each node answers, then ``await_startup``; all bounded by ``timeout``."""
        deadline = time.monotonic() + timeout
        pending = list(nodes)
        while pending:
            for node in pending:
                if not node.alive():
                    rc = node.proc.returncode if node.proc else None
                    raise ClusterError(f"{node.name} exited (status {rc}) while booting:\n{node.tail()}")
            results = self._ctl_many(pending, ["ping"], timeout=max(2.0, min(15.0, deadline - time.monotonic())))
            pending = [node for node, result in zip(pending, results) if not result.ok]
            if pending and time.monotonic() >= deadline:
                node = pending[0]
                raise ClusterError(f"{node.name} did not answer ping within {timeout:.0f} s:\n{node.tail()}")
            if pending:
                time.sleep(0.5)
        # ping answers once the VM is up; await_startup then waits for RabbitMQ itself.
        remaining = max(2, int(deadline - time.monotonic()))
        results = self._ctl_many(nodes, ["await_startup", "--timeout", str(remaining)], timeout=remaining + 5)
        for node, result in zip(nodes, results):
            if not result.ok:
                raise ClusterError(f"{node.name} did not finish booting within {timeout:.0f} s "
                                   f"({result.why()}):\n{node.tail()}")

    def _signal(self, node: _Node, sig: signal.Signals) -> None:
        pid = node.beam()
        if pid is None:
            raise ClusterError(f"{node.name} has no running beam.smp to send {sig.name} to")
        os.kill(pid, sig)

    def _reap(self, node: _Node, grace: float = 0.0) -> None:
        """Give the node ``grace`` seconds to exit, then SIGKILL what is left of it; returns once all is gone."""
        if node.proc is None:
            return
        pgid = node.proc.pid  # the session leader: its pid is the group's id
        try:
            node.proc.wait(grace)
        except subprocess.TimeoutExpired:
            beam = node.beam()
            if beam is not None:
                # beam.smp first, so that its parent shell (still waiting for it) reaps
                # it rather than leaving a zombie for init.
                os.kill(beam, signal.SIGKILL)
                try:
                    node.proc.wait(5)
                except subprocess.TimeoutExpired:
                    log.warning("rabbitmq-server shell of %s outlived its beam.smp", node.name)
        _killpg(pgid)
        node.proc.wait(15)
        # What beam.smp spawned (erl_child_setup, inet_gethost) is in sessions of its
        # own, outside the group: found by the node name in its environment.
        _kill_marked(f"RABBITMQ_NODENAME={node.name}", 15)
        node.proc = None
        node.frozen = False


# -- leftovers of crashed runs ---------------------------------------------------------


def _owner_id(pid: int) -> str:
    """``pid`` plus its start time (a reused pid has another start time), or "" when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return ""
    return f"{pid} {stat[stat.rindex(')') + 2 :].split()[19]}"


def sweep_leftovers() -> None:
    """Kill the nodes of earlier runs whose process is gone, and remove their directories.

    Another session's live cluster (other worktrees run tests too) is left alone.
    """
    for path in Path(tempfile.gettempdir()).glob(DIR_PREFIX + "*"):
        try:
            owner = (path / "owner").read_text()
        except FileNotFoundError:
            # Either a run that died right after creating it, or one that is about to write it.
            if time.time() - path.stat().st_mtime < 60:
                continue
            owner = ""
        if owner and _owner_id(int(owner.split()[0])) == owner:
            continue
        killed = _kill_marked(f"{MARKER}={path}", 15)
        if killed:
            log.warning("killed %d leftover RabbitMQ processes of %s", len(killed), path)
        shutil.rmtree(path, ignore_errors=True)


# -- the fixture -----------------------------------------------------------------------


class _ResetBeforeEachTest:
    """A pytest plugin (registered by the fixture): :meth:`RabbitCluster.reset` before each later test using it."""

    def __init__(self, cluster: RabbitCluster) -> None:
        self.cluster = cluster

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        if "rabbit_cluster" in getattr(item, "fixturenames", ()):
            self.cluster.reset()


@pytest.fixture(scope="session")
def rabbit_cluster(request: pytest.FixtureRequest) -> Iterator[RabbitCluster]:
    """A 3-node RabbitMQ cluster for the session, reset to healthy before each test that uses it."""
    reason = missing()
    if reason is not None:
        pytest.skip(reason)
    cluster = RabbitCluster()
    try:
        cluster.start()
    except BaseException:
        cluster.close(graceful=False)
        raise
    plugin = _ResetBeforeEachTest(cluster)
    request.config.pluginmanager.register(plugin, "rabbitcluster-reset")
    yield cluster
    request.config.pluginmanager.unregister(plugin)
    cluster.close()
