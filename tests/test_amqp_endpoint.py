"""towerws.amqp.endpoint without a broker: retry delays, failure reasons, the set-up endpoint."""

from __future__ import annotations

from typing import Any

import pytest
from OpenSSL import SSL
from service_identity import VerificationError
from service_identity.hazmat import DNS_ID, DNSMismatch
from twisted.application.internet import ClientService
from twisted.internet import error
from twisted.internet.defer import Deferred, TimeoutError as DeferredTimeout, fail, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from txamqp.client import Closed
from zope.interface import implementer

from amqphelpers import close_message, fired
from logcapture import LogCapture
from towerws.amqp.endpoint import FailoverEndpoint, NoBrokerAvailable, SetUpEndpoint, describe, retry_delays

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
        (Closed(close_message("connection_close", 403, "ACCESS_REFUSED - Login was refused")),
         "authentication refused: 403 ACCESS_REFUSED - Login was refused"),
        (Closed(close_message("connection_close", 530, "NOT_ALLOWED - vhost x not found")), "access refused: 530 NOT_ALLOWED"),
        (Closed(close_message("channel_close", 406, "PRECONDITION_FAILED - inequivalent arg")),
         "channel closed by the broker: 406 PRECONDITION_FAILED"),
        (close_message("connection_close", 320, "CONNECTION_FORCED - shutdown"), "closed by the broker: 320 CONNECTION_FORCED"),
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


@implementer(IStreamClientEndpoint)
class ScriptedEndpoint:
    """A SetUpEndpoint stand-in: ``connect()`` succeeds or fails as ``self.works`` says."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.works = True
        self.tries = 0

    def connect(self, factory: Any) -> Deferred:
        self.tries += 1
        if self.works:
            return succeed(self.name)
        return fail(error.ConnectionRefusedError())


def test_failover_rotates_and_logs_a_failed_pass_once() -> None:
    a, b, c = (ScriptedEndpoint(n) for n in "abc")
    endpoint = FailoverEndpoint([a, b, c])  # type: ignore[list-item]
    with LogCapture() as log:
        assert fired(endpoint.connect(None)) == "a"
        # After a connection (say it was lost), the next connect starts with the next node.
        assert fired(endpoint.connect(None)) == "b"
        b.works = c.works = a.works = False
        assert fired(endpoint.connect(None)).check(NoBrokerAvailable)
        assert (a.tries, b.tries, c.tries) == (2, 2, 1)
        a.works = True
        assert fired(endpoint.connect(None)) == "a"
    # One line for the whole failed pass; none for the connects that worked (a lost
    # connection is ClientService's retry too, but no failed pass).
    assert log.count("none of the 3 brokers could be used") == 1, log.lines


def test_one_broker_logs_no_pass_line() -> None:
    only = ScriptedEndpoint("only")
    only.works = False
    with LogCapture() as log:
        assert fired(FailoverEndpoint([only]).connect(None)).check(NoBrokerAvailable)  # type: ignore[list-item]
    assert log.count("brokers could be used") == 0  # the endpoint's own line says why
