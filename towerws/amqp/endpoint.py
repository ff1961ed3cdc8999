"""How towerws reaches the broker: the endpoints, the retry delays, and what a failed attempt is called.

* :func:`broker_endpoint` -- ``HostnameEndpoint`` (a connect timeout of
  :data:`CONNECT_TIMEOUT`: an unreachable node costs seconds, not minutes) for ``amqp://``; for ``amqps://``
  the same wrapped in TLS with certificate *and* hostname verification
  (``optionsForClientTLS``, service-identity).  There is no plaintext fallback:
  a TLS failure fails the attempt.
* :class:`SetUpEndpoint` -- an endpoint whose ``connect()`` succeeds only once the
  AMQP setup (handshake, declarations, consume) has completed on the new
  connection.  ``ClientService`` therefore sees a connection only when it is
  usable, backs off on failed setups (authentication refused, ...) like on refused
  connects, and never hears of a connection lost *during* setup, a case its
  state machine has no transition for (``automat.NoTransition``).  Each failed
  attempt is logged once, with the reason, by :meth:`SetUpEndpoint.connect`.
* :class:`FailoverEndpoint` -- one :class:`SetUpEndpoint` per broker node (in a
  shuffled order, so a fleet of towerws nodes spreads over the cluster):
  ``connect()`` tries them one after the other, starting with the node after
  the one last used, and fails only once every node has; ``ClientService``'s
  backoff then applies to whole passes over the list.
* :func:`retry_delays` -- exponential backoff with jitter, never above the cap.
* :func:`describe` -- one line naming why an attempt or a connection failed.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Any

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import endpoints, error, ssl
from twisted.internet.defer import CancelledError, Deferred, TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from txamqp.client import Closed
from txamqp.message import Message
from zope.interface import implementer

from towerws import pem
from towerws.twisted_internals import reconnecting_protocol

#: seconds a TCP connect may take (an unreachable host; a refused port fails at once)
CONNECT_TIMEOUT = 3.0
#: seconds from TCP connected to AMQP connection.open-ok: TLS and the AMQP handshake
#: (a frozen broker node accepts TCP connections in its kernel, then says nothing)
HANDSHAKE_TIMEOUT = 5.0
#: seconds a new connection has for everything: connect, handshake, declarations,
#: consume (which waits while the cluster still counts a hung node in: net_ticktime)
SETUP_TIMEOUT = 30.0


# -- the endpoint --------------------------------------------------------------------


def tls_options(host: str, ca_file: str | None, cert_file: str | None, key_file: str | None) -> Any:
    """Client TLS options verifying the broker's certificate and that it names ``host``."""
    return ssl.optionsForClientTLS(
        host, trustRoot=pem.trust_root(ca_file), clientCertificate=pem.client_certificate(cert_file, key_file)
    )


def broker_endpoint(
    reactor: Any,
    host: str,
    port: int,
    tls: bool,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
) -> IStreamClientEndpoint:
    tcp = endpoints.HostnameEndpoint(reactor, host, port, timeout=CONNECT_TIMEOUT)
    if not tls:
        return tcp
    return endpoints.wrapClientTLS(tls_options(host, ca_file, cert_file, key_file), tcp)


class _Gate(Protocol):
    """Sits between the transport and ClientService's protocol proxy.

    Until :meth:`open`, a lost connection is reported to the application protocol
    only (so its pending setup fails), not to ClientService.
    """

    def __init__(self, proxy: Any):
        self.proxy = proxy
        self.is_open = False
        self.lost_reason: Failure | None = None

    @property
    def protocol(self) -> Any:
        # The protocol our factory built, inside ClientService's proxy: the
        # proxy's own loss notification must not run before open().
        return reconnecting_protocol(self.proxy)

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        self.proxy.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        self.proxy.dataReceived(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if self.is_open:
            self.proxy.connectionLost(reason)
        else:
            self.lost_reason = reason
            self.protocol.connectionLost(reason)

    def open(self) -> None:
        self.is_open = True


class _GateFactory(Factory):
    noisy = False  # one "Starting factory" line per attempt would drown the one that matters

    def __init__(self, factory: IProtocolFactory):
        self.factory = factory

    def buildProtocol(self, addr: Any) -> _Gate | None:
        proxy = self.factory.buildProtocol(addr)
        return None if proxy is None else _Gate(proxy)


@implementer(IStreamClientEndpoint)
class SetUpEndpoint:
    """``connect()`` = connect ``endpoint`` + ``set_up(protocol)``; logs each failed attempt once."""

    log = Logger(namespace="towerws.amqp")

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        set_up: Callable[[Any], Awaitable[None]],
        name: str,
        clock: IReactorTime,
        timeout: float = SETUP_TIMEOUT,
    ):
        self.endpoint, self.set_up, self.name = endpoint, set_up, name
        self.clock, self.timeout = clock, timeout

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        d = Deferred.fromCoroutine(self._attempt(factory))
        # A hung TLS handshake or a broker that never answers must not stall the retries.
        d.addTimeout(self.timeout, self.clock)
        d.addErrback(self._failed)
        return d

    async def _attempt(self, factory: IProtocolFactory) -> IProtocol:
        gate: _Gate = await self.endpoint.connect(_GateFactory(factory))
        try:
            await self.set_up(gate.protocol)
        except BaseException as exc:
            if gate.lost_reason is None:
                gate.transport.abortConnection()
            elif not _broker_reply(exc) and not isinstance(exc, QueueTypeConflict):
                # The setup only saw "closed"; the transport knows why (TLS, reset, ...).
                raise AttemptFailed(gate.lost_reason.value) from exc
            raise
        gate.open()
        return gate.proxy

    def _failed(self, failure: Failure) -> Failure:
        if failure.check(CancelledError, error.ConnectingCancelledError):
            return failure  # the service is stopping: not a failed attempt
        reason = failure.value.reason if isinstance(failure.value, AttemptFailed) else failure.value
        self.log.warn("cannot connect to the broker {broker}: {reason}", broker=self.name, reason=describe(reason))
        return failure

    def __repr__(self) -> str:
        return f"<broker {self.name}>"


class QueueTypeConflict(Exception):
    """The node's queue exists with another type than ``--queue-type``; the message says the way out."""


class AttemptFailed(Exception):
    """A connection attempt failed; ``reason`` is what the transport reported."""

    def __init__(self, reason: BaseException):
        super().__init__(reason)
        self.reason = reason


@implementer(IStreamClientEndpoint)
class FailoverEndpoint:
    """``connect()`` = the first of several :class:`SetUpEndpoint` that connects and sets up.

    ``endpoints`` are in the order to try (shuffled by the caller); after a
    connection (and so after its loss) the next ``connect()`` starts with the
    endpoint after the one that worked.  Each failed attempt was logged by its
    endpoint; a whole pass that failed is logged once more (with several
    endpoints) and raises :class:`NoBrokerAvailable`, after which ClientService's
    back-off applies.
    """

    log = Logger(namespace="towerws.amqp")

    def __init__(self, endpoints: list[SetUpEndpoint]):
        if not endpoints:
            raise ValueError("no broker endpoints")
        self.endpoints = endpoints
        self._next = 0

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        return Deferred.fromCoroutine(self._connect(factory))

    async def _connect(self, factory: IProtocolFactory) -> IProtocol:
        count = len(self.endpoints)
        for step in range(count):
            index = (self._next + step) % count
            try:
                protocol = await self.endpoints[index].connect(factory)
            except (CancelledError, error.ConnectingCancelledError):
                raise  # the service is stopping
            except Exception:
                continue  # SetUpEndpoint has logged why; on to the next node
            self._next = (index + 1) % count
            return protocol
        if count > 1:
            self.log.warn("none of the {count} brokers could be used; trying again after a back-off", count=count)
        raise NoBrokerAvailable(count)

    def __repr__(self) -> str:
        return f"<brokers {', '.join(e.name for e in self.endpoints)}>"


class NoBrokerAvailable(Exception):
    """Every broker node of the list failed one attempt."""

    def __init__(self, count: int):
        super().__init__(f"none of the {count} brokers could be used")
        self.count = count


# -- retries ---------------------------------------------------------------------------


def retry_delays(
    initial: float, cap: float, factor: float = 2.0, uniform: Callable[[float, float], float] = random.uniform
) -> Callable[[int], float]:
    """``ClientService`` retry policy: attempt n waits min(cap, initial * factor**n), jittered down by up to half.

    The jitter spreads the reconnects of many nodes after a broker restart; the
    cap is a true maximum.
    """

    def delay(attempt: int) -> float:
        base = cap if attempt > 60 else min(cap, initial * factor ** (attempt - 1))
        return base * uniform(0.5, 1.0)

    return delay


# -- reasons -------------------------------------------------------------------------------


def _broker_reply(exc: BaseException) -> Message | None:
    """The ``connection.close`` / ``channel.close`` the broker answered with, if that is the cause."""
    if isinstance(exc, Closed) and exc.args and isinstance(exc.args[0], Message):
        return exc.args[0]
    if isinstance(exc, Message):
        return exc
    return None


def describe(reason: BaseException | Failure | Message | str | None) -> str:
    """One line for the operator: which stage failed, and the detail.  Never shows credentials."""
    if isinstance(reason, Failure):
        reason = reason.value
    if reason is None or isinstance(reason, str):
        return reason or "unknown reason"
    reply = _broker_reply(reason)
    if reply is not None:
        code, text = reply.reply_code, reply.reply_text
        what = {
            403: "authentication refused",
            530: "access refused",
        }.get(code, "closed by the broker" if reply.method.klass.name == "connection" else "channel closed by the broker")
        return f"{what}: {code} {text}"
    if isinstance(reason, Closed) and reason.args:
        return describe(reason.args[0])
    if isinstance(reason, AttemptFailed):
        return describe(reason.reason)
    if isinstance(reason, (NoBrokerAvailable, QueueTypeConflict)):
        return str(reason)
    if isinstance(reason, VerificationError):
        names = {_text(getattr(getattr(e, "mismatched_id", None), "hostname", "")) for e in reason.errors}
        wanted = ", ".join(sorted(n for n in names if n))
        return "TLS: the broker's certificate does not match the host name" + (f" {wanted}" if wanted else "")
    if isinstance(reason, SSL.Error):
        details = [e[2] for e in reason.args[0] if isinstance(e, tuple) and len(e) == 3] if reason.args else []
        return "TLS handshake failed: " + ("; ".join(d for d in details if d) or str(reason) or "unknown error")
    if isinstance(reason, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, error.DNSLookupError):
        return f"cannot resolve the host name ({reason})"
    if isinstance(reason, (DeferredTimeout, error.TimeoutError)):
        return "timed out"
    if isinstance(reason, error.ConnectionDone):
        return "connection closed"
    if isinstance(reason, (error.ConnectionLost, error.ConnectionAborted)):
        return "connection lost"
    if isinstance(reason, error.ConnectError):
        return f"connect failed ({reason})"
    text = str(reason)
    return f"{type(reason).__name__}: {text}" if text else type(reason).__name__


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return str(value or "")
