"""The three publishers on a real 3-node RabbitMQ cluster: the node they publish to is killed mid-stream.

No towerws server: each test declares its own durable topic exchange and a quorum
queue bound to it with ``#`` (through pika, on a node of the cluster), then
publishes a numbered stream with one publisher -- the synchronous ``Emitter`` (in a
thread), ``towerws-publish`` (a subprocess reading the stream on stdin) or the
Twisted ``Publisher`` -- given all three URLs.  Once part of the stream is
confirmed, the node the publisher is connected to is killed (SIGKILL).  The
emitter and the Twisted publisher are made to connect to the queue's leader
first, so the kill also takes the leader away (the harder case: until a new
leader is elected, and on a channel that saw the old one die, publishes are
nacked); the command shuffles its URLs itself, so it meets the leader one time
in three.  Then
everything is consumed from a surviving node: every message the publisher
reported as published must be there (duplicates are counted and allowed, losses
are not).  The longest wait between two confirms around the kill is the
publisher's failover gap, reported on stderr (``pytest -s``).  Each test restarts
the killed node at its end.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pika
import pytest
from pika.exceptions import AMQPError

from conftest import ROOT, aio_test, unique, wait
from test_emit import KeepOrder
from rabbitcluster import RabbitCluster
from test_emit import _command
from towerws.emit import Emitter
from towerws.publish import Publisher

# The first cluster test of a session also boots the cluster (~20-25 s).
pytestmark = pytest.mark.timeout(240)

GROUP = "job_events-7"
COUNT = 1000  # messages per stream
KILL_AT = 200  # confirmed messages before the kill
INTERVAL = 0.005  # seconds between two messages of the paced publishers
TIMEOUT = 10.0  # each publisher's timeout
PIKA_TIMEOUT = 10.0
FAILOVER_WINDOW = 5.0  # seconds after the SIGKILL in which the failover gap begins


def report(line: str) -> None:
    """A measurement, on stderr: shown with ``pytest -s`` (and with a failure)."""
    sys.stderr.write(f"\n[publishers] {line}\n")


def _connect(url: str) -> pika.BlockingConnection:
    params = pika.URLParameters(url)
    params.socket_timeout = params.stack_timeout = params.blocked_connection_timeout = PIKA_TIMEOUT
    return pika.BlockingConnection(params)


@dataclass
class Target:
    """The test's exchange and the quorum queue bound to it."""

    cluster: RabbitCluster
    exchange: str
    queue: str

    def consume(self, url: str, expected: set[int], timeout: float = 30.0, quiet: float = 1.0) -> list[int]:
        """Every number in the queue, read through ``url``: until all of ``expected`` came and ``quiet`` s passed
        without another message (duplicates may follow), or ``timeout``."""
        got: list[int] = []
        deadline = time.monotonic() + timeout
        with _connect(url) as conn:
            ch = conn.channel()
            ch.basic_qos(prefetch_count=500)
            missing = set(expected)
            while time.monotonic() < deadline:
                wait_for = quiet if not missing else max(0.1, deadline - time.monotonic())
                method, _props, body = next(ch.consume(self.queue, inactivity_timeout=wait_for))
                if method is None:
                    if not missing:
                        break
                    continue
                ch.basic_ack(method.delivery_tag)
                n = json.loads(body)["n"]
                got.append(n)
                missing.discard(n)
            ch.cancel()
        return got


@pytest.fixture
def target(rabbit_cluster: RabbitCluster) -> Iterator[Target]:
    exchange, queue = unique("towerws-pub-ex"), unique("towerws-pub-qq")
    with _connect(rabbit_cluster.urls[0]) as conn:
        ch = conn.channel()
        ch.exchange_declare(exchange, "topic", durable=True)
        ch.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
        ch.queue_bind(queue, exchange, "#")
    yield Target(rabbit_cluster, exchange, queue)
    for url in rabbit_cluster.urls:  # through whichever node answers
        try:
            with _connect(url) as conn:
                ch = conn.channel()
                ch.queue_delete(queue)
                ch.exchange_delete(exchange)
            return
        except AMQPError:
            continue


def leader_first(target: Target) -> str:
    """The URLs, the node that leads the test's queue first (for ``rng=KeepOrder()``)."""
    cluster = target.cluster
    leader = cluster.queue_leader(target.queue)
    return ",".join([cluster.url_of(leader)] + [cluster.url_of(node) for node in cluster.nodes if node != leader])


def check(target: Target, killed: str, confirmed: list[tuple[int, float]], killed_at: float, what: str) -> None:
    """Every confirmed number arrived (read through a surviving node); report the gap around the kill."""
    survivor = next(node for node in target.cluster.nodes if node != killed)
    got = target.consume(target.cluster.url_of(survivor), {n for n, _ in confirmed})
    missing = sorted({n for n, _ in confirmed} - set(got))
    duplicates = sum(c - 1 for c in Counter(got).values())
    times = [t for _, t in confirmed]
    intervals = [(b - a, a) for a, b in zip(times, times[1:])]
    # The failover gap: the longest silence between two confirms that ends after the
    # SIGKILL and begins within FAILOVER_WINDOW of it (a later stall is the machine's).
    gap, began = max((i for i in intervals if i[1] + i[0] > killed_at and i[1] < killed_at + FAILOVER_WINDOW),
                     default=(float("nan"), killed_at))
    typical = sorted(i for i, _ in intervals)[len(intervals) // 2]
    report(f"{what}: {len(confirmed)} confirmed, {len(got)} consumed, {duplicates} duplicates, "
           f"{len(missing)} lost; failover gap {gap:.3f} s, beginning {began - killed_at:+.3f} s from the SIGKILL "
           f"(median interval {typical * 1000:.1f} ms, longest anywhere {max(intervals)[0]:.3f} s)")
    assert not missing, f"{len(missing)} confirmed messages lost, e.g. {missing[:10]}"
    assert times[-1] > killed_at, "nothing was confirmed after the kill"
    assert gap < TIMEOUT


def restart(cluster: RabbitCluster, node: str | None) -> None:
    if node is not None:
        cluster.restart(node)


# -- the synchronous emitter, in a thread -------------------------------------------------------------


def test_emitter_fails_over_when_its_node_is_killed(rabbit_cluster: RabbitCluster, target: Target) -> None:
    cluster = rabbit_cluster
    emitter = Emitter(leader_first(target), target.exchange, timeout=TIMEOUT, rng=KeepOrder())
    confirmed: list[tuple[int, float]] = []
    errors: list[BaseException] = []
    reached = threading.Event()
    node: list[str] = []  # the node of the connection, read by the publishing thread itself

    def stream() -> None:
        try:
            for n in range(COUNT):
                emitter.emit(GROUP, {"n": n})
                confirmed.append((n, time.monotonic()))
                if n + 1 == KILL_AT:
                    assert emitter.address is not None
                    node.append(cluster.node_of_port(emitter.address.port))
                    reached.set()
                time.sleep(INTERVAL)  # pacing the stream, not synchronising
        except BaseException as exc:  # reported by the test below
            errors.append(exc)
            reached.set()

    thread = threading.Thread(target=stream, name="emitter-stream", daemon=True)
    killed = None
    try:
        thread.start()
        assert reached.wait(60), "the emitter did not get going"
        assert not errors, errors
        killed = node[0]
        killed_at = time.monotonic()
        cluster.kill(killed)  # returns once the node's processes are gone
        thread.join(120)
        assert not thread.is_alive(), "the emitter hung"
        assert not errors, errors
        assert emitter.address is not None and cluster.node_of_port(emitter.address.port) != killed
        check(target, killed, confirmed, killed_at, "Emitter")
    finally:
        emitter.close()
        restart(cluster, killed)


# -- towerws-publish, a subprocess with the stream on stdin -----------------------------------------


def test_cli_fails_over_when_its_node_is_killed(rabbit_cluster: RabbitCluster, target: Target) -> None:
    cluster = rabbit_cluster
    count = 3 * COUNT  # unpaced: a few seconds of publishing
    stdin = b"".join(json.dumps({"n": n}).encode() + b"\n" for n in range(count))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOWERWS_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen(
        [*_command(), "-v", "--amqp-url", ",".join(cluster.urls), "--exchange", target.exchange,
         "--timeout", str(TIMEOUT), GROUP, "-"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    lines: list[tuple[bytes, float]] = []
    reached = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((line, time.monotonic()))
            if len(lines) == KILL_AT:
                reached.set()
        reached.set()  # the end: the test sees whether KILL_AT lines came

    reader = threading.Thread(target=read, name="cli-stdout", daemon=True)
    reader.start()
    killed = None
    try:
        assert proc.stdin is not None
        proc.stdin.write(stdin)  # read to its end before the first publish
        proc.stdin.close()
        assert reached.wait(60) and len(lines) >= KILL_AT, "towerws-publish did not get going"
        # "published N bytes ... via 127.0.0.1:PORT": the node of its connection.
        killed = cluster.node_of_port(int(lines[KILL_AT - 1][0].rsplit(b":", 1)[1]))
        killed_at = time.monotonic()
        cluster.kill(killed)  # returns once the node's processes are gone
        assert proc.wait(120) == 0, proc.stderr.read().decode() if proc.stderr else ""
        reader.join(10)
        assert len(lines) == count
        last_node = cluster.node_of_port(int(lines[-1][0].rsplit(b":", 1)[1]))
        assert last_node != killed, "towerws-publish never left the killed node"
        # The -v lines come in the order of stdin: line i says number i was confirmed.
        confirmed = [(n, t) for n, (_, t) in enumerate(lines)]
        check(target, killed, confirmed, killed_at, "towerws-publish")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        restart(cluster, killed)


# -- the Twisted Publisher ----------------------------------------------------------------------------


@aio_test
async def test_twisted_publisher_fails_over_when_its_node_is_killed(rabbit_cluster: RabbitCluster,
                                                                   target: Target) -> None:
    cluster = rabbit_cluster
    urls = await cluster.run_async(leader_first, target)
    publisher = await wait(Publisher.connect(urls, target.exchange, timeout=TIMEOUT, rng=KeepOrder()))
    confirmed: list[tuple[int, float]] = []
    killed = None
    killing: asyncio.Future[Any] | None = None
    killed_at = 0.0
    try:
        for n in range(COUNT):
            if n == KILL_AT:
                # The peer port of the connection names the node; the kill runs while the stream goes on.
                killed = cluster.node_of_port(publisher.client.transport.getPeer().port)
                killed_at = time.monotonic()
                killing = asyncio.ensure_future(cluster.run_async(cluster.kill, killed))
            await wait(publisher.publish(GROUP, json.dumps({"n": n}).encode()), TIMEOUT + 5)
            confirmed.append((n, time.monotonic()))
            await asyncio.sleep(INTERVAL)  # pacing the stream, not synchronising
        assert killing is not None
        await killing
        assert cluster.node_of_port(publisher.client.transport.getPeer().port) != killed
        await cluster.run_async(check, target, killed, confirmed, killed_at, "Twisted Publisher")
    finally:
        if killing is not None and not killing.done():
            await asyncio.wait([killing], timeout=30)
        await wait(publisher.close())
        if killed is not None:
            await cluster.run_async(cluster.restart, killed)
