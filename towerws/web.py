"""HTTP: the websocket endpoint, the optional publish API and console, and the
operations endpoints beside them or on their own port.

Twisted Web parses the request and hands ``/websocket`` and ``/websocket/``
over to Autobahn (``WebSocketResource``).  ``/api/publish`` (with
``--publish-secret-file``) and ``/console`` (with ``--console``) sit beside it.
``/healthz``, ``/readyz`` and ``/metrics`` are plain resources: on the public
site, or (``--metrics-listen``) on a site of their own, and then only there.
Anything else is 404.  Every connection must deliver its first request within
``open_handshake_timeout`` (:class:`HandshakeChannel`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from towerws.console import add_console
from towerws.metrics import Metrics, MetricsResource
from towerws.publish_api import add_publish_api
from towerws.websocket import TowerFactory


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
    _deadline: IDelayedCall | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._deadline = self.callLater(self.site.handshake_timeout, self._too_slow)

    def allContentReceived(self) -> None:
        self._stop_deadline()
        super().allContentReceived()

    def connectionLost(self, reason: Failure) -> None:
        self._stop_deadline()
        super().connectionLost(reason)

    def _stop_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        self.transport.abortConnection()


class TowerSite(Site):
    """Plain HTTP/1.1 (websockets need nothing else), without Twisted's per-request access log.

    Handshake URLs carry tokens (``?token=``) and scrapes would flood the log;
    websocket sessions have their own access line (see ``TowerProtocol.onClose``).
    """

    protocol = HandshakeChannel

    def __init__(self, resource: IResource, handshake_timeout: float):
        super().__init__(resource)
        self.handshake_timeout = handshake_timeout
        self.displayTracebacks = False

    def log(self, request: Request) -> None:
        pass


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


def _site(children: Mapping[bytes, IResource], handshake_timeout: float) -> tuple[Root, Site]:
    root = Root()
    for name, child in children.items():
        root.putChild(name, child)
    return root, TowerSite(root, handshake_timeout)


def make_site(factory: TowerFactory, extra: Mapping[bytes, IResource] | None = None) -> Site:
    """The public site: the websocket endpoint, publish API and console as configured (and the ops endpoints, if given)."""
    # WebSocketResource is a leaf: /websocket/ and /websocket/x both reach the
    # protocol, whose onConnect answers 404 for anything but the two paths.
    root, site = _site({b"websocket": WebSocketResource(factory), **(extra or {})},
                       factory.settings.open_handshake_timeout)
    add_publish_api(root, factory.settings, factory.bus)
    add_console(root, factory.settings)
    return site


def make_ops_site(resources: Mapping[bytes, IResource], handshake_timeout: float) -> Site:
    """The ``--metrics-listen`` site: only the ops endpoints."""
    return _site(resources, handshake_timeout)[1]
