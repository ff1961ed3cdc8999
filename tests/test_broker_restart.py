"""RabbitMQ stopped and started again (``rabbitmqctl stop_app`` / ``start_app``) under a running node.

The broker is shared: this test stops it for a few seconds, always starts it
again in a ``finally`` and waits until it accepts connections before it ends.
"""

from __future__ import annotations

import asyncio
import subprocess
import time

import pika

from conftest import AMQP_URL, Publisher, aio_test, wait
from logcapture import LogCapture


async def rabbitmqctl(*args: str) -> None:
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(
        None, lambda: subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=120)
    )


def _accepts_connections() -> bool:
    try:
        pika.BlockingConnection(pika.URLParameters(AMQP_URL + "?connection_attempts=1&socket_timeout=2")).close()
        return True
    except pika.exceptions.AMQPError:
        return False


async def broker_back(timeout: float = 90) -> None:
    """Start the app again and wait (bounded) until an AMQP connection succeeds."""
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + timeout
    await rabbitmqctl("start_app")
    await rabbitmqctl("await_startup")
    while not await loop.run_in_executor(None, _accepts_connections):
        assert time.monotonic() < deadline, "RabbitMQ does not accept connections after start_app"
        await asyncio.sleep(0.5)


@aio_test
async def test_clients_connected_throughout_get_messages_after_broker_restart(server_factory, exchange: str) -> None:
    server = await server_factory(reconnect_max_delay=1)
    bus = server.service.bus
    clients = [await server.connect() for _ in range(2)]
    for ws in clients:
        await ws.subscribe({"jobs": ["status_changed"], "job_events": [5]})
    before = Publisher(exchange)
    await before.publish("jobs-status_changed", {"n": "before"})
    before.close()  # its connection would not survive the restart
    for ws in clients:
        assert await ws.recv_json() == {"n": "before"}

    lost = bus.client.lost
    with LogCapture() as log:
        try:
            await rabbitmqctl("stop_app")
            await wait(lost, timeout=30)
            assert not bus.ready
            newcomer = await server.connect()  # /websocket still accepts while the broker is away
            await newcomer.close()
        finally:
            await broker_back()
        back = time.monotonic()
        after = Publisher(exchange)
        try:
            # Published as soon as the broker is back, likely before towerws is:
            # the durable queue and its bindings keep it for the node.
            await after.publish("job_events-5", {"n": "early"})
            await wait(bus.when_ready(), timeout=60)
            recovered = time.monotonic() - back
            await wait(bus.when_bound(["jobs-status_changed", "job_events-5"]))
            await after.publish("jobs-status_changed", {"n": "after"})
        finally:
            after.close()
    for ws in clients:  # the same websockets, never reconnected
        assert await ws.recv_json(timeout=30) == {"n": "early"}
        assert await ws.recv_json() == {"n": "after"}
        await ws.close()
    assert log.count("lost the connection to") == 1, log.lines
    assert log.count("CONNECTION_FORCED") == 1, log.lines
    print(f"\n[restart] consuming again {recovered:.2f} s after the broker accepted connections")
