"""towerws.publish.Publisher (txAMQP, publisher confirms) against the real broker.

Without a broker: the Publisher's own contract in ``test_amqp_publisher.py``, the bookkeeping
of delivery tags in ``test_amqp_confirms.py``.

Each test publishes to an exchange of its own with an exclusive queue bound to it
(the ``bound`` fixture); a confirmed publish is already queued, so reads need no sleeps.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from conftest import AMQP_URL, Bound, aio_test, unique, wait
from towerws.bus import PublishError
from towerws.messages import InvalidBody
from towerws.publish import Publisher

UNREACHABLE = "amqp://guest:secretpw@127.0.0.1:1/%2F"


async def connect(bound: Bound, **kw: Any) -> Publisher:
    return await wait(Publisher.connect(AMQP_URL, bound.exchange, **kw))


async def get(bound: Bound, count: int) -> list:
    # Blocking pika reads run off the reactor's loop.
    return await asyncio.to_thread(bound.get, count)


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
async def test_nack_fails_that_message_only(bound: Bound) -> None:
    # A queue that rejects every publish: RabbitMQ nacks messages routed to it.
    full = unique("towerws-full")
    bound.channel.queue_declare(full, exclusive=True, arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
    bound.channel.queue_bind(full, bound.exchange, "jobs-summary")
    publisher = await connect(bound)
    with pytest.raises(PublishError, match="nacked"):
        await wait(publisher.publish("jobs-summary", b'{"n": 1}'))
    # The channel survives a nack.
    await wait(publisher.publish("jobs-status_changed", b'{"n": 2}'))
    assert [m.body for m in await get(bound, 2)] == [b'{"n": 1}', b'{"n": 2}']  # the `#` queue took both
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
async def test_connection_lost_fails_messages_in_flight(bound: Bound) -> None:
    publisher = await connect(bound)
    d = publisher.publish("jobs-summary", b"{}")
    publisher.client.transport.abortConnection()  # before the broker's ack can be read
    with pytest.raises(PublishError, match="lost the connection"):
        await wait(d)
    with pytest.raises(PublishError):
        await wait(publisher.publish("jobs-summary", b"{}"))


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
