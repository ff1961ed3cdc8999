"""towerws.publish.Publisher (txAMQP, publisher confirms) against the real broker, and
towerws.confirms' bookkeeping of delivery tags with a fake channel and a Clock.

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
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from conftest import AMQP_URL, Bound, aio_test, unique, wait
from towerws.amqp.confirms import ChannelRefused, Confirms
from towerws.amqp.publisher import ATTEMPT_TIMEOUT, RETRY_PAUSE
from towerws.broker_urls import AMQPAddress, amqp_address
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


# -- delivery-tag bookkeeping (no broker) ------------------------------------------------------------


class FakeChannel:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def basic_publish(self, exchange: str, routing_key: str, content: Any) -> Deferred:
        self.sent.append((routing_key, content.body))
        return succeed(None)


def outcome(d: Deferred) -> list:
    seen: list = []
    d.addBoth(seen.append)
    return seen


def test_acks_single_and_multiple_nack_and_timeout() -> None:
    clock = Clock()
    confirms = Confirms(FakeChannel(), "ex", clock, timeout=5)
    results = [outcome(confirms.publish("g", b"{}")) for _ in range(5)]  # tags 1..5
    confirms.settle(2, multiple=False, ok=True)
    assert [bool(r) for r in results] == [False, True, False, False, False]
    confirms.settle(3, multiple=True, ok=True)  # 1 and 3 (2 is done)
    assert [bool(r) for r in results] == [True, True, True, False, False]
    confirms.settle(4, multiple=False, ok=False)
    assert results[3][0].check(PublishError) and "nacked" in results[3][0].getErrorMessage()
    assert results[0] == results[1] == results[2] == [None]
    clock.advance(5)  # tag 5 never answered
    assert results[4][0].check(PublishError) and "within 5 s" in results[4][0].getErrorMessage()
    assert confirms.in_flight == 0
    confirms.settle(5, multiple=True, ok=True)  # a late ack is ignored
    assert clock.getDelayedCalls() == []


def test_channel_failure_fails_pending_and_later_publishes() -> None:
    confirms = Confirms(FakeChannel(), "ex", Clock(), timeout=5)
    pending = outcome(confirms.publish("g", b"{}"))
    confirms.fail(PublishError("channel closed"))
    assert pending[0].check(PublishError)
    later = outcome(confirms.publish("g", b"{}"))
    assert later[0].value is confirms.error


# -- failover over a list of nodes (no broker: fake connections and a Clock) -----------------------------


class FakeClient:
    """What the Publisher uses of a BrokerProtocol: ``lost``, ``drop``, ``close``, ``transport``."""

    def __init__(self, confirms: Confirms) -> None:
        self.confirms = confirms
        self.lost: Deferred = Deferred()
        self.dropped: str | None = None
        self.transport = self

    def lose(self, reason: str = "connection lost") -> None:
        if not self.lost.called:
            self.lost.callback(reason)
            self.confirms.fail(PublishError("lost the connection to the AMQP broker before it confirmed the message"))

    def drop(self, reason: str) -> None:
        self.dropped = reason
        self.lose(reason)

    def close(self, within: float) -> Deferred:
        return succeed(None)

    def loseConnection(self) -> None:
        self.lose("closed")

    abortConnection = loseConnection


class FakePublisher(Publisher):
    """A Publisher whose connections are fakes; ``behaviour[host]`` is ``ok``, ``refuse`` or ``hang``."""

    def __init__(self, clock: Clock, behaviour: dict[str, str], timeout: float = 10) -> None:
        addresses = [amqp_address(f"amqp://guest:secretpw@{host}:5672/%2F") for host in behaviour]
        super().__init__(addresses, "ex", clock, timeout, 0, lambda address: None)
        self.clock = clock
        self.behaviour = behaviour
        self.opened: list[tuple[str, FakeClient, FakeChannel]] = []

    async def _open(self, address: AMQPAddress) -> tuple[Any, Confirms]:
        what = self.behaviour[address.host]
        if what == "refuse":
            raise PublishError(f"cannot connect to the AMQP broker {address}: connection refused")
        if what == "hang":
            await Deferred()  # until the attempt's timeout cancels it
        channel = FakeChannel()
        confirms = Confirms(channel, "ex", self.clock, self.timeout)
        client = FakeClient(confirms)
        self.opened.append((address.host, client, channel))
        return client, confirms  # type: ignore[return-value]

    def connect_now(self) -> Deferred:
        return Deferred.fromCoroutine(self._connect_pass(self.clock.seconds() + self.timeout, quiet=True))

    def sent(self) -> list[tuple[str, int]]:
        """(host, messages sent on that connection), per connection opened."""
        return [(host, len(channel.sent)) for host, _, channel in self.opened]


def test_connect_skips_a_refused_and_a_silent_node() -> None:
    clock = Clock()
    publisher = FakePublisher(clock, {"a": "refuse", "b": "hang", "c": "ok"})
    connected = outcome(publisher.connect_now())
    assert connected == []  # a refused at once, b says nothing
    clock.advance(ATTEMPT_TIMEOUT)
    assert connected == [None] and publisher.address.host == "c"


def test_connect_fails_naming_every_node_without_password() -> None:
    clock = Clock()
    publisher = FakePublisher(clock, {"a": "refuse", "b": "hang"})
    result = outcome(publisher.connect_now())
    clock.advance(ATTEMPT_TIMEOUT)
    message = result[0].getErrorMessage()
    assert message.startswith("none of the 2 AMQP brokers could be used: cannot connect to the AMQP broker amqp://guest@a")
    assert f"no answer from the AMQP broker amqp://guest@b:5672// within {ATTEMPT_TIMEOUT:g} s" in message
    assert "secretpw" not in message


def test_message_in_flight_is_sent_again_on_the_next_node_after_a_lost_connection() -> None:
    clock = Clock()
    publisher = FakePublisher(clock, {"a": "ok", "b": "ok"})
    publisher.connect_now()
    d = outcome(publisher.publish("jobs-summary", b"{}"))
    publisher.opened[0][1].lose()
    assert publisher.address.host == "b" and publisher.sent() == [("a", 1), ("b", 1)]
    assert d == []  # not before b confirmed it
    publisher.confirms.settle(1, multiple=False, ok=True)
    assert d == [None]


def test_no_confirm_within_the_attempt_timeout_moves_to_the_next_node() -> None:
    clock = Clock()
    publisher = FakePublisher(clock, {"a": "ok", "b": "ok"})
    publisher.connect_now()
    first = publisher.opened[0][1]
    d = outcome(publisher.publish("jobs-summary", b"{}"))
    clock.advance(ATTEMPT_TIMEOUT)  # a hung node
    assert first.dropped == f"no confirm within {ATTEMPT_TIMEOUT:g} s"
    assert publisher.sent() == [("a", 1), ("b", 1)]
    publisher.confirms.settle(1, multiple=False, ok=True)
    assert d == [None]


def test_publish_fails_only_when_no_node_confirmed_within_the_timeout() -> None:
    clock = Clock()
    publisher = FakePublisher(clock, {"a": "ok", "b": "ok"}, timeout=10)
    publisher.connect_now()
    d = outcome(publisher.publish("jobs-summary", b"{}"))
    publisher.behaviour.update(a="refuse", b="refuse")
    publisher.opened[0][1].lose()
    clock.pump([0.1] * 98)  # passes over both nodes, with backoff
    assert d == []
    clock.advance(0.5)
    assert d[0].check(PublishError)
    assert d[0].getErrorMessage().startswith("no broker node confirmed the message within 10 s (")
    publisher.behaviour.update(a="ok")
    assert clock.getDelayedCalls() == []  # nobody waits: no reconnecting in the background
    later = outcome(publisher.publish("jobs-summary", b"{}"))  # reconnects on demand
    publisher.confirms.settle(1, multiple=False, ok=True)
    assert later == [None]


def test_nack_is_sent_again_on_the_next_node_a_moment_later() -> None:
    # A channel whose quorum queue lost its leader can go on nacking; a new one finds the new leader.
    clock = Clock()
    publisher = FakePublisher(clock, {"a": "ok", "b": "ok"})
    publisher.connect_now()
    d = outcome(publisher.publish("jobs-summary", b"{}"))
    publisher.confirms.settle(1, multiple=False, ok=False)
    assert publisher.opened[0][1].dropped == "the broker refused (nacked) a message"
    assert publisher.sent() == [("a", 1)]
    clock.advance(RETRY_PAUSE)
    assert publisher.sent() == [("a", 1), ("b", 1)]
    publisher.confirms.settle(1, multiple=False, ok=True)
    assert d == [None]


@pytest.mark.parametrize("code, again", [(404, False), (403, False), (406, True)])
def test_channel_closed_by_the_broker(code: int, again: bool) -> None:
    # 404/403: the exchange itself is refused, the same on every node: at once.  Others: a new connection.
    clock = Clock()
    publisher = FakePublisher(clock, {"a": "ok", "b": "ok"})
    publisher.connect_now()
    d = outcome(publisher.publish("jobs-summary", b"{}"))
    publisher.confirms.fail(ChannelRefused(f"the broker closed the publishing channel: {code} X", code))
    if again:
        assert d == [] and publisher.sent() == [("a", 1), ("b", 1)]
    else:
        assert d[0].check(ChannelRefused) and f"{code} X" in d[0].getErrorMessage()


def test_close_fails_waiting_publishes_and_stops_reconnecting() -> None:
    clock = Clock()
    publisher = FakePublisher(clock, {"a": "ok"})
    publisher.connect_now()
    publisher.behaviour["a"] = "refuse"
    publisher.opened[0][1].lose()
    d = outcome(publisher.publish("jobs-summary", b"{}"))
    clock.advance(0.05)
    closed = outcome(publisher.close())
    assert closed == [None]
    assert d[0].check(PublishError) and "closed" in d[0].getErrorMessage()
    assert clock.getDelayedCalls() == []
    assert outcome(publisher.publish("jobs-summary", b"{}"))[0].check(PublishError)


def test_fails_over_again_and_again_round_the_list() -> None:
    clock = Clock()
    publisher = FakePublisher(clock, {"a": "ok", "b": "ok", "c": "ok"})
    publisher.connect_now()
    for expected in ["b", "c", "a", "b"]:
        d = outcome(publisher.publish("jobs-summary", b"{}"))
        publisher.client.lose()
        assert publisher.address.host == expected
        publisher.confirms.settle(1, multiple=False, ok=True)
        assert d == [None]
