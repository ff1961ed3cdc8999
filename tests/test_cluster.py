"""towerws on a real 3-node RabbitMQ cluster: a broker node crashes, hangs, or the whole cluster restarts.

A streaming publisher (pika, publisher confirms, on a node the fault spares)
sends a numbered message every 50 ms to one group; a websocket client
subscribed to it records when each number arrives.  After the fault every
confirmed message must have arrived (duplicates are counted and allowed), and
the longest silence between two arrivals is bounded: 5 s for a crash, 25 s for
a hung node at towerws's default settings (the cluster runs with
``net_ticktime = 15``, which bounds how soon any client can recover from a hung
node: until the cluster declares it down, binding and consuming from a queue
with a member on it block).
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from typing import Any

import pika
import pytest
from pika.exceptions import AMQPError

from conftest import Client, Server, aio_test, http_get
from logcapture import LogCapture
from rabbitcluster import RabbitCluster

# The first cluster test of a session also boots the cluster (~20-25 s).
pytestmark = pytest.mark.timeout(300)

GROUP = "job_events-7"
INTERVAL = 0.05  # seconds between two published messages


def report(line: str) -> None:
    """A measurement, on stderr: shown with ``pytest -s`` (and with a failure)."""
    sys.stderr.write(f"\n[cluster] {line}\n")


class StreamingPublisher:
    """Publishes ``{"seq": n}`` to ``GROUP`` every ``INTERVAL`` s, with confirms, from a thread.

    It uses the first URL that works and, when its connection breaks, the next one
    (the unconfirmed message is sent again: a duplicate at worst).  ``confirmed``
    holds every number the broker confirmed.
    """

    def __init__(self, urls: list[str], exchange: str):
        self.urls, self.exchange = urls, exchange
        self.confirmed: list[int] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="streaming-publisher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _connect(self) -> Any:
        while not self._stop.is_set():
            for url in self.urls:
                params = pika.URLParameters(url)
                params.socket_timeout = params.stack_timeout = params.blocked_connection_timeout = 5
                try:
                    conn = pika.BlockingConnection(params)
                    channel = conn.channel()
                    channel.confirm_delivery()
                    return conn, channel
                except (AMQPError, OSError) as exc:
                    self.errors.append(f"connect {url.rsplit('@', 1)[-1]}: {exc!r}")
            self._stop.wait(0.5)
        return None, None

    def _run(self) -> None:
        conn, channel = self._connect()
        seq = 0
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                channel.basic_publish(self.exchange, GROUP, json.dumps({"seq": seq}).encode(),
                                      pika.BasicProperties(content_type="application/json"))
            except (AMQPError, OSError) as exc:
                self.errors.append(f"publish {seq}: {exc!r}")
                conn, channel = self._connect()  # and send seq again
                continue
            self.confirmed.append(seq)
            seq += 1
            next_at += INTERVAL
            self._stop.wait(max(0.0, next_at - time.monotonic()))
        if conn is not None and conn.is_open:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)
        assert not self._thread.is_alive(), "the publisher thread did not stop"


class Receiver:
    """Reads the client's deliveries in the background: (seq, arrival time) in order."""

    def __init__(self, client: Client):
        self.client = client
        self.arrivals: list[tuple[int, float]] = []
        self._task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        while True:
            message = json.loads(await self.client.ws.recv())
            self.arrivals.append((message["seq"], time.monotonic()))

    async def until(self, seqs: set[int], timeout: float) -> None:
        """Wait (bounded) until every one of ``seqs`` has arrived."""
        deadline = time.monotonic() + timeout
        while not seqs <= {s for s, _ in self.arrivals}:
            if self._task.done():
                self._task.result()  # raises what ended the reader (e.g. the connection closed)
            if time.monotonic() > deadline:
                missing = sorted(seqs - {s for s, _ in self.arrivals})
                raise AssertionError(f"{len(missing)} confirmed messages never arrived: {missing[:20]}...")
            await asyncio.sleep(0.05)

    async def after(self, moment: float, count: int, timeout: float) -> None:
        """Wait (bounded) until ``count`` messages arrived after ``moment``: deliveries have resumed."""
        deadline = time.monotonic() + timeout
        while sum(1 for _, at in self.arrivals if at > moment) < count:
            if self._task.done():
                self._task.result()
            assert time.monotonic() < deadline, f"deliveries did not resume within {timeout} s"
            await asyncio.sleep(0.05)

    def longest_gap(self) -> float:
        times = [at for _, at in self.arrivals]
        return max((b - a for a, b in zip(times, times[1:])), default=0.0)

    def duplicates(self) -> int:
        return len(self.arrivals) - len({s for s, _ in self.arrivals})

    def stop(self) -> None:
        self._task.cancel()
        if self._task.done() and not self._task.cancelled():
            self._task.exception()  # retrieved: its reason is already part of a failed wait


async def start_on_cluster(server_factory: Any, cluster: RabbitCluster, **extra: Any) -> Server:
    return await server_factory(amqp_url=",".join(cluster.urls), **extra)


def node_in_use(server: Server, cluster: RabbitCluster) -> str:
    address = server.service.bus.address
    assert address is not None, "the server is not consuming"
    return cluster.node_of_port(address.port)


async def stream_through(fault: Any, server: Server, cluster: RabbitCluster, exchange: str,
                         publisher_urls: list[str], recover: float) -> Receiver:
    """Subscribe, stream, run ``fault()`` (async), wait until deliveries resume (within ``recover`` s), drain."""
    ws = await server.connect()
    reply = await ws.subscribe({"job_events": [7]})
    assert reply["groups_current"] == [GROUP]
    receiver = Receiver(ws)
    publisher = StreamingPublisher(publisher_urls, exchange)
    publisher.start()
    try:
        try:
            await receiver.after(0, 20, timeout=30)  # streaming end to end
            struck = time.monotonic()
            await fault()
            await receiver.after(max(struck, time.monotonic()), 20, timeout=recover)
        finally:
            publisher.stop()
        await receiver.until(set(publisher.confirmed), timeout=30)
    finally:
        receiver.stop()
        await ws.close()
    assert publisher.confirmed, publisher.errors
    return receiver


@aio_test(timeout=240)
async def test_killed_broker_node_loses_no_message_and_the_gap_is_short(
    rabbit_cluster: RabbitCluster, server_factory: Any, exchange: str
) -> None:
    server = await start_on_cluster(server_factory, rabbit_cluster)
    assert server.service.settings.queue_type == "quorum"  # several URLs: the replicated queue
    victim = node_in_use(server, rabbit_cluster)
    others = [rabbit_cluster.url_of(n) for n in rabbit_cluster.nodes if n != victim]

    async def crash() -> None:
        await rabbit_cluster.run_async(rabbit_cluster.kill, victim)

    receiver = await stream_through(crash, server, rabbit_cluster, exchange, others, recover=30)
    assert node_in_use(server, rabbit_cluster) != victim
    gap = receiver.longest_gap()
    assert gap <= 5.0, f"longest gap {gap:.2f} s after a broker node crash"
    status, _, body = await http_get(server.http + "/readyz")
    assert status == 200 and json.loads(body)["broker"] == server.service.bus.address.node
    report(f"kill -9: longest gap {gap:.2f} s, {receiver.duplicates()} duplicates, {len(receiver.arrivals)} deliveries")
    await rabbit_cluster.run_async(rabbit_cluster.restart, victim)


@aio_test(timeout=240)
async def test_hung_broker_node_is_left_within_25_s_at_default_settings(
    rabbit_cluster: RabbitCluster, server_factory: Any, exchange: str
) -> None:
    server = await start_on_cluster(server_factory, rabbit_cluster)
    assert server.service.settings.amqp_heartbeat == 5  # the default
    victim = node_in_use(server, rabbit_cluster)
    others = [rabbit_cluster.url_of(n) for n in rabbit_cluster.nodes if n != victim]

    async def hang() -> None:
        await rabbit_cluster.run_async(rabbit_cluster.freeze, victim)

    try:
        receiver = await stream_through(hang, server, rabbit_cluster, exchange, others, recover=45)
    finally:
        await rabbit_cluster.run_async(rabbit_cluster.thaw, victim)
        await rabbit_cluster.run_async(rabbit_cluster.heal, victim)
    assert node_in_use(server, rabbit_cluster) != victim
    gap = receiver.longest_gap()
    assert gap <= 25.0, f"longest gap {gap:.2f} s after a broker node hung"
    report(f"SIGSTOP: longest gap {gap:.2f} s, {receiver.duplicates()} duplicates, {len(receiver.arrivals)} deliveries")


@aio_test(timeout=240)
async def test_whole_cluster_restart_keeps_clients_and_resumes(
    rabbit_cluster: RabbitCluster, server_factory: Any, exchange: str
) -> None:
    server = await start_on_cluster(server_factory, rabbit_cluster, reconnect_max_delay="5")
    ws = await server.connect()
    await ws.subscribe({"job_events": [7]})
    await rabbit_cluster.run_async(rabbit_cluster.stop_all)
    status, _, body = await http_get(server.http + "/readyz")
    assert status == 503 and json.loads(body)["amqp"] == "connecting"
    await rabbit_cluster.run_async(rabbit_cluster.start_all)
    await asyncio.wait_for(server.service.bus.when_ready().asFuture(asyncio.get_running_loop()), 60)
    status, _, _ = await http_get(server.http + "/readyz")
    assert status == 200
    # The same websocket, never closed: a message published now reaches it.
    await asyncio.get_running_loop().run_in_executor(None, _publish_once, rabbit_cluster.urls[0], exchange)
    assert await ws.recv_json(timeout=20) == {"seq": -1}
    await ws.close()


def _publish_once(url: str, exchange: str, group: str = GROUP) -> None:
    with pika.BlockingConnection(pika.URLParameters(url)) as conn:
        channel = conn.channel()
        channel.confirm_delivery()
        channel.basic_publish(exchange, group, b'{"seq": -1}')


@aio_test(timeout=240)
async def test_a_hung_peer_delays_new_bindings_only(
    rabbit_cluster: RabbitCluster, server_factory: Any, exchange: str
) -> None:
    """A node towerws is not connected to hangs: bound groups keep delivering; a new group's reply waits
    ``bind_timeout`` at most, says so, and the binding completes once the cluster gave up the hung node."""
    server = await start_on_cluster(server_factory, rabbit_cluster, bind_timeout="3")
    queue = server.service.bus.queue
    own = node_in_use(server, rabbit_cluster)
    leader = await rabbit_cluster.run_async(rabbit_cluster.queue_leader, queue, own)
    # Hang a node that is neither towerws's nor the queue's leader: the queue keeps its majority and leader.
    victim = next(n for n in rabbit_cluster.nodes if n not in (own, leader))  # own may be the leader too
    survivors = [rabbit_cluster.url_of(n) for n in rabbit_cluster.nodes if n != victim]

    async def hang_and_subscribe_anew() -> None:
        await rabbit_cluster.run_async(rabbit_cluster.freeze, victim)
        newcomer = await server.connect("token-bob")
        started = time.monotonic()
        reply = await newcomer.subscribe({"job_events": [8]})
        waited = time.monotonic() - started
        # queue.bind blocks cluster-wide while a node hangs: the reply does not wait for it forever.
        assert reply["groups_current"] == ["job_events-8"] and waited < 3 + 2, (reply, waited)
        assert reply["errors"] == [{"error": "broker unavailable"}]
        # Once the cluster declared the hung node down, the binding goes through by itself.
        deadline = time.monotonic() + 40
        while "job_events-8" not in server.service.bus.bindings.bound:
            assert time.monotonic() < deadline, "the binding never went through"
            await asyncio.sleep(0.1)
        await asyncio.get_running_loop().run_in_executor(None, _publish_once, survivors[0], exchange, "job_events-8")
        assert await newcomer.recv_json(timeout=20) == {"seq": -1}
        await newcomer.close()

    with LogCapture() as log:
        try:
            receiver = await stream_through(hang_and_subscribe_anew, server, rabbit_cluster, exchange, survivors,
                                            recover=30)
            # While the peer hung, towerws never left its own node.  (Afterwards, the thawed
            # node rejoining may make the cluster close connections: not this test's business.)
            stayed_on = node_in_use(server, rabbit_cluster)
        finally:
            await rabbit_cluster.run_async(rabbit_cluster.thaw, victim)
            await rabbit_cluster.run_async(rabbit_cluster.heal, victim)
    assert stayed_on == own, "\n".join(log.lines)
    gap = receiver.longest_gap()
    report(f"hung peer: longest gap of a bound group {gap:.2f} s")
    assert gap <= 5.0, f"a bound group's deliveries stalled {gap:.2f} s while another node hung"


@aio_test(timeout=240)
async def test_http_publish_api_rides_out_the_loss_of_its_node(
    rabbit_cluster: RabbitCluster, server_factory: Any, exchange: str, tmp_path: Any
) -> None:
    """POST /api/publish while the node towerws is connected to is killed: every 202 was delivered."""
    from test_publish_api import SECRET, post

    secret = tmp_path / "publish.secret"
    secret.write_text(SECRET + "\n")
    server = await start_on_cluster(server_factory, rabbit_cluster, publish_secret_file=str(secret))
    victim = node_in_use(server, rabbit_cluster)
    ws = await server.connect()
    await ws.subscribe({"job_events": [7]})
    receiver = Receiver(ws)
    accepted: list[int] = []
    refused: list[Any] = []

    async def stream() -> None:
        for seq in range(200):
            code, body, _ = await post(server, {"group": GROUP, "payload": {"seq": seq}})
            (accepted if code == 202 else refused).append(seq if code == 202 else body)
            await asyncio.sleep(INTERVAL)

    streaming = asyncio.ensure_future(stream())
    try:
        await receiver.after(0, 20, timeout=30)
        struck = time.monotonic()
        await rabbit_cluster.run_async(rabbit_cluster.kill, victim)
        await receiver.after(struck, 20, timeout=30)
        await asyncio.wait_for(streaming, 60)
        await receiver.until(set(accepted), timeout=30)
    finally:
        streaming.cancel()
        receiver.stop()
        await ws.close()
    # Waiting out the failover inside publish_timeout: nothing refused, nothing confirmed lost.
    assert refused == [] and len(accepted) == 200
    assert node_in_use(server, rabbit_cluster) != victim
    report(f"HTTP publish API, its node killed: longest gap {receiver.longest_gap():.2f} s, "
           f"{receiver.duplicates()} duplicates")
    await rabbit_cluster.run_async(rabbit_cluster.restart, victim)
