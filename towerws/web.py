"""HTTP on the public listener: the websocket endpoint, the optional publish API
(``/api/publish``) and console (``/console``), and 404 for everything else.

Twisted Web parses the request and hands ``/websocket`` and ``/websocket/`` over
to Autobahn (``WebSocketResource``); other endpoints (health, metrics, ...) are
plain resources beside it.  Every connection must deliver its first request
within ``open_handshake_timeout`` (:class:`HandshakeChannel`), and the access log
never shows query strings (``?token=`` is a credential).
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.resource import WebSocketResource
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, combinedLogFormatter
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from towerws.console import add_console
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


class _WithoutQuery:
    """A request as the access log sees it: without the query, where ``?token=`` travels."""

    def __init__(self, request: Request):
        self._request = request
        self.uri = request.uri.split(b"?", 1)[0]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


def access_log_line(timestamp: str, request: Request) -> str:
    return combinedLogFormatter(timestamp, _WithoutQuery(request))


class TowerSite(Site):
    protocol = HandshakeChannel  # plain HTTP/1.1: websockets need nothing else

    def __init__(self, resource: IResource, handshake_timeout: float):
        super().__init__(resource, logFormatter=access_log_line)
        self.handshake_timeout = handshake_timeout
        self.displayTracebacks = False


def make_site(factory: TowerFactory) -> Site:
    root = Root()
    # WebSocketResource is a leaf: /websocket/ and /websocket/x both reach the
    # protocol, whose onConnect answers 404 for anything but the two paths.
    root.putChild(b"websocket", WebSocketResource(factory))
    add_publish_api(root, factory.settings, factory.bus)
    add_console(root, factory.settings)
    return TowerSite(root, factory.settings.open_handshake_timeout)
