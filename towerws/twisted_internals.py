"""Every use of Twisted beyond its documented API, in one place.

towerws relies on a few Twisted internals; each is reached only through a
function here, and ``tests/test_internals.py`` has a tripwire per function that
fails, naming the internal, when a Twisted upgrade changes it.  Twisted is
pinned in ``setup.cfg`` to the release series this was written against.

* :func:`listening_port` -- ``StreamServerEndpointService._waitingForPort``: the
  Deferred of the bound port (``tcp:0`` in tests, ``--metrics-listen``).
* :func:`forget_exit_signal` -- ``reactor._exitSignal`` (documented by
  ``_ISupportsExitSignalCapturing``): twistd re-raises the signal that stopped the
  reactor, so a node stopped by SIGTERM would exit -15 after a clean shutdown.
* :func:`reconnecting_protocol` -- ``ClientService``'s protocol proxy keeps the
  protocol our factory built in ``_protocol``.
* :func:`hand_over` -- a connection's transport is given another protocol
  (``tcp.Connection.protocol``, or ``TLSMemoryBIOProtocol.wrappedProtocol``), as
  Autobahn's ``WebSocketResource`` does.
* :class:`QuietClientService` -- ``ClientService`` logs "Scheduling retry ..."
  through its class attribute ``_log`` after every failed attempt; towerws
  logs each failure itself, with the reason, once.
* :func:`socket_of` / :func:`hold_writes` -- plain-TCP fan-out writes straight to
  the socket while the transport's buffer is empty; once the transport holds
  bytes, ``FileDescriptor.producerPaused`` makes it resume the producer when
  its buffer has drained (Twisted only sets it itself when its own buffer passes
  its threshold, ``bufferSize``, which is also the receive size).
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.application.internet import ClientService
from twisted.internet import abstract, tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocol, ITransport, _ISupportsExitSignalCapturing
from twisted.logger import LogEvent, Logger, globalLogPublisher
from twisted.protocols.policies import ProtocolWrapper

RETRY_LINE = "Scheduling retry"


def listening_port(service: Any) -> Deferred[Any]:
    """The Deferred a ``strports.service`` fires with its listening port, once bound."""
    return service._waitingForPort


def forget_exit_signal(reactor: Any) -> None:
    """A shutdown that ran to its end exits 0, whatever signal started it."""
    if _ISupportsExitSignalCapturing.providedBy(reactor):
        reactor._exitSignal = None


def reconnecting_protocol(proxy: Any) -> Any:
    """The protocol inside ``ClientService``'s ``_ReconnectingProtocolProxy`` (or ``proxy`` itself)."""
    return getattr(proxy, "_protocol", proxy)


def _without_retry_lines(event: LogEvent) -> None:
    if not str(event.get("log_format", "")).startswith(RETRY_LINE):
        globalLogPublisher(event)


class QuietClientService(ClientService):
    """``ClientService`` minus its "Scheduling retry {attempt} ..." line; everything else it logs goes on."""

    _log = Logger(observer=_without_retry_lines)


def hand_over(transport: ITransport, protocol: IProtocol) -> None:
    """Make ``protocol`` the receiver of ``transport``'s events from now on (the caller calls makeConnection)."""
    if isinstance(transport, ProtocolWrapper):  # TLS: the TLS layer is the transport
        transport.wrappedProtocol = protocol
    else:
        transport.protocol = protocol  # type: ignore[attr-defined]


def socket_of(transport: ITransport) -> socket.socket | None:
    """The socket of a plain TCP transport (``None`` for TLS and anything else)."""
    if isinstance(transport, tcp.Connection):
        return transport.getHandle()
    return None


def hold_writes(transport: ITransport) -> None:
    """The transport holds bytes now: have it call ``resumeProducing`` once it sent them all."""
    assert isinstance(transport, abstract.FileDescriptor)
    transport.producerPaused = True
