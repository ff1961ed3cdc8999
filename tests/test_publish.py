"""towerws.publish.Publisher (txAMQP, publisher confirms) against the real broker.

Without a broker: the Publisher's own contract in ``test_amqp_publisher.py``, the bookkeeping
of delivery tags in ``test_amqp_confirms.py``.

Each test publishes to an exchange of its own with an exclusive queue bound to it
(the ``bound`` fixture); a confirmed publish is already queued, so reads need no sleeps.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any

import pytest

from conftest import AMQP_URL, Bound, aio_test, unique, wait
from towerws.amqp.publisher import ATTEMPT_TIMEOUT
from towerws.bus import PublishError
from towerws.messages import InvalidBody
from towerws.publish import Publisher

UNREACHABLE = "amqp://guest:secretpw@127.0.0.1:1/%2F"


async def connect(bound: Bound, **kw: Any) -> Publisher:
    return await wait(Publisher.connect(AMQP_URL, bound.exchange, **kw))


async def get(bound: Bound, count: int) -> list:
    # Blocking pika reads run off the reactor's loop.
    return await asyncio.to_thread(bound.get, count)


def drain(bound: Bound) -> list:
    """Every message queued now (after confirmed publishes: all of them)."""
    messages = []
    while (msg := bound.get_now()) is not None:
        messages.append(msg)
    return messages


@aio_test
async def test_publish_fires_once_confirmed_and_message_is_queued(bound: Bound) -> None:
    publisher = await connect(bound)
    body = '{"status": "running",  "name": "caf\u00e9"}'.encode()
    assert await wait(publisher.publish("jobs-status_changed", body)) is None
    (msg,) = await get(bound, 1)
    assert msg.routing_key == "jobs-status_changed"
    assert msg.body == body
    assert msg.properties.content_type == "application/json"
    await wait(publisher.close())


@aio_test
async def test_many_publishes_in_flight_all_confirmed_in_order(bound: Bound) -> None:
    # The broker acknowledges bursts with `multiple`: every Deferred must still fire once.
    publisher = await connect(bound)
    results = [publisher.publish(f"job_events-{n % 3 + 1}", json.dumps({"n": n}).encode()) for n in range(300)]
    assert publisher.confirms.in_flight > 0
    for d in results:
        assert await wait(d) is None
    assert publisher.confirms.in_flight == 0
    messages = await get(bound, 300)
    assert [json.loads(m.body)["n"] for m in messages] == list(range(300))
    await wait(publisher.close())


@aio_test
async def test_nack_is_retried_until_the_timeout(bound: Bound) -> None:
    # A queue that rejects every publish: RabbitMQ nacks messages routed to it.
    full = unique("towerws-full")
    bound.channel.queue_declare(full, exclusive=True, arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
    bound.channel.queue_bind(full, bound.exchange, "jobs-summary")
    publisher = await connect(bound, timeout=1)
    with pytest.raises(PublishError, match=r"within 1 s \(the broker refused \(nacked\)"):
        await wait(publisher.publish("jobs-summary", b'{"n": 1}'))
    await wait(publisher.publish("jobs-status_changed", b'{"n": 2}'))
    # The `#` queue took every try of n=1 (a nack retried: duplicates elsewhere), then n=2.
    bodies = [m.body for m in await get(bound, 3)]
    bodies += [m.body for m in await asyncio.to_thread(drain, bound)]
    assert bodies[-1] == b'{"n": 2}' and set(bodies[:-1]) == {b'{"n": 1}'} and len(bodies) >= 3, bodies
    await wait(publisher.close())


@aio_test
async def test_missing_exchange_fails_clearly_and_stays_failed(bound: Bound) -> None:
    missing = unique("towerws-missing")
    publisher = await wait(Publisher.connect(AMQP_URL, missing))
    with pytest.raises(PublishError, match=f"404 NOT_FOUND - no exchange '{missing}'"):
        await wait(publisher.publish("jobs-summary", b"{}"))
    with pytest.raises(PublishError, match="404"):
        await wait(publisher.publish("jobs-summary", b"{}"))
    await wait(publisher.close())


@aio_test
async def test_connection_lost_message_in_flight_is_sent_again(bound: Bound) -> None:
    publisher = await connect(bound)
    first = publisher.client
    d = publisher.publish("jobs-summary", b'{"n": 1}')
    first.transport.abortConnection()  # before the broker's ack can be read
    assert await wait(d) is None  # confirmed, on a new connection
    assert publisher.client is not None and publisher.client is not first
    await wait(publisher.publish("jobs-summary", b'{"n": 2}'))
    # The broker may have taken n=1 before the connection died: then it is there twice.
    bodies = [m.body for m in await get(bound, 2)] + [m.body for m in await asyncio.to_thread(drain, bound)]
    assert bodies[-1] == b'{"n": 2}' and set(bodies[:-1]) == {b'{"n": 1}'}, bodies
    await wait(publisher.close())


@pytest.mark.parametrize("group,body,error", [
    ("", b"{}", ValueError), ("job events", b"{}", ValueError), ("x" * 256, b"{}", ValueError),
    ("jobs-summary", b"not json", InvalidBody), ("jobs-summary", b"\xff", InvalidBody),
    ("jobs-summary", "{}", TypeError),
])
@aio_test
async def test_invalid_group_or_body_fails_before_io(bound: Bound, group: str, body: Any, error: type) -> None:
    publisher = await connect(bound)
    with pytest.raises(error):
        await wait(publisher.publish(group, body))
    assert publisher.confirms.in_flight == 0
    await wait(publisher.publish("jobs-summary", b'"sentinel"'))
    assert [m.body for m in await get(bound, 1)] == [b'"sentinel"']
    await asyncio.to_thread(bound.assert_empty)
    await wait(publisher.close())


@aio_test
async def test_unreachable_broker_fails_without_password() -> None:
    with pytest.raises(PublishError) as info:
        await wait(Publisher.connect(UNREACHABLE, "towerws", timeout=5))
    assert "cannot connect to the AMQP broker amqp://guest@127.0.0.1:1/" in str(info.value)
    assert "secretpw" not in str(info.value)


class KeepOrder(random.Random):
    """An rng whose shuffle keeps the URLs in the order given: which node is tried first is the test's choice."""

    def shuffle(self, x: Any) -> None:  # type: ignore[override]
        pass


@aio_test
async def test_refused_first_url_costs_milliseconds_and_the_next_is_used(bound: Bound) -> None:
    start = time.monotonic()
    publisher = await wait(Publisher.connect(f"{UNREACHABLE},{AMQP_URL}", bound.exchange, rng=KeepOrder()))
    assert time.monotonic() - start < 1
    assert publisher.address.node == "127.0.0.1:5672"
    await wait(publisher.publish("jobs-summary", b'{"n": 1}'))
    assert [m.body for m in await get(bound, 1)] == [b'{"n": 1}']
    await wait(publisher.close())


@aio_test
async def test_silent_first_url_costs_one_attempt_timeout(bound: Bound) -> None:
    # A TCP server that accepts and never speaks AMQP, like a hung node.
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    silent = f"amqp://guest:guest@127.0.0.1:{server.sockets[0].getsockname()[1]}/%2F"
    try:
        start = time.monotonic()
        publisher = await wait(Publisher.connect(f"{silent},{AMQP_URL}", bound.exchange, rng=KeepOrder()))
        elapsed = time.monotonic() - start
    finally:
        server.close()
    assert ATTEMPT_TIMEOUT - 0.1 < elapsed < ATTEMPT_TIMEOUT + 1.5, elapsed
    assert publisher.address.node == "127.0.0.1:5672"
    await wait(publisher.close())


@pytest.mark.broker
@aio_test
async def test_wrong_password_fails_without_password() -> None:
    with pytest.raises(PublishError) as info:
        await wait(Publisher.connect("amqp://guest:wrongpw99@127.0.0.1:5672/%2F", "towerws", timeout=5))
    assert "AMQP setup on amqp://guest@127.0.0.1:5672/" in str(info.value)
    assert "wrongpw99" not in str(info.value)


@aio_test
async def test_silent_broker_times_out() -> None:
    # A TCP server that accepts and never speaks AMQP.
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(PublishError, match="no answer from the AMQP broker .* within 0.5 s"):
            await wait(Publisher.connect(f"amqp://guest:guest@127.0.0.1:{port}/%2F", "towerws", timeout=0.5))
    finally:
        server.close()
