"""HTTP: the websocket endpoint, the optional publish API and console, and the
operations endpoints beside them or on their own port.

Websocket upgrades of ``/websocket`` and ``/websocket/`` go to Autobahn
(:class:`Listener`); any other request to them is answered 426.  ``/api/publish`` (with
``--publish-secret-file``) and ``/console`` (with ``--console``) sit beside it.
``/healthz``, ``/readyz`` and ``/metrics`` are plain resources: on the public
site, or (``--metrics-listen``) on a site of their own, and then only there.
Anything else is 404.  Every connection must deliver its first request within
``open_handshake_timeout`` (:class:`HandshakeChannel`).

:class:`Listener` sits in front of the site: a connection whose first request
is a websocket upgrade of ``/websocket`` goes straight to Autobahn, which parses
the handshake itself (through Twisted Web it was parsed twice, and Twisted Web's
request machinery cost about a tenth of a handshake).  Everything else, and any
request it cannot read at a glance, is Twisted Web's.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.interfaces import IAddress, IDelayedCall
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from towerws.metrics import Metrics, MetricsResource
from towerws.twisted_internals import hand_over
from towerws.websocket.console import add_console
from towerws.websocket.protocol import SERVER, TowerFactory
from towerws.websocket.publish_api import add_publish_api

#: the most of a first request's head the Listener reads before leaving it to Twisted Web
MAX_HEAD = 16384


class Deadline:
    """Aborts ``transport`` unless :meth:`met` is called within ``seconds``."""

    def __init__(self, call_later: Callable[..., IDelayedCall], seconds: float, transport: Any):
        self._call: IDelayedCall | None = call_later(seconds, transport.abortConnection)

    def met(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


class Root(Resource):
    def getChild(self, path: bytes, request: Request) -> IResource:
        return notFound()


class HandshakeChannel(HTTPChannel):
    """HTTP/1.1 channel whose first request must be complete ``site.handshake_timeout`` seconds after connecting.

    Twisted Web's own timeout is an idle timeout, which a client trickling a byte
    at a time never reaches; and Autobahn's opening-handshake timeout only starts
    once Twisted Web has handed it the complete request.
    """

    site: "TowerSite"
    _deadline: Deadline | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._deadline = Deadline(self.callLater, self.site.handshake_timeout, self.transport)

    def allContentReceived(self) -> None:
        if self._deadline is not None:
            self._deadline.met()
        super().allContentReceived()

    def connectionLost(self, reason: Failure) -> None:
        if self._deadline is not None:
            self._deadline.met()
        super().connectionLost(reason)


class TowerRequest(Request):
    """A request answered with ``Server: towerws`` instead of Twisted Web's name and version."""

    def render(self, resrc: IResource) -> None:
        # process() has just set Twisted's Server header; nothing is written before render.
        self.setHeader(b"server", SERVER.encode("ascii"))
        super().render(resrc)


class TowerSite(Site):
    """Plain HTTP/1.1 (websockets need nothing else), without Twisted's per-request access log.

    Handshake URLs carry tokens (``?token=``) and scrapes would flood the log;
    websocket sessions have their own access line (see ``TowerProtocol.onClose``).
    """

    protocol = HandshakeChannel
    requestFactory = TowerRequest

    def __init__(self, resource: IResource, handshake_timeout: float):
        super().__init__(resource)
        self.handshake_timeout = handshake_timeout
        self.displayTracebacks = False

    def log(self, request: Request) -> None:
        pass


class UpgradeRequired(Resource):
    """``/websocket`` for anything but a websocket upgrade (which :class:`Listener` gave to Autobahn): 426."""

    def getChild(self, path: bytes, request: Request) -> IResource:
        return self if path == b"" else notFound()

    def render(self, request: Request) -> bytes:
        request.setResponseCode(426, b"Upgrade Required")  # Twisted Web knows no phrase for 426
        request.setHeader("upgrade", "websocket")
        request.setHeader("content-type", "text/plain; charset=utf-8")
        return b"towerws: this endpoint speaks websocket only (GET with Upgrade: websocket)\n"


class JSONResource(Resource):
    isLeaf = True

    def __init__(self, answer: Callable[[], tuple[int, dict[str, Any]]]):
        super().__init__()
        self._answer = answer

    def render_GET(self, request: Request) -> bytes:
        code, body = self._answer()
        request.setResponseCode(code)
        request.setHeader("content-type", "application/json")
        request.setHeader("cache-control", "no-store")
        return json.dumps(body).encode("utf-8") + b"\n"


def ops_resources(status: Callable[[], dict[str, Any]], ready: Callable[[], bool],
                  metrics: Metrics) -> dict[bytes, IResource]:
    """``/healthz`` (200 while the reactor runs), ``/readyz`` (200 only when ``ready()``), ``/metrics``."""
    return {
        b"healthz": JSONResource(lambda: (200, {"status": "ok"})),
        b"readyz": JSONResource(lambda: (200 if ready() else 503, status())),
        b"metrics": MetricsResource(metrics),
    }


def _site(children: Mapping[bytes, IResource], handshake_timeout: float) -> tuple[Root, TowerSite]:
    root = Root()
    for name, child in children.items():
        root.putChild(name, child)
    return root, TowerSite(root, handshake_timeout)


def make_site(factory: TowerFactory, extra: Mapping[bytes, IResource] | None = None) -> TowerSite:
    """The public site: the websocket endpoint, publish API and console as configured (and the ops endpoints, if given)."""
    root, site = _site({b"websocket": UpgradeRequired(), **(extra or {})}, factory.settings.open_handshake_timeout)
    add_publish_api(root, factory.settings, factory.bus)
    add_console(root, factory.settings)
    return site


def make_ops_site(resources: Mapping[bytes, IResource], handshake_timeout: float) -> Site:
    """The ``--metrics-listen`` site: only the ops endpoints."""
    return _site(resources, handshake_timeout)[1]


def is_websocket_upgrade(head: bytes) -> bool:
    """Whether a request head (up to its blank line) is ``GET /websocket[/...]`` with ``Upgrade: websocket``.

    Only a plain yes goes to Autobahn directly; anything odd is Twisted Web's to judge.
    """
    lines = head.split(b"\r\n")
    method, _, rest = lines[0].partition(b" ")
    target = rest.partition(b" ")[0]
    path = target.partition(b"?")[0]
    # /websocket/x too: Autobahn answers it 404 and counts the handshake as not_found.
    if method != b"GET" or not (path == b"/websocket" or path.startswith(b"/websocket/")):
        return False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"upgrade":
            return b"websocket" in value.lower()
    return False


class FirstRequest(Protocol):
    """Reads a connection's first request head, then hands the connection (and the bytes) over."""

    def __init__(self, listener: "Listener", addr: IAddress):
        self.listener = listener
        self.addr = addr
        self.buffer = b""
        self._deadline: Deadline | None = None

    def connectionMade(self) -> None:
        # The same bound as HandshakeChannel's: a head trickled in forever is dropped.
        self._deadline = Deadline(self.listener.clock.callLater, self.listener.site.handshake_timeout, self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end >= 0:
            upgrade = is_websocket_upgrade(self.buffer[:end])
        elif len(self.buffer) > MAX_HEAD:
            upgrade = False  # Twisted Web refuses oversized heads
        else:
            return
        self._stop_deadline()
        factory: Factory = self.listener.factory if upgrade else self.listener.site
        protocol = factory.buildProtocol(self.addr)
        transport = self.transport
        # The same hand-over as Autobahn's WebSocketResource, without the HTTP round trip.
        hand_over(transport, protocol)
        protocol.makeConnection(transport)
        protocol.dataReceived(self.buffer)

    def connectionLost(self, reason: Failure) -> None:
        self._stop_deadline()

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.met()


class Listener(Factory):
    """The public port's factory: websocket upgrades to ``factory``, all other HTTP to ``site``."""

    def __init__(self, site: TowerSite, factory: TowerFactory):
        self.site = site
        self.factory = factory
        self.clock = factory.clock

    def buildProtocol(self, addr: IAddress) -> FirstRequest:
        return FirstRequest(self, addr)

    def startFactory(self) -> None:
        self.site.doStart()
        self.factory.doStart()

    def stopFactory(self) -> None:
        self.site.doStop()
        self.factory.doStop()
