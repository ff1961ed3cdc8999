"""towerws.amqp.confirms without a broker: delivery tags and their Deferreds on a fake channel and a Clock,
and the ConfirmDelegate that routes the broker's basic.ack / basic.nack / channel.close to them.

Against the real broker: ``test_publish.py`` (the Publisher) and ``test_publish_api.py``."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from txamqp.message import Message

from amqphelpers import amqp_method, close_message
from towerws.amqp.confirms import PROPERTIES, ConfirmDelegate, Confirms
from towerws.bus import PublishError


class FakeChannel:
    """A confirm-mode channel that records what is published; ``refuse`` makes sending fail."""

    def __init__(self, id: int = 1) -> None:
        self.id = id
        self.sent: list[tuple[str, str, bytes, dict]] = []
        self.calls: list[str] = []
        self.refuse: Exception | None = None

    def basic_publish(self, exchange: str, routing_key: str, content: Any) -> Deferred:
        self.sent.append((exchange, routing_key, content.body, content.properties))
        return fail(self.refuse) if self.refuse is not None else succeed(None)

    def channel_open(self) -> Deferred:
        self.calls.append("channel_open")
        return succeed(None)

    def confirm_select(self) -> Deferred:
        self.calls.append("confirm_select")
        return succeed(None)

    # what txAMQP's delegate calls when the broker closes the channel
    def channel_close_ok(self) -> None:
        self.calls.append("channel_close_ok")

    def do_close(self, msg: Any) -> None:
        self.calls.append("do_close")


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


def test_a_publish_goes_to_the_exchange_as_json() -> None:
    channel = FakeChannel()
    confirms = Confirms(channel, "towerws", Clock(), timeout=5)
    confirms.publish("jobs-summary", b'{"n": 1}')
    assert channel.sent == [("towerws", "jobs-summary", b'{"n": 1}', {"content-type": "application/json",
                                                                     "delivery-mode": 1})]
    assert channel.sent[0][3] is not PROPERTIES  # each message its own properties
    assert confirms.in_flight == 1


def test_a_publish_can_have_its_own_timeout() -> None:
    clock = Clock()
    confirms = Confirms(FakeChannel(), "ex", clock, timeout=5)
    short = outcome(confirms.publish("g", b"{}", timeout=0.5))
    default = outcome(confirms.publish("g", b"{}"))
    clock.advance(0.5)
    assert short[0].check(PublishError) and "within 0.5 s" in short[0].getErrorMessage()
    assert default == [] and confirms.in_flight == 1


def test_a_send_that_fails_fails_the_channel() -> None:
    channel = FakeChannel()
    confirms = Confirms(channel, "ex", Clock(), timeout=5)
    pending = outcome(confirms.publish("g", b"{}"))
    channel.refuse = RuntimeError("channel is closed")
    failed = outcome(confirms.publish("g", b"{}"))
    for result in (pending, failed):
        assert result[0].check(PublishError)
        assert result[0].getErrorMessage() == "cannot publish to exchange 'ex': channel is closed"
    assert confirms.error is not None and confirms.in_flight == 0


class FakeClient:
    def __init__(self) -> None:
        self.delegate = ConfirmDelegate()
        self.channels: dict[int, FakeChannel] = {}

    def channel(self, id: int) -> Deferred:
        return succeed(self.channels.setdefault(id, FakeChannel(id)))


def opened(client: FakeClient, channel_id: int) -> Confirms:
    (confirms,) = outcome(Deferred.fromCoroutine(Confirms.open(client, channel_id, "ex", Clock(), 5)))
    assert isinstance(confirms, Confirms)
    return confirms


def test_open_selects_confirm_mode_and_registers_with_the_delegate() -> None:
    client = FakeClient()
    confirms = opened(client, 3)
    assert client.channels[3].calls == ["channel_open", "confirm_select"]
    assert confirms.channel is client.channels[3] and client.delegate.confirms == {3: confirms}


def confirm(method: str, tag: int, multiple: bool) -> Message:
    fields = [tag, multiple] if method == "ack" else [tag, multiple, False]  # nack has "requeue" too
    return Message(amqp_method("basic", method), fields)


def test_the_delegate_routes_acks_and_nacks_by_channel() -> None:
    client = FakeClient()
    one, two = opened(client, 1), opened(client, 2)
    a, b = outcome(one.publish("g", b"{}")), outcome(two.publish("g", b"{}"))
    client.delegate.basic_nack(client.channels[2], confirm("nack", 1, False))
    assert a == [] and b[0].check(PublishError) and "nacked" in b[0].getErrorMessage()
    client.delegate.basic_ack(client.channels[1], confirm("ack", 1, True))
    assert a == [None]
    # A confirm on a channel without Confirms is logged and ignored.
    client.delegate.basic_ack(FakeChannel(9), confirm("ack", 1, False))


def test_a_channel_closed_by_the_broker_fails_its_confirms_with_the_reason() -> None:
    client = FakeClient()
    confirms, other = opened(client, 1), opened(client, 2)
    pending, unaffected = outcome(confirms.publish("g", b"{}")), outcome(other.publish("g", b"{}"))
    closing = close_message("channel_close", 404, "NOT_FOUND - no exchange 'ex' in vhost '/'")
    client.delegate.channel_close(client.channels[1], closing)
    assert client.channels[1].calls[-2:] == ["channel_close_ok", "do_close"]  # txAMQP's own handling still runs
    assert pending[0].getErrorMessage() == (
        "the broker closed the publishing channel: 404 NOT_FOUND - no exchange 'ex' in vhost '/'")
    assert outcome(confirms.publish("g", b"{}"))[0].value is confirms.error
    assert unaffected == [] and client.delegate.confirms == {2: other}


class Started:
    def fail_if_not_fired(self, error: Exception) -> None:
        self.error = error


class Transport:
    lost = False

    def loseConnection(self) -> None:
        self.lost = True


def test_a_lost_connection_fails_every_channels_confirms() -> None:
    client = FakeClient()
    client.started, client.transport = Started(), Transport()
    client.delegate.client = client  # as txAMQP's protocol sets it
    confirms = [opened(client, n) for n in (1, 2)]
    pending = [outcome(c.publish("g", b"{}")) for c in confirms]
    client.delegate.close(None)
    for result in pending:
        assert "lost the connection to the AMQP broker" in result[0].getErrorMessage()
    assert client.delegate.confirms == {} and client.transport.lost
