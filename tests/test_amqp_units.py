"""The AMQP side without a broker: bindings state machine, acks, heartbeats, retries, reasons, setup endpoint."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from OpenSSL import SSL
from service_identity import VerificationError
from service_identity.hazmat import DNS_ID, DNSMismatch
from twisted.application.internet import ClientService
from twisted.internet import error
from twisted.internet.defer import Deferred, TimeoutError as DeferredTimeout, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from txamqp.client import Closed
from txamqp.message import Message
from zope.interface import implementer

from logcapture import LogCapture
from towerws.amqp import BrokerProtocol, Bindings, RateLimitedLog, ack_frame
from towerws.amqp_endpoint import SetUpEndpoint, describe, retry_delays
from towerws.amqpspec import install_codec, load_spec
from towerws.websocket import BrokerUnavailable

# -- Bindings ----------------------------------------------------------------------------------


class FakeChannel:
    """Records queue_bind / queue_unbind; the test answers each one."""

    def __init__(self) -> None:
        self.ops: list[tuple[str, str, Deferred]] = []

    def queue_bind(self, queue: str, exchange: str, routing_key: str) -> Deferred:
        return self._op("bind", routing_key)

    def queue_unbind(self, queue: str, exchange: str, routing_key: str) -> Deferred:
        return self._op("unbind", routing_key)

    def _op(self, op: str, group: str) -> Deferred:
        d: Deferred = Deferred()
        self.ops.append((op, group, d))
        return d

    def pending(self) -> list[tuple[str, str]]:
        return [(op, g) for op, g, d in self.ops if not d.called]

    def answer(self, n: int = 1) -> None:
        for _, _, d in [o for o in self.ops if not o[2].called][:n]:
            d.callback(None)


def make_bindings(grace: float = 5.0, timeout: float = 10.0) -> tuple[Bindings, FakeChannel, Clock]:
    clock = Clock()
    b = Bindings("ex", "q", clock, grace=grace, timeout=timeout)
    ch = FakeChannel()
    b.attach(ch)
    return b, ch, clock


def fired(d: Deferred) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    return results[0] if results else None


def test_reply_waits_for_the_bind() -> None:
    b, ch, _ = make_bindings()
    b.group_activated("g")
    d = b.when_bound(["g"])
    assert ch.pending() == [("bind", "g")] and not d.called
    ch.answer()
    assert d.called and b.bound == {"g"}
    assert fired(b.when_bound(["g"])) is None  # bound: at once


def test_unbind_only_after_grace_and_not_if_resubscribed() -> None:
    b, ch, clock = make_bindings(grace=5)
    b.group_activated("g")
    ch.answer()
    b.group_deactivated("g")
    clock.advance(4.9)
    assert ch.pending() == []  # still bound within the grace period
    b.group_activated("g")  # the UI navigated back
    clock.advance(10)
    assert ch.pending() == [] and b.bound == {"g"}
    b.group_deactivated("g")
    clock.advance(5)
    assert ch.pending() == [("unbind", "g")]
    ch.answer()
    assert b.bound == set()


def test_burst_ends_bound_with_one_operation_at_a_time() -> None:
    b, ch, _ = make_bindings(grace=0)
    b.group_activated("g")
    b.group_deactivated("g")
    b.group_activated("g")
    assert ch.pending() == [("bind", "g")]
    ch.answer()
    assert ch.pending() == []  # wanted again before the bind answered: nothing to undo
    b.group_deactivated("g")
    b.group_activated("g")
    assert ch.pending() == [("unbind", "g")]
    ch.answer()
    assert ch.pending() == [("bind", "g")]
    ch.answer()
    assert b.bound == {"g"} and ch.pending() == []


def test_reply_during_an_unbind_waits_for_the_rebind() -> None:
    # Regression: a group "bound" with its unbind in flight looked ready, so a
    # reply went out while the queue was about to lose the binding.
    b, ch, _ = make_bindings(grace=0)
    b.group_activated("g")
    ch.answer()
    b.group_deactivated("g")  # unbind in flight
    b.group_activated("g")  # a new subscriber
    d = b.when_bound(["g"])
    ch.answer()  # unbind-ok
    assert not d.called
    assert ch.pending() == [("bind", "g")]
    ch.answer()
    assert d.called and fired(d) is None


def test_timeout_says_unavailable_and_keeps_the_subscription() -> None:
    clock = Clock()
    b = Bindings("ex", "q", clock, grace=5, timeout=2)
    b.group_activated("g")  # no channel: the broker is away
    d = b.when_bound(["g"])
    clock.advance(2)
    assert isinstance(fired(d).value, BrokerUnavailable)
    ch = FakeChannel()
    b.attach(ch)  # the broker is back
    assert ch.pending() == [("bind", "g")]


def test_new_channel_rebinds_wanted_and_unbinds_leftovers() -> None:
    b, ch, clock = make_bindings(grace=5)
    for g in ("a", "b", "c"):
        b.group_activated(g)
    ch.answer(3)
    b.group_deactivated("b")  # in grace: still wanted bound
    b.group_activated("d")  # bind in flight when the connection drops
    b.detach()
    b.group_deactivated("c")
    clock.advance(5)  # grace over while disconnected
    ch2 = FakeChannel()
    b.attach(ch2)
    assert sorted(ch2.pending()) == [("bind", "a"), ("bind", "d"), ("unbind", "b"), ("unbind", "c")]
    ch.answer()  # the old channel's late answer changes nothing
    ch2.answer(4)
    assert b.bound == {"a", "d"}


def test_failed_operation_asks_for_a_new_connection() -> None:
    b, ch, _ = make_bindings()
    dropped = []
    b.on_error = lambda: dropped.append(True)
    b.group_activated("g")
    with LogCapture() as log:
        ch.ops[0][2].errback(Failure(ValueError("boom")))
    assert dropped == [True]
    assert log.count("AMQP bind of group g failed: ValueError: boom; reconnecting") == 1


def test_rate_limited_log_holds_back_and_counts() -> None:
    events: list[dict] = []
    clock = Clock()
    limited = RateLimitedLog(Logger(observer=events.append), clock, interval=10)
    for _ in range(5):
        limited.warn("bad body for {group}", group="g")
    clock.advance(10)
    limited.warn("bad body for {group}", group="g")
    assert len(events) == 2
    assert events[0]["log_level"] == LogLevel.warn and events[0]["suppressed"] == 0
    assert events[1]["suppressed"] == 4


# -- BrokerProtocol ---------------------------------------------------------------------------------


def frame(ftype: int, payload: bytes, channel: int = 1) -> bytes:
    return struct.pack("!BHI", ftype, channel, len(payload)) + payload + b"\xce"


def delivery(tag: int, key: str, body: bytes) -> bytes:
    short = lambda s: bytes([len(s)]) + s.encode()  # noqa: E731
    method = struct.pack("!HH", 60, 60) + short("ctag") + struct.pack("!QB", tag, 0) + short("ex") + short(key)
    header = struct.pack("!HHQH", 60, 0, len(body), 0)
    return frame(1, method) + frame(2, header) + frame(3, body)


def connected_protocol(heartbeat: int = 0) -> tuple[BrokerProtocol, StringTransport, list, Clock]:
    install_codec()
    got: list[tuple[str, bytes]] = []
    clock = Clock()
    proto = BrokerProtocol(lambda k, b, received: got.append((k, b)), "/", heartbeat, clock)
    transport = StringTransport()
    proto.makeConnection(transport)
    transport.clear()
    return proto, transport, got, clock


def test_one_multiple_ack_per_read_after_dispatch() -> None:
    proto, transport, got, _ = connected_protocol()
    proto.consuming = True
    data = delivery(1, "g-1", b'{"a": 1}') + delivery(2, "g-2", b"{}")
    proto.dataReceived(data[:20])  # a partial frame: nothing yet
    assert got == [] and transport.value() == b""
    proto.dataReceived(data[20:])
    assert got == [("g-1", b'{"a": 1}'), ("g-2", b"{}")]
    assert transport.value() == ack_frame(1, 2)
    assert ack_frame(1, 2) == frame(1, struct.pack("!HHQB", 60, 80, 2, 1))  # basic.ack, multiple


def test_missed_heartbeats_drop_the_connection_with_a_reason() -> None:
    proto, transport, _, clock = connected_protocol(heartbeat=1)
    reasons: list[Any] = []
    proto.lost.addCallback(reasons.append)
    clock.advance(3)
    assert transport.disconnected  # aborted
    proto.connectionLost(Failure(error.ConnectionAborted()))
    assert describe(reasons[0]) == "no traffic from the broker for 3 s (heartbeat)"


def test_channel_closed_by_the_broker_drops_the_connection() -> None:
    proto, transport, _, _ = connected_protocol()
    reasons: list[Any] = []
    proto.lost.addCallback(reasons.append)
    channel = proto.channelFactory(1, proto.outgoing, proto)
    channel.do_close(_close("channel_close", 406, "PRECONDITION_FAILED - unknown delivery tag 7"))
    assert transport.disconnected  # otherwise consumption would silently stop
    proto.connectionLost(Failure(error.ConnectionAborted()))
    assert describe(reasons[0]) == "channel closed by the broker: 406 PRECONDITION_FAILED - unknown delivery tag 7"


def test_client_properties_ask_for_auth_failure_close() -> None:
    proto, transport, _, _ = connected_protocol()
    proto.response, proto.mechanism, proto.locale = "\0u\0p", "PLAIN", "en_US"
    start = Message(_method("connection", "start"), [0, 9, {}, b"PLAIN", b"en_US"])
    proto.delegate.connection_start(proto.channels.get(0) or _channel0(proto), start)
    sent = transport.value()
    assert b"authentication_failure_close" in sent and b"consumer_cancel_notify" in sent


def _channel0(proto: BrokerProtocol) -> Any:
    ch = proto.channelFactory(0, proto.outgoing, proto)
    proto.channels[0] = ch
    return ch


# -- retry delays -------------------------------------------------------------------------------------


def test_retry_delays_grow_jittered_and_never_exceed_the_cap() -> None:
    low = retry_delays(0.5, 30, uniform=lambda a, b: a)
    high = retry_delays(0.5, 30, uniform=lambda a, b: b)
    assert [high(n) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert low(3) == 1.0  # jitter takes off up to half
    assert high(10) == 30 and high(10_000) == 30 and low(10_000) == 15
    real = retry_delays(0.5, 30)
    assert all(0 < real(n) <= 30 for n in range(1, 200))
    assert len({real(8) for _ in range(20)}) > 1


# -- reasons ----------------------------------------------------------------------------------------------


def _method(klass: str, method: str) -> Any:
    return load_spec().classes.bypyname[klass].methods.bypyname[method]


def _close(method: str, code: int, text: str) -> Message:
    klass, name = method.split("_")
    return Message(_method(klass, name), [code, text, 0, 0])


@pytest.mark.parametrize(
    "reason,expected",
    [
        (error.ConnectionRefusedError(), "connection refused"),
        (Failure(error.ConnectionRefusedError()), "connection refused"),
        (error.DNSLookupError("nowhere.example"), "cannot resolve the host name"),
        (DeferredTimeout(), "timed out"),
        (SSL.Error([("SSL routines", "", "certificate verify failed")]), "TLS handshake failed: certificate verify failed"),
        (VerificationError(errors=[DNSMismatch(mismatched_id=DNS_ID("rabbit.example"))]),
         "TLS: the broker's certificate does not match the host name rabbit.example"),
        (Closed(_close("connection_close", 403, "ACCESS_REFUSED - Login was refused")),
         "authentication refused: 403 ACCESS_REFUSED - Login was refused"),
        (Closed(_close("connection_close", 530, "NOT_ALLOWED - vhost x not found")), "access refused: 530 NOT_ALLOWED"),
        (Closed(_close("channel_close", 406, "PRECONDITION_FAILED - inequivalent arg")),
         "channel closed by the broker: 406 PRECONDITION_FAILED"),
        (_close("connection_close", 320, "CONNECTION_FORCED - shutdown"), "closed by the broker: 320 CONNECTION_FORCED"),
        (Closed(Failure(error.ConnectionLost())), "connection lost"),
        (error.ConnectionDone(), "connection closed"),
        (RuntimeError("odd"), "RuntimeError: odd"),
        ("heartbeat words", "heartbeat words"),
    ],
)
def test_describe_names_the_stage(reason: Any, expected: str) -> None:
    assert describe(reason).startswith(expected)


# -- SetUpEndpoint -----------------------------------------------------------------------------------------


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """Connects the factory's protocol to a StringTransport at once."""

    def __init__(self) -> None:
        self.protocols: list[Any] = []

    def connect(self, factory: Any) -> Deferred:
        proto = factory.buildProtocol(None)
        proto.makeConnection(StringTransport())
        self.protocols.append(proto)
        return succeed(proto)


class SetUpProtocol(Protocol):
    def __init__(self) -> None:
        self.ready: Deferred = Deferred()
        self.lost: list[Failure] = []

    def connectionLost(self, reason: Failure) -> None:
        self.lost.append(reason)
        if not self.ready.called:
            self.ready.errback(Closed(reason))


def set_up_service(name: str = "broker") -> tuple[Clock, FakeEndpoint, ClientService]:
    """A ClientService on a SetUpEndpoint whose setup waits for ``protocol.ready``."""
    clock = Clock()
    fake = FakeEndpoint()
    endpoint = SetUpEndpoint(fake, lambda proto: proto.ready, name, clock)
    return clock, fake, ClientService(endpoint, Factory.forProtocol(SetUpProtocol), retryPolicy=lambda n: 1.0, clock=clock)


def test_connection_lost_during_setup_fails_the_attempt_and_retries() -> None:
    clock, fake, service = set_up_service("amqp://guest@h:5672/")
    with LogCapture(prefix="") as log:
        service.startService()
        gate = fake.protocols[0]
        # Before this fix ClientService saw this loss too: automat.NoTransition.
        gate.connectionLost(Failure(error.ConnectionLost()))
        assert gate.protocol.lost  # the application protocol was told
        clock.advance(1)
        assert len(fake.protocols) == 2  # retried
        gate2 = fake.protocols[1]
        gate2.protocol.ready.callback(None)  # set up
        connected = service.whenConnected()
        assert fired(connected) is gate2.protocol
        gate2.connectionLost(Failure(error.ConnectionDone()))  # after setup: ClientService reconnects
        clock.advance(1)
        assert len(fake.protocols) == 3
        service.stopService()
    assert log.count("cannot connect to the broker amqp://guest@h:5672/: connection lost") == 1, log.lines
    assert not any("NoTransition" in line or "Unhandled" in line for line in log.lines), log.lines


def test_stopping_during_setup_is_not_a_failed_attempt() -> None:
    _, fake, service = set_up_service()
    with LogCapture(prefix="") as log:
        service.startService()
        gate = fake.protocols[0]
        stopped = service.stopService()
        assert gate.transport.disconnected  # the setup was cancelled and the connection aborted
        gate.connectionLost(Failure(error.ConnectionAborted()))
    assert stopped.called
    assert log.count("cannot connect") == 0, log.lines


def test_setup_that_never_finishes_times_out() -> None:
    clock = Clock()
    fake = FakeEndpoint()
    endpoint = SetUpEndpoint(fake, lambda proto: proto.ready, "broker", clock, timeout=30)
    with LogCapture() as log:
        d = endpoint.connect(Factory.forProtocol(SetUpProtocol))
        clock.advance(30)
    assert isinstance(fired(d).value, DeferredTimeout)
    assert fake.protocols[0].transport.disconnected  # the half-made connection is aborted
    assert log.count("cannot connect to the broker broker: timed out") == 1
