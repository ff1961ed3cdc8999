"""HTTP: the websocket endpoint, and the operations endpoints beside it or on their own port.

Twisted Web parses the request and hands ``/websocket`` and ``/websocket/``
over to Autobahn (``WebSocketResource``).  ``/healthz``, ``/readyz`` and
``/metrics`` are plain resources: on the public site, or (``--metrics-listen``)
on a site of their own, and then only there.  Anything else is 404.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from towerws.metrics import Metrics, MetricsResource
from towerws.websocket import TowerFactory


class Root(Resource):
    def getChild(self, path: bytes, request: Request) -> IResource:
        return notFound()


class QuietSite(Site):
    """A Site without Twisted's per-request access log.

    Handshake URLs carry tokens (``?token=``) and scrapes would flood the log;
    websocket sessions have their own access line (see ``TowerProtocol.onClose``).
    """

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


def _site(children: Mapping[bytes, IResource]) -> Site:
    root = Root()
    for name, child in children.items():
        root.putChild(name, child)
    site = QuietSite(root)
    site.displayTracebacks = False
    return site


def make_site(factory: TowerFactory, extra: Mapping[bytes, IResource] | None = None) -> Site:
    """The public site: the websocket endpoint (and the ops endpoints, if given)."""
    # WebSocketResource is a leaf: /websocket/ and /websocket/x both reach the
    # protocol, whose onConnect answers 404 for anything but the two paths.
    return _site({b"websocket": WebSocketResource(factory), **(extra or {})})


def make_ops_site(resources: Mapping[bytes, IResource]) -> Site:
    """The ``--metrics-listen`` site: only the ops endpoints."""
    return _site(resources)
