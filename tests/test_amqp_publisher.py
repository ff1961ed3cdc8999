"""towerws.amqp.publisher without a broker: the publish contract (invalid group or body refused before any
I/O), what connect refuses before connecting, and its timeout on a MemoryReactorClock.

Against the real broker: ``test_publish.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from amqphelpers import fired
from test_amqp_confirms import FakeChannel, outcome
from towerws.amqp.confirms import ChannelRefused, Confirms
from towerws.amqp.publisher import ATTEMPT_TIMEOUT, RETRY_PAUSE, Publisher
from towerws.broker_urls import AMQPAddress, amqp_address
from towerws.bus import PublishError
from towerws.messages import InvalidBody


@pytest.mark.parametrize("group, body, error", [
    ("", b"{}", ValueError), ("job events", b"{}", ValueError), ("x" * 256, b"{}", ValueError),
    ("jobs-summary", b"not json", InvalidBody), ("jobs-summary", b"\xff", InvalidBody),
    ("jobs-summary", b"[NaN]", InvalidBody), ("jobs-summary", "{}", TypeError),
])
def test_invalid_group_or_body_fails_before_io(group: str, body: Any, error: type) -> None:
    publisher = FakePublisher(Clock(), {"a": "ok"})
    assert fired(publisher.publish(group, body)).check(error)
    assert publisher.opened == []  # not even a connection


def test_a_valid_message_goes_to_the_confirm_channel() -> None:
    publisher = FakePublisher(Clock(), {"a": "ok"})
    assert fired(publisher.connect_now()) is None
    d = publisher.publish("jobs-summary", b'{"n": 1}')
    ((_, client, channel),) = publisher.opened
    assert [(key, body) for _, key, body, _ in channel.sent] == [("jobs-summary", b'{"n": 1}')]
    assert not d.called  # waits for the broker's confirm
    client.confirms.settle(1, multiple=False, ok=True)
    assert fired(d) is None and client.confirms.in_flight == 0


@pytest.mark.parametrize("url", ["http://localhost/", "amqp://guest:pw@/", "amqp://h:99999/"])
def test_an_invalid_url_fails_without_connecting(url: str) -> None:
    reactor = MemoryReactorClock()
    failure = fired(Publisher.connect(url, reactor=reactor))
    assert failure.check(ValueError) and failure.getErrorMessage().startswith("invalid AMQP URL: ")
    assert "pw" not in failure.getErrorMessage()
    assert reactor.tcpClients == [] and reactor.sslClients == []


def test_an_unreadable_ca_file_fails_without_connecting(tmp_path: Path) -> None:
    reactor = MemoryReactorClock()
    missing = str(tmp_path / "ca.pem")
    failure = fired(Publisher.connect("amqps://localhost/", reactor=reactor, ca_file=missing))
    assert failure.check(ValueError) and missing in failure.getErrorMessage()
    assert reactor.tcpClients == [] and reactor.sslClients == []


def connect_unanswered(timeout: float = 3) -> Any:
    """A connect whose TCP connection attempt never completes (a black-holed address), after ``timeout``."""
    reactor = MemoryReactorClock()
    d = Publisher.connect("amqp://guest:secretpw@192.0.2.1:5673/", reactor=reactor, timeout=timeout)
    # MemoryReactor resolves every name to 127.0.0.1 and never completes the attempt.
    assert [port for _, port, *_ in reactor.tcpClients] == [5673]
    reactor.advance(timeout - 0.1)
    assert not d.called
    reactor.advance(0.1)
    return fired(d)


def test_a_connection_attempt_that_never_completes_fails_within_the_timeout() -> None:
    failure = connect_unanswered()
    assert failure.check(PublishError)
    assert "amqp://guest@192.0.2.1:5673/" in failure.getErrorMessage() and "secretpw" not in failure.getErrorMessage()


def test_a_connection_attempt_that_never_completes_says_no_answer_within() -> None:
    assert connect_unanswered().getErrorMessage() == "no answer from the AMQP broker amqp://guest@192.0.2.1:5673/%2F within 3 s"


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
    assert f"no answer from the AMQP broker amqp://guest@b:5672/%2F within {ATTEMPT_TIMEOUT:g} s" in message
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
