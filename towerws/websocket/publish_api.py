"""``POST /api/publish``: publish to websocket clients over HTTP (webhooks, scripts, curl).

Request: ``{"group": "jobs-status_changed", "payload": {...}}`` or a JSON list of
such objects, with ``Authorization: Bearer <secret>`` (the contents of
``--publish-secret-file``, compared in constant time).  Without that option the
endpoint does not exist (404).

Every item is checked before anything is published: the body must be UTF-8 JSON,
each group must be one the allowlist lets clients join (``KEY-ITEM``, canonical:
``job_events-42``, not ``job_events-042``; ``control-limit_reached_<id>`` for any
positive user id), each payload at most ``publish_max_payload`` bytes once
serialised.  The first bad item gets 400 ``{"error": "item N: ...", "item": N}``
(N counts from 0) and nothing of the request is published.  Then every message
goes to the node's bus; 202 ``{"published": N}`` is sent once all are confirmed
(by the broker, with RabbitMQ), 503 if the broker is down or did not confirm them
all in time (``{"error": ..., "confirmed": K}``: a retry may duplicate those K).
"""

from __future__ import annotations

import hmac
import json
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from towerws.messages import dumps, loads
from towerws.logs import RateLimitedLog
from towerws.subscribe import Allowlist

if TYPE_CHECKING:
    from towerws.bus import Bus
    from towerws.config import SecretFile, Settings

PATH = b"publish"
MAX_ITEMS = 1000
ITEM_FIELDS = frozenset({"group", "payload"})

log = Logger(namespace="towerws.publish_api")


class BadRequest(ValueError):
    def __init__(self, message: str, item: int | None = None):
        super().__init__(message if item is None else f"item {item}: {message}")
        self.item = item


def _show(text: str, limit: int = 64) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def parse_publish_request(data: bytes, allowlist: Allowlist, max_payload: int) -> list[tuple[str, bytes]]:
    """The (group, body) pairs of a request body; raises :class:`BadRequest` for the first problem."""
    try:
        doc = loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadRequest("request body is not UTF-8") from None
    except RecursionError:
        raise BadRequest("request body is nested too deeply") from None
    except ValueError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    items = doc if isinstance(doc, list) else [doc]
    if not items:
        raise BadRequest("expected at least one item")
    if len(items) > MAX_ITEMS:
        raise BadRequest(f"{len(items)} items: at most {MAX_ITEMS} per request")
    messages = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise BadRequest('expected an object {"group": ..., "payload": ...}', index)
        unknown = sorted(set(item) - ITEM_FIELDS)
        if unknown:
            raise BadRequest(f"unknown field {_show(unknown[0])}", index)
        group = item.get("group")
        if not isinstance(group, str):
            raise BadRequest('"group" must be a string', index)
        if "payload" not in item:
            raise BadRequest('missing "payload"', index)
        if not allowlist.publishable(group):
            raise BadRequest(f"group {_show(group)} is not allowed", index)
        try:
            body = dumps(item["payload"])
        except UnicodeEncodeError:
            raise BadRequest("payload contains an unpaired UTF-16 surrogate", index) from None
        except RecursionError:
            raise BadRequest("payload is nested too deeply", index) from None
        if len(body) > max_payload:
            raise BadRequest(f"payload is {len(body)} bytes of JSON, over the limit of {max_payload}", index)
        messages.append((group, body))
    return messages


def _respond(request: Request, code: int, obj: Any) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(obj).encode("utf-8") + b"\n"


class PublishResource(Resource):
    """The ``/api/publish`` leaf."""

    isLeaf = True

    def __init__(self, bus: "Bus", secret: "SecretFile", allowlist: Allowlist, max_payload: int,
                 clock: IReactorTime | None = None):
        super().__init__()
        if clock is None:
            from twisted.internet import reactor as clock
        self.bus = bus
        self._secret = secret.secret
        self.allowlist = allowlist
        self.max_payload = max_payload
        # A publisher retrying in a loop must not flood the log.
        self._refused_log = RateLimitedLog(log, clock)
        self._failed_log = RateLimitedLog(log, clock)

    def render(self, request: Request) -> bytes | int:
        if request.method != b"POST":
            request.setHeader(b"allow", b"POST")
            return _respond(request, 405, {"error": "use POST"})
        if not self._authorized(request):
            self._refused_log.warn("refused an HTTP publish from {peer}: missing or wrong bearer secret",
                                   peer=getattr(request.getClientAddress(), "host", "?"))
            request.setHeader(b"www-authenticate", b'Bearer realm="towerws"')
            return _respond(request, 401, {"error": "missing or wrong bearer secret"})
        request.content.seek(0)
        try:
            messages = parse_publish_request(request.content.read(), self.allowlist, self.max_payload)
        except BadRequest as exc:
            body = {"error": str(exc)} if exc.item is None else {"error": str(exc), "item": exc.item}
            return _respond(request, 400, body)
        self._publish(request, messages)
        return NOT_DONE_YET

    def _authorized(self, request: Request) -> bool:
        values = request.requestHeaders.getRawHeaders(b"authorization") or []
        if len(values) != 1:
            return False
        scheme, _, token = values[0].strip().partition(b" ")
        # compare_digest: the time taken does not depend on how much of the secret matched.
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._secret)

    def _publish(self, request: Request, messages: list[tuple[str, bytes]]) -> None:
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def done(results: list[tuple[bool, Any]]) -> None:
            errors = [result for ok, result in results if not ok]
            confirmed = len(results) - len(errors)
            if errors:
                reason = errors[0].getErrorMessage()
                self._failed_log.warn("HTTP publish of {count} messages failed ({confirmed} confirmed): {reason}",
                                      count=len(results), confirmed=confirmed, reason=reason)
                body = _respond(request, 503, {"error": f"broker unavailable: {reason}", "confirmed": confirmed})
            else:
                body = _respond(request, 202, {"published": confirmed})
            if not gone:  # the client may have hung up meanwhile; the messages are out all the same
                request.write(body)
                request.finish()

        DeferredList([self.bus.publish(group, body) for group, body in messages], consumeErrors=True).addCallback(done)


class _Folder(Resource):
    """``/api``: only its children exist."""

    def getChild(self, path: bytes, request: Request) -> IResource:
        return notFound()

    def render(self, request: Request) -> bytes:
        return notFound().render(request)


def add_publish_api(root: Resource, settings: "Settings", bus: "Bus") -> None:
    """Mount ``/api/publish`` on ``root`` if ``--publish-secret-file`` is set (else it stays 404)."""
    if settings.publish_secret_file is None:
        return
    api = _Folder()
    api.putChild(PATH, PublishResource(bus, settings.publish_secret_file, settings.groups,
                                       settings.publish_max_payload))
    root.putChild(b"api", api)
