"""Child processes of a benchmark run: the server under test, the load generator, the publisher.

Every child is started with its open-files limit raised, writes its log to a
file (never to a pipe nobody reads), and is stopped by its own pid.  JSON-line
children (load generator, publisher, ceiling) answer each command with one line;
every read has a timeout so a hang fails the run instead of stalling it.
"""

from __future__ import annotations

import json
import os
import resource
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent


class BenchError(Exception):
    """A benchmark step failed (a child died, timed out or answered with an error)."""


def raise_nofile() -> None:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit (run in each child before exec)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def shown(argv: list[str]) -> str:
    """A command line for the results page: paths inside the checkout relative to it (no machine paths)."""
    prefix = str(ROOT) + os.sep
    return " ".join(a[len(prefix):] if a.startswith(prefix) else a for a in argv)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class Child:
    """A child process speaking JSON lines on stdin/stdout."""

    def __init__(self, name: str, argv: list[str], log: Path, ready_timeout: float = 30.0):
        self.name = name
        self.log = log
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=ROOT,
                preexec_fn=raise_nofile,
            )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._stdin, self._stdout = self.proc.stdin, self.proc.stdout
        self._buf = b""
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._stdout, selectors.EVENT_READ)
        self.hello = self.read(ready_timeout)
        self.pid: int = self.proc.pid

    def send(self, cmd: dict[str, Any]) -> None:
        try:
            self._stdin.write(json.dumps(cmd).encode() + b"\n")
            self._stdin.flush()
        except BrokenPipeError:
            raise BenchError(f"{self.name} is gone (exit {self.proc.poll()}); see {self.log}") from None

    def read(self, timeout: float) -> dict[str, Any]:
        """The next reply line; :class:`BenchError` after ``timeout`` s or if the child exits."""
        deadline = time.monotonic() + timeout
        fd = self._stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.name}: no answer within {timeout:.0f}s; see {self.log}")
            if self._sel.select(left):
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise BenchError(f"{self.name} exited ({self.proc.wait()}); see {self.log}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def ready(self) -> bool:
        """True if a reply line can be read without waiting."""
        return b"\n" in self._buf or bool(self._sel.select(0))

    def call(self, cmd: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        """Send ``cmd`` and return its reply; :class:`BenchError` if it says ``ok: false``."""
        self.send(cmd)
        reply = self.read(timeout)
        if reply.get("ok") is False:
            raise BenchError(f"{self.name} {cmd['cmd']}: {reply.get('error') or reply}")
        return reply

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send({"cmd": "quit"})
                self.proc.wait(10)
            except (BenchError, subprocess.TimeoutExpired):
                pass  # it did not leave politely; the signal below ends it
        _stop(self.proc)
        self._sel.close()


def loadgen(log: Path) -> Child:
    return Child("loadgen", [sys.executable, "-m", "bench.loadgen"], log)


def publisher(amqp_url: str, exchange: str, log: Path) -> Child:
    argv = [sys.executable, "-m", "bench.publisher", "--amqp-url", amqp_url, "--exchange", exchange]
    return Child("publisher", argv, log)


def amqp_proxy(amqp_url: str, log: Path) -> tuple[Child, str]:
    """:mod:`bench.amqpproxy` in front of the broker of ``amqp_url``, and the same URL through it."""
    parts = urllib.parse.urlsplit(amqp_url)
    upstream = f"{parts.hostname or 'localhost'}:{parts.port or 5672}"
    proxy = Child("amqpproxy", [sys.executable, "-m", "bench.amqpproxy", "--upstream", upstream], log)
    netloc = parts.netloc.rpartition("@")
    via = f"{netloc[0]}{netloc[1]}127.0.0.1:{proxy.hello['port']}"
    return proxy, urllib.parse.urlunsplit(parts._replace(netloc=via))


def baseline_tree(rev: str, dest: Path) -> Path:
    """``towerws/`` and ``twisted/plugins/`` of commit ``rev``, extracted below ``dest`` (``git archive``).

    With ``PYTHONPATH=<dest>`` the venv's ``twistd towerws`` runs that commit's
    code: its plugin and package come first on ``sys.path``, before the checkout's
    editable install (same dependencies).  No worktree is created.
    """
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    try:
        archive = subprocess.run(["git", "archive", rev, "towerws", "twisted/plugins"], cwd=ROOT,
                                 capture_output=True, timeout=60, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, capture_output=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        raise BenchError(f"cannot extract commit {rev} for the baseline: {exc} {detail.decode(errors='replace')}") from None
    return dest


class Server:
    """The server under test: its websocket URL, pid, and the publisher that feeds it."""

    name = "server"
    pid: int
    port: int
    feed: Child

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/websocket/?token=bench-token"

    def wait_connections(self, n: int, timeout: float = 30.0) -> None:
        """Wait until the server holds ``n`` open websockets."""
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


def towerws_options() -> str:
    """``twistd towerws --help``: used to pass options only this towerws knows."""
    twistd = str(Path(sys.executable).parent / "twistd")
    return subprocess.run([twistd, "towerws", "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT).stdout


class TowerwsServer(Server):
    """``twistd --nodaemon towerws`` on a free port, with its own exchange and node id.

    ``broker_url``: where the server itself connects (e.g. through :mod:`bench.amqpproxy`);
    the publisher and the clean-up use ``amqp_url``.  ``code``: run the towerws code
    of this directory (:func:`baseline_tree`) instead of the checkout's.
    """

    name = "towerws"

    def __init__(self, amqp_url: str, logdir: Path, label: str, extra: list[str] | None = None,
                 feed: bool = True, broker_url: str | None = None, code: Path | None = None):
        """Start it and wait until it consumes; ``feed``: also start a :mod:`bench.publisher` for it."""
        self.port = free_port()
        self.run_id = f"bench-{secrets.token_hex(4)}"
        self.exchange = self.run_id
        self.node_id = self.run_id
        self.amqp_url = amqp_url
        tokens = logdir / "tokens.json"
        tokens.write_text(json.dumps({"bench-token": {"id": 1, "username": "bench", "is_superuser": True}}))
        twistd = str(Path(sys.executable).parent / "twistd")
        argv = [
            twistd, "--nodaemon", "--pidfile=", "towerws",
            # A listen backlog the size of the connect storm (Twisted's default is 50).
            "--listen", f"tcp:{self.port}:interface=127.0.0.1:backlog=1024",
            "--amqp-url", broker_url or amqp_url,
            "--exchange", self.exchange,
            "--node-id", self.node_id,
            "--tokens-file", str(tokens),
            "--max-connections", "20000",
            "--max-connections-per-user", "20000",
            "--queue-expires", "60",
            "--drain-timeout", "2",
        ] + (extra or [])
        self.log = logdir / f"{label}.log"
        env = None
        if code is not None:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH")]))}
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                         stdin=subprocess.DEVNULL, preexec_fn=raise_nofile, env=env)
        self.pid = self.proc.pid
        try:
            self._wait_ready(60)
            if feed:
                self.feed = publisher(amqp_url, self.exchange, logdir / f"{label}-publisher.log")
        except BaseException:
            self.stop()
            raise

    def status(self) -> dict[str, Any]:
        """``GET /readyz``: its JSON body (``amqp``, ``connections``, ...), whatever the status code."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=5) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            return json.loads(e.read())

    def metrics(self) -> dict[str, float]:
        """``GET /metrics``: every sample without labels, by name (``towerws_amqp_bindings``, ...)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if line.startswith("#") or "{" in name or not value:
                continue
            out[name] = float(value.split()[0])
        return out

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"towerws exited with {self.proc.returncode}; see {self.log}")
            try:
                if self.status().get("amqp") == "consuming":
                    return
            except (OSError, ValueError):
                pass  # not listening yet
            time.sleep(0.2)
        raise BenchError(f"towerws not ready within {timeout:.0f}s; see {self.log}")

    def wait_connections(self, n: int, timeout: float = 30.0) -> None:
        """Wait until the server counts ``n`` open websockets (e.g. 0 after a close)."""
        deadline = time.monotonic() + timeout
        while self.status().get("connections") != n:
            if time.monotonic() > deadline:
                raise BenchError(f"towerws still has {self.status().get('connections')} connections, expected {n}")
            time.sleep(0.2)

    def stop(self) -> None:
        if hasattr(self, "feed"):
            self.feed.stop()
        _stop(self.proc)
        delete_amqp(self.amqp_url, self.exchange, f"towerws.{self.node_id}")


class CeilingServer(Server):
    """:mod:`bench.ceiling`: it is its own feed (messages made in-process)."""

    name = "ceiling"

    def __init__(self, logdir: Path, label: str):
        self.port = free_port()
        self.feed = Child("ceiling", [sys.executable, "-m", "bench.ceiling", "--port", str(self.port)],
                          logdir / f"{label}.log")
        self.pid = self.feed.pid

    def wait_connections(self, n: int, timeout: float = 30.0) -> None:
        time.sleep(0.5)  # the ceiling keeps no count; aborted sockets are gone at once

    def stop(self) -> None:
        self.feed.stop()


def delete_amqp(amqp_url: str, exchange: str, queue: str) -> None:
    """Delete this run's exchange and queue; a broker that is already gone is not an error."""
    import pika
    import pika.exceptions

    try:
        conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    except pika.exceptions.AMQPError as exc:
        print(f"bench: could not delete {exchange}/{queue}: {exc!r}", file=sys.stderr)
        return
    try:
        ch = conn.channel()
        ch.queue_delete(queue)
        ch.exchange_delete(exchange)
    finally:
        conn.close()


def ensure_broker(amqp_url: str, timeout: float = 90.0) -> None:
    """Start the local RabbitMQ (``rabbitmq-server -detached``) if nothing listens at the URL's address.

    As ``make test`` does; a broker elsewhere is only checked, never started.
    """
    parts = urllib.parse.urlsplit(amqp_url)
    address = (parts.hostname or "localhost", parts.port or 5672)

    def listening() -> bool:
        try:
            with socket.create_connection(address, timeout=1):
                return True
        except OSError:
            return False

    if listening():
        return
    if address[0] not in ("127.0.0.1", "localhost") or shutil.which("rabbitmq-server") is None:
        raise BenchError(f"nothing listens on {address[0]}:{address[1]} and no local rabbitmq-server to start")
    subprocess.run(["rabbitmq-server", "-detached"], check=False, capture_output=True, timeout=60)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if listening():
            return
        time.sleep(0.5)
    raise BenchError(f"started rabbitmq-server -detached but nothing listened within {timeout:.0f}s")


def rabbitmq_version(amqp_url: str) -> str:
    """The broker's version from its connection.start properties."""
    import pika
    import pika.exceptions

    try:
        conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    except pika.exceptions.AMQPError as exc:
        raise BenchError(f"RabbitMQ not reachable at {amqp_url}: {exc!r}") from None
    try:
        props = conn._impl.server_properties  # pika keeps them only here
        version = props.get("version", b"?")
        return version.decode() if isinstance(version, bytes) else str(version)
    finally:
        conn.close()


@dataclass
class Monitor:
    """CPU, RSS and peak RSS of one process (the server), sampled in a thread."""

    pid: int
    interval: float = 0.25
    samples: list[tuple[float, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.proc = psutil.Process(self.pid)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mark = (time.monotonic(), self._cpu())

    def _cpu(self) -> float:
        t = self.proc.cpu_times()
        return t.user + t.system

    def rss(self) -> int:
        return self.proc.memory_info().rss

    def hwm(self) -> int:
        """VmHWM: the peak RSS since start or since :meth:`reset_peak`."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise BenchError(f"no VmHWM for pid {self.pid}")

    def reset_peak(self) -> None:
        """Reset VmHWM to the current RSS (writing 5 to clear_refs; needs the same user or root)."""
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError as exc:
            print(f"bench: cannot reset peak RSS of {self.pid} ({exc}); peak is since start", file=sys.stderr)

    def mark(self) -> None:
        """Start a measured window (CPU is reported since the last mark)."""
        self._mark = (time.monotonic(), self._cpu())

    def cpu(self) -> float:
        """CPU use since :meth:`mark`, in cores (1.0 = one core busy all the time)."""
        t0, c0 = self._mark
        wall = time.monotonic() - t0
        return (self._cpu() - c0) / wall if wall > 0 else 0.0

    def start_sampling(self) -> None:
        self.samples = []
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def stop_sampling(self) -> list[tuple[float, int]]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        return self.samples

    def _sample(self) -> None:
        t0 = time.monotonic()
        while not self._stop.is_set():
            try:
                self.samples.append((round(time.monotonic() - t0, 2), self.rss()))
            except psutil.Error:
                return
            self._stop.wait(self.interval)


def broker_process(port: int = 5672) -> psutil.Process | None:
    """The local RabbitMQ (``beam.smp``), to report its CPU next to the server's.

    The one listening on ``port``: test suites start RabbitMQ nodes of their own
    (a 3-node cluster fixture) beside the shared broker.
    """
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
                return psutil.Process(conn.pid)
    except psutil.Error:
        pass  # no rights to see other processes' sockets: the first beam.smp below
    for p in psutil.process_iter(["name"]):
        if p.info["name"] == "beam.smp":
            return p
    return None
