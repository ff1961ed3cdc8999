"""HTTP on the public listener: the websocket endpoint, the optional publish API
(``/api/publish``) and console (``/console``), and 404 for everything else.

Twisted Web parses the request and hands ``/websocket`` and ``/websocket/`` over
to Autobahn (``WebSocketResource``); other endpoints (health, metrics, ...) are
plain resources beside it.
"""

from __future__ import annotations

from autobahn.twisted.resource import WebSocketResource
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from towerws.console import add_console
from towerws.publish_api import add_publish_api
from towerws.websocket import TowerFactory


class Root(Resource):
    def getChild(self, path: bytes, request: Request) -> IResource:
        return notFound()


def make_site(factory: TowerFactory) -> Site:
    root = Root()
    # WebSocketResource is a leaf: /websocket/ and /websocket/x both reach the
    # protocol, whose onConnect answers 404 for anything but the two paths.
    root.putChild(b"websocket", WebSocketResource(factory))
    add_publish_api(root, factory.settings, factory.bus)
    add_console(root, factory.settings)
    site = Site(root)
    site.displayTracebacks = False
    return site
