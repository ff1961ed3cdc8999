"""Broker faults against the real RabbitMQ, through a proxy the test can sever (see brokerproxy).

What must hold: websocket clients stay connected while the broker is away; nothing
routed to the node's queue is lost across a connection blink (redeliveries may
repeat a message); a silently dead connection is noticed by heartbeats; each
failed attempt is logged once, with its reason, and never with the password.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from typing import Any

import pika
import pytest
import pytest_twisted

from brokerproxy import BrokerProxy
from conftest import AMQP_URL, Client, Publisher, Server, aio, aio_test, connect, unique, wait
from logcapture import LogCapture


@pytest.fixture
def proxy() -> Any:
    p = pytest_twisted.blockon(aio(BrokerProxy().start()))
    yield p
    pytest_twisted.blockon(aio(p.stop()))


def numbered(group: str, numbers: range) -> list[tuple[str, bytes, None]]:
    return [(group, json.dumps({"n": n}).encode(), None) for n in numbers]


async def read_numbers(ws: Client, count: int) -> list[int]:
    """Every number received until ``count`` distinct ones arrived (duplicates included)."""
    got: list[int] = []
    seen: set[int] = set()
    while len(seen) < count:
        n = json.loads(await ws.recv(timeout=30))["n"]
        got.append(n)
        seen.add(n)
    return got


def first_occurrences(got: list[int]) -> tuple[list[int], int]:
    """(numbers in the order first seen, how many were repeats)."""
    seen: set[int] = set()
    firsts = []
    for n in got:
        if n not in seen:
            seen.add(n)
            firsts.append(n)
    return firsts, len(got) - len(firsts)


async def lose_and_recover(server: Server, cut: Any) -> float:
    """Run ``cut()`` (which drops towerws's connection); seconds until it consumes again."""
    bus = server.service.bus
    lost = bus.client.lost
    await cut()
    await wait(lost)
    started = time.monotonic()
    await wait(bus.when_ready(), timeout=30)
    return time.monotonic() - started


def _rabbitmqctl(*args: str) -> list[list[str]]:
    out = subprocess.run(
        ["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    return [line.split("\t") for line in out.splitlines()]


# -- nothing lost on a connection blink ----------------------------------------------------


@aio_test
async def test_numbered_stream_survives_cut_connections(server_factory, proxy: BrokerProxy, publisher) -> None:
    total, chunk = 5000, 100
    server = await server_factory(amqp_url=proxy.url(), reconnect_max_delay=0.5)
    bus = server.service.bus
    clients = [await server.connect() for _ in range(3)]
    for c in clients:
        await c.subscribe({"job_events": [77]})
    readers = [asyncio.ensure_future(read_numbers(c, total)) for c in clients]

    async def sever() -> None:
        assert proxy.sever() == 1

    async def sever_and_refuse() -> None:
        await proxy.refuse()
        proxy.sever()

    recoveries = []
    published_while_down = 0
    for i in range(total // chunk):
        if i in (10, 40):
            recoveries.append(await lose_and_recover(server, sever))
        if i == 22:
            lost = bus.client.lost
            await sever_and_refuse()
            await wait(lost)
        if 22 <= i < 27:
            assert not bus.ready  # routed to the queue while towerws is disconnected
            published_while_down += chunk
        if i == 27:
            started = time.monotonic()
            await proxy.accept()
            await wait(bus.when_ready(), timeout=30)
            recoveries.append(time.monotonic() - started)
        await publisher.publish_many(numbered("job_events-77", range(i * chunk, (i + 1) * chunk)))

    results = await asyncio.wait_for(asyncio.gather(*readers), 40)
    duplicates = []
    for got in results:
        firsts, repeats = first_occurrences(got)
        assert firsts == list(range(total))  # every number, first seen in order
        duplicates.append(repeats)
    print(
        f"\n[fault] {total} messages, 3 cuts ({published_while_down} published while disconnected): "
        f"duplicates per client {duplicates}; seconds to consume again {[round(r, 2) for r in recoveries]}"
    )
    for c in clients:
        await c.close()


@aio_test
async def test_long_outage_keeps_only_the_newest_queue_max_length(server_factory, proxy: BrokerProxy, publisher) -> None:
    server = await server_factory(amqp_url=proxy.url(), reconnect_max_delay=0.5, queue_max_length=10)
    ws = await server.connect()
    await ws.subscribe({"job_events": [78]})
    lost = server.service.bus.client.lost
    await proxy.refuse()
    proxy.sever()
    await wait(lost)
    await publisher.publish_many(numbered("job_events-78", range(30)))
    await proxy.accept()
    # drop-head: the 20 oldest made room for the newest
    assert [json.loads(await ws.recv(timeout=30))["n"] for _ in range(10)] == list(range(20, 30))
    await publisher.publish("job_events-78", {"n": "after"})
    assert await ws.recv_json() == {"n": "after"}
    await ws.close()


@aio_test
async def test_silently_dropped_connection_is_noticed_by_heartbeats(server_factory, proxy: BrokerProxy, publisher) -> None:
    server = await server_factory(amqp_url=proxy.url(), reconnect_max_delay=0.5, amqp_heartbeat=1)
    ws = await server.connect()
    await ws.subscribe({"job_events": [79]})
    with LogCapture() as log:
        # towerws's TCP connection stays open, nothing arrives on it any more.
        recovered = await lose_and_recover(server, _async(proxy.blackhole))
    assert log.count("no traffic from the broker for 3 s (heartbeat); reconnecting") == 1, log.lines
    await wait(server.service.bus.when_bound(["job_events-79"]))
    await publisher.publish("job_events-79", {"n": 1})
    assert await ws.recv_json() == {"n": 1}
    print(f"\n[fault] heartbeat 1 s: dead connection noticed, consuming again {recovered:.2f} s after")
    await ws.close()


def _async(fn: Any) -> Any:
    async def call() -> None:
        fn()

    return call


# -- the broker away: websocket side unaffected ---------------------------------------------


@aio_test
async def test_broker_away_websockets_accepted_and_subscription_kept(server_factory, proxy: BrokerProxy, publisher) -> None:
    await proxy.refuse()
    with LogCapture() as log:
        server = await server_factory(ready=False, amqp_url=proxy.url(), reconnect_max_delay=0.5, bind_timeout=1)
        await log.wait_for("connection refused", count=2)  # keeps retrying, says why
    ws = await connect(f"ws://127.0.0.1:{server.port}/websocket")
    reply = await ws.subscribe({"jobs": ["status_changed"]})
    assert reply["errors"] == [{"error": "broker unavailable"}]
    assert reply["groups_current"] == ["jobs-status_changed"]  # kept
    other = await server.connect()  # /websocket keeps accepting
    await other.close()
    await proxy.accept()
    await wait(server.service.bus.when_ready(), timeout=30)
    await wait(server.service.bus.when_bound(["jobs-status_changed"]))
    await publisher.publish("jobs-status_changed", {"back": True})
    assert await ws.recv_json() == {"back": True}
    await ws.close()


@aio_test
async def test_each_failed_attempt_logged_once_without_password(server_factory) -> None:
    password = "not-the-password-4242"
    url = AMQP_URL.replace("guest:guest", f"guest:{password}")
    with LogCapture(prefix="") as log:
        server = await server_factory(ready=False, amqp_url=url, reconnect_max_delay=0.2)
        await log.wait_for("cannot connect to the broker", count=3)
        await wait(server.service.stopService())
    failures = log.matching("cannot connect to the broker")
    assert all("authentication refused: 403 ACCESS_REFUSED" in line for line in failures), failures
    assert len(failures) >= 2 and log.count("Scheduling retry") == 0  # one line per attempt: ours, not also ClientService's
    assert not any(password in line for line in log.lines)
    assert not server.service.bus.ready


@pytest.mark.broker
@aio_test
async def test_refused_setup_is_logged_and_retried_until_it_works(server_factory) -> None:
    node = unique("setup")

    def declare(max_length: int | None) -> None:
        with pika.BlockingConnection(pika.URLParameters(AMQP_URL)) as conn:
            if max_length is None:
                conn.channel().queue_delete(f"towerws.{node}")
            else:  # as an earlier run of this node with other settings left it
                conn.channel().queue_declare(f"towerws.{node}", durable=True, arguments={"x-max-length": max_length})

    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, declare, 5)
    with LogCapture() as log:
        server = await server_factory(ready=False, node_id=node, reconnect_max_delay=0.3)
        await log.wait_for("cannot connect to the broker", count=2)
        assert not server.service.bus.ready
        await loop.run_in_executor(None, declare, None)
        await wait(server.service.bus.when_ready(), timeout=30)
    failure = log.matching("cannot connect to the broker")[0]
    assert "channel closed by the broker: 406 PRECONDITION_FAILED - inequivalent arg" in failure


@aio_test
async def test_queue_outlives_connection_and_is_consumed_with_acks(server_factory) -> None:
    server = await server_factory(prefetch=123, queue_expires=45, queue_max_length=777)
    queue = server.service.bus.queue
    loop = asyncio.get_running_loop()
    queues = await loop.run_in_executor(
        None, _rabbitmqctl, "list_queues", "name", "durable", "auto_delete", "exclusive", "arguments"
    )
    (row,) = [r for r in queues if r[0] == queue]
    assert row[1:4] == ["true", "false", "false"]
    for arg in ('{"x-expires",45000}', '{"x-max-length",777}', '{"x-overflow","drop-head"}'):
        assert arg in row[4], row
    consumers = await loop.run_in_executor(None, _rabbitmqctl, "list_consumers", "queue_name", "ack_required", "prefetch_count")
    assert [queue, "true", "123"] in consumers


@aio_test
async def test_deleted_queue_is_declared_and_bound_again(server: Server, publisher) -> None:
    bus = server.service.bus
    ws = await server.connect()
    await ws.subscribe({"job_events": [80]})
    with LogCapture() as log:

        def delete_queue() -> None:
            with pika.BlockingConnection(pika.URLParameters(AMQP_URL)) as conn:
                conn.channel().queue_delete(bus.queue)

        async def delete() -> None:
            await asyncio.get_running_loop().run_in_executor(None, delete_queue)

        await lose_and_recover(server, delete)
    assert log.count("the broker cancelled the consumer") == 1, log.lines
    await wait(bus.when_bound(["job_events-80"]))
    await publisher.publish("job_events-80", {"n": 2})
    assert await ws.recv_json() == {"n": 2}
    await ws.close()


# -- the exchange type ------------------------------------------------------------------


@aio_test
async def test_a_topic_exchange_works_too(server_factory, exchange: str) -> None:
    server: Server = await server_factory(exchange_type="topic")
    publisher = Publisher(exchange, "topic")  # declares it topic as well: the broker agrees
    try:
        client = await server.connect()
        await client.subscribe({"jobs": ["status_changed"]})
        await publisher.publish("jobs-status_changed", {"n": 1})
        assert await client.recv_json() == {"n": 1}
        await client.close()
    finally:
        publisher.close()


@pytest.mark.broker
@aio_test
async def test_an_exchange_of_another_type_is_refused_with_the_brokers_reason(server_factory, exchange: str) -> None:
    someone = Publisher(exchange, "topic")  # declared it topic before towerws came
    someone.run(lambda channel: None)
    someone.close()
    with LogCapture() as log:
        server: Server = await server_factory(ready=False)  # direct, the default
        await log.wait_for("inequivalent arg 'type'", count=2)  # said why, and retried
    assert not server.service.ready()
