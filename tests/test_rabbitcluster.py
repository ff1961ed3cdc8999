"""The local 3-node RabbitMQ cluster of :mod:`rabbitcluster`: it forms, and its faults heal.

A quorum queue is the witness: confirmed messages survive the kill of its
leader's node and a frozen member, and are consumed through another node.
Cluster control and pika calls block, so the asyncio tests run them in worker
threads (``cluster.run_async``, ``loop.run_in_executor``), every wait bounded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pika
import pytest
from pika.exceptions import AMQPError

from conftest import aio_test, unique
from rabbitcluster import ClusterError, RabbitCluster

T = TypeVar("T")

# The first test that asks for the cluster also boots it (~20-25 s here).
pytestmark = pytest.mark.timeout(240)

PIKA_TIMEOUT = 10.0


def _connect(url: str) -> pika.BlockingConnection:
    params = pika.URLParameters(url)
    params.socket_timeout = params.stack_timeout = params.blocked_connection_timeout = PIKA_TIMEOUT
    return pika.BlockingConnection(params)


def declare_quorum(url: str, queue: str) -> None:
    with _connect(url) as conn:
        conn.channel().queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})


def publish_confirmed(url: str, queue: str, bodies: list[bytes]) -> None:
    """Publish with publisher confirms: pika raises unless the broker confirmed every message."""
    with _connect(url) as conn:
        ch = conn.channel()
        ch.confirm_delivery()
        for body in bodies:
            ch.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2), mandatory=True)


def consume(url: str, queue: str, count: int, timeout: float) -> list[bytes]:
    """Consume and ack ``count`` messages (or as many as arrive within ``timeout``)."""
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    with _connect(url) as conn:
        ch = conn.channel()
        ch.basic_qos(prefetch_count=100)
        for method, _props, body in ch.consume(queue, inactivity_timeout=timeout):
            if method is None or time.monotonic() > deadline:
                break
            ch.basic_ack(method.delivery_tag)
            got.append(body)
            if len(got) == count:
                break
        ch.cancel()
    return got


async def blocking(fn: Callable[..., T], *args: Any, timeout: float = 30.0) -> T:
    """Run a blocking pika call in the loop's default executor, bounded."""
    loop = asyncio.get_running_loop()
    return await asyncio.wait_for(loop.run_in_executor(None, fn, *args), timeout)


@pytest.fixture
def quorum_queue(rabbit_cluster: RabbitCluster) -> Iterator[str]:
    """A unique quorum queue name; the queue is deleted through whichever node answers."""
    name = unique("towerws-cluster-qq")
    yield name
    for url in rabbit_cluster.urls:
        try:
            with _connect(url) as conn:
                conn.channel().queue_delete(name)
            return
        except AMQPError:
            continue  # that node is down (a failed test): try the next one


def test_three_running_nodes(rabbit_cluster: RabbitCluster) -> None:
    cluster = rabbit_cluster
    assert len(cluster.nodes) == 3 and len(set(cluster.urls)) == 3
    for node, url in zip(cluster.nodes, cluster.urls):
        assert cluster.url_of(node) == url
        assert cluster.node_of_port(int(url.rsplit(":", 1)[1].split("/")[0])) == node
        status = cluster.status(node)
        assert sorted(status["running_nodes"]) == sorted(cluster.nodes), status
        assert not status["partitions"], status
    with pytest.raises(KeyError):
        cluster.node_of_port(5672)  # the shared broker is not part of it


@aio_test
async def test_quorum_queue_survives_leader_kill(rabbit_cluster: RabbitCluster, quorum_queue: str) -> None:
    cluster = rabbit_cluster
    bodies = [f"message {i}".encode() for i in range(200)]
    await blocking(declare_quorum, cluster.urls[0], quorum_queue)
    await blocking(publish_confirmed, cluster.urls[0], quorum_queue, bodies)
    leader = await cluster.run_async(cluster.queue_leader, quorum_queue)

    await cluster.run_async(cluster.kill, leader)
    survivor = next(node for node in cluster.nodes if node != leader)
    got = await blocking(consume, cluster.url_of(survivor), quorum_queue, len(bodies), 30.0, timeout=45)
    assert sorted(got) == sorted(bodies), f"{len(got)} of {len(bodies)} confirmed messages after the kill"

    await cluster.run_async(cluster.restart, leader)
    await cluster.run_async(cluster.wait_healthy, 60.0)


@aio_test
async def test_freeze_thaw_heal(rabbit_cluster: RabbitCluster, quorum_queue: str) -> None:
    cluster = rabbit_cluster
    first, _, frozen = cluster.nodes
    await blocking(declare_quorum, cluster.url_of(first), quorum_queue)  # before: a declare would block

    await cluster.run_async(cluster.freeze, frozen)
    t0 = time.monotonic()
    # The two others are a majority: the queue keeps confirming.
    bodies = [f"message {i}".encode() for i in range(50)]
    await blocking(publish_confirmed, cluster.url_of(first), quorum_queue, bodies)
    # net_ticktime = 15: declared down within 15 s +- 25 %, plus the polling.
    while frozen in await cluster.run_async(cluster.connected, first):
        assert time.monotonic() - t0 < 30, f"{frozen} frozen for 30 s and still not declared down"
        await asyncio.sleep(0.5)

    await cluster.run_async(cluster.thaw, frozen)
    await cluster.run_async(cluster.heal, frozen)
    await cluster.run_async(cluster.wait_healthy, 60.0)
    got = await blocking(consume, cluster.url_of(frozen), quorum_queue, len(bodies), 20.0)
    assert sorted(got) == sorted(bodies)


def test_reset_restores_a_degraded_cluster(rabbit_cluster: RabbitCluster) -> None:
    cluster = rabbit_cluster
    _, killed, stopped = cluster.nodes
    cluster.kill(killed)
    cluster.ctl(stopped, "stop_app")  # a fault reset does not know about: found by the health check
    with pytest.raises(ClusterError):
        cluster.wait_healthy(1.0)
    cluster.reset()
    cluster.wait_healthy(5.0)
