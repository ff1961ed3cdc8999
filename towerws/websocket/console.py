"""``GET /console`` (``--console``): the live console, one static page shipped as package data.

The page (``towerws/static/console.*``: HTML, vanilla JavaScript, CSS; no build
step, nothing from a CDN) polls ``/readyz``, opens ``/websocket/`` with the token
and groups an operator pastes, and shows the messages as they arrive.  Off by
default: without ``--console`` the path is 404.

The three files are read once at start-up and served from memory: no file-system
paths reach a request, so nothing else can be served from here.
"""

from __future__ import annotations

import importlib.resources
from typing import TYPE_CHECKING

from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request
from twisted.web.util import redirectTo

if TYPE_CHECKING:
    from towerws.config import Settings

FILES = {
    b"": ("console.html", b"text/html; charset=utf-8"),
    b"console.js": ("console.js", b"text/javascript; charset=utf-8"),
    b"console.css": ("console.css", b"text/css; charset=utf-8"),
}
# Everything from this node only: scripts, styles, fetch() and the websocket ('self' covers ws/wss).
POLICY = (b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
          b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class StaticFile(Resource):
    isLeaf = True

    def __init__(self, content: bytes, content_type: bytes):
        super().__init__()
        self.content = content
        self.content_type = content_type

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", self.content_type)
        request.setHeader(b"content-security-policy", POLICY)
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"cache-control", b"no-cache")
        return self.content

    render_HEAD = render_GET


class Console(Resource):
    """``/console`` redirects to ``/console/``, the page; its two assets sit beside it."""

    def __init__(self) -> None:
        super().__init__()
        folder = importlib.resources.files(__package__).joinpath("static")
        self.files = {path: StaticFile(folder.joinpath(name).read_bytes(), ctype) for path, (name, ctype) in FILES.items()}

    def getChild(self, path: bytes, request: Request) -> IResource:
        return self.files.get(path) or notFound()

    def render_GET(self, request: Request) -> bytes:
        # Relative asset URLs in the page need the trailing slash.
        return redirectTo(b"console/", request)  # relative: right behind a proxy and a path prefix too


def add_console(root: Resource, settings: "Settings") -> None:
    """Mount ``/console`` if ``--console`` is set."""
    if settings.console:
        root.putChild(b"console", Console())
