"""The websocket side: one :class:`TowerProtocol` per browser, made by :class:`TowerFactory`.

Wire protocol (compatible with the AWX UI): the handshake is checked (path,
Origin) and authenticated (``?token=``, ``Authorization``, cookies), the first
message says ``{"accept": true, "user": ID}`` or refuses with close 4401 (not
authenticated) or 1013 (try later: auth service down, too many connections);
each text message ``{"groups": {...}}`` is parsed, authorized, then replaces the
connection's subscriptions and is answered, once the new groups can receive,
with ``groups_current/joined/left``.  One message is handled at a time; over
the per-connection rate a message waits for the next token, and a newer
message supersedes one still waiting (answered ``{"error": "superseded"}``),
so the last message always takes effect.

Deliveries arrive from the hub already framed (:func:`text_frame`), wait in
the connection's outbox until the end of the reactor turn and are then written
in one piece, on plain TCP straight to the socket: one framing per message, one
write per subscriber per turn, none of Autobahn's per-send bookkeeping on the
hot path.  A client that falls more than ``max_pending_bytes`` behind is closed
with 1013 (slow consumer).
"""

from __future__ import annotations

import itertools
import json
import socket
import struct
import time
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from towerws.auth import AllowAll, Authenticator, Authorizer, AuthUnavailable, Credentials, User, origin_allowed
from towerws.bus import BrokerUnavailable, Bus
from towerws.config import Settings
from towerws.hub import Hub
from towerws.limits import TOO_MANY_CONNECTIONS, TOO_MANY_USER_CONNECTIONS, ConnectionLimits, TokenBucket
from towerws.metrics import Metrics
from towerws.subscribe import (
    AccessDenied,
    InvalidMessage,
    denied_errors,
    parse_groups_message,
    unavailable_errors,
)
from towerws.twisted_internals import hold_writes, socket_of
from towerws.websocket.autobahn_internals import RawSend, close_codes, closed_first, send_close, with_class_options

PATHS = ("/websocket", "/websocket/")
#: the Server header of every HTTP answer: no library names or versions for a scanner to match
SERVER = "towerws"

CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_UNAUTHORIZED = 4401
#: RFC 6455 7.1.5: the close frame carried no code
CLOSE_NO_STATUS = 1005
#: RFC 6455 7.1.5: no close frame at all (a dropped connection, a timeout)
CLOSE_ABNORMAL = 1006

_OPEN = WebSocketProtocol.STATE_OPEN


def text_frame(payload: bytes) -> bytes:
    """An unmasked, final websocket text frame (server -> client) carrying ``payload``."""
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x81, n)
    elif n < 65536:
        header = struct.pack("!BBH", 0x81, 126, n)
    else:
        header = struct.pack("!BBQ", 0x81, 127, n)
    return header + payload


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(", ", ": ")).encode("utf-8")


#: the answer to a groups message replaced by a newer one before it was handled
SUPERSEDED = {"error": "superseded"}
SUPERSEDED_FRAME = text_frame(_json(SUPERSEDED))


# Module-level: ``self.log`` on the protocol is Autobahn's (txaio) logger, which
# it calls at debug level on every frame; ours must not replace it.
log = Logger(namespace="towerws.websocket")


class TowerProtocol(RawSend, WebSocketServerProtocol):
    factory: "TowerFactory"

    user: User | None = None
    credentials: Credentials | None = None
    _refusal: tuple[int, str] | None = None
    #: authenticated and within the connection limits: may subscribe
    _admitted = False
    _closed = False
    #: data frames sent (deliveries and replies), for the access log
    frames_sent = 0
    #: the X-Forwarded-For of a proxied handshake (the real client behind nginx)
    forwarded_for: str | None = None

    # -- handshake -------------------------------------------------------------

    def onConnect(self, request: ConnectionRequest) -> Deferred[None]:
        if request.path not in PATHS:
            self.factory.metrics.handshakes.labels("not_found").inc()
            raise ConnectionDeny(ConnectionDeny.NOT_FOUND, "not found")
        if not origin_allowed(request.origin, request.host, self.factory.settings.allowed_origins):
            # Cross-site websocket hijacking: refused before any credential is looked at.
            self.factory.metrics.handshakes.labels("origin_refused").inc()
            log.info("refused websocket from {peer}: origin {origin} not allowed", peer=self.peer,
                     origin=request.origin[:200])
            raise ConnectionDeny(ConnectionDeny.FORBIDDEN, "origin not allowed")
        self.conn_id = next(self.factory.ids)
        self.opened_at = time.monotonic()
        self.forwarded_for = request.headers.get("x-forwarded-for")
        if self.factory.limits.full():
            # It could not be admitted anyway: spare the authentication service.
            self._refusal = (CLOSE_TRY_AGAIN_LATER, TOO_MANY_CONNECTIONS)
            return succeed(None)
        self.credentials = Credentials.from_request(request.headers, request.params)
        d = maybeDeferred(self.factory.authenticator.authenticate, self.credentials)
        d.addCallbacks(self._authenticated, self._auth_failed)
        return d

    def _authenticated(self, user: User | None) -> None:
        if user is None:
            self._refusal = (CLOSE_UNAUTHORIZED, "authentication failed")
        else:
            self.user = user

    def _auth_failed(self, failure: Failure) -> None:
        if not failure.check(AuthUnavailable):
            log.failure("authenticator failed", failure, conn=self.conn_id)
        self._refusal = (CLOSE_TRY_AGAIN_LATER, "authentication service unavailable")

    def onOpen(self) -> None:
        handshakes = self.factory.metrics.handshakes
        if self.factory.draining:
            handshakes.labels("shutting_down").inc()
            send_close(self, CLOSE_GOING_AWAY, "server shutting down")
            return
        if self._refusal is None and self.user is not None:
            over = self.factory.limits.admit(self.user.id)
            if over is None:
                handshakes.labels("accepted").inc()
                self._admit()
                return
            self._refusal = (CLOSE_TRY_AGAIN_LATER, over)
        code, reason = self._refusal or (CLOSE_UNAUTHORIZED, "authentication failed")
        if reason in (TOO_MANY_CONNECTIONS, TOO_MANY_USER_CONNECTIONS):
            handshakes.labels("too_many_connections").inc()
        else:
            handshakes.labels("auth_unavailable" if code == CLOSE_TRY_AGAIN_LATER else "unauthenticated").inc()
        log.info("refused websocket {conn} from {peer}: {reason}", conn=self.conn_id, peer=self.peer, reason=reason)
        self.send_json({"accept": False, "user": None, "close": True, "error": reason})
        send_close(self, code, reason)

    def _admit(self) -> None:
        assert self.user is not None
        self._admitted = True
        self.factory.connections.add(self)
        self._bucket = TokenBucket(self.factory.settings.max_groups_messages_per_second, self.factory.clock)
        # No log line here: the one at close tells the whole session (a line costs
        # as much as a third of a handshake at thousands of connections per second).
        self.send_json({"accept": True, "user": self.user.id})

    def go_away(self) -> None:
        """Shutdown: close 1001 (going away); well-behaved clients reconnect elsewhere."""
        # Not Autobahn's close-handshake timer (1 s): the factory's drain timer
        # drops whoever has not answered within the drain timeout.
        self.closeHandshakeTimeout = 0
        send_close(self, CLOSE_GOING_AWAY, "server shutting down")

    # -- fan-out and flow control ----------------------------------------------
    #
    # Deliveries queue in the connection's outbox; the factory flushes every
    # outbox once per reactor turn, so a client gets one write for everything
    # published to it in that turn.  On plain TCP that write goes straight to
    # the socket while Twisted holds nothing for it: no epoll registration and
    # no extra reactor turn per client.  What the kernel does not take is left
    # to the transport.
    #
    # The protocol is its transport's streaming producer: the transport pauses
    # it while its buffer is over its threshold (64 KiB; on plain TCP also as
    # soon as a direct send left bytes to it) and resumes it once the buffer is
    # empty.  Bytes queued while paused are counted; past max_pending_bytes the
    # client is a slow consumer and is closed, so a client that stops reading
    # costs at most that much memory, and nobody else waits for it.

    _paused = False
    #: bytes queued since the transport last had an empty buffer
    _backlog = 0
    #: frames waiting for the end of this reactor turn (None: nothing queued)
    _outbox: list[bytes] | None = None
    #: plain TCP: the socket written to directly while the transport's buffer is empty
    _socket: socket.socket | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._socket = socket_of(self.transport)
        self.transport.registerProducer(self, True)

    def pauseProducing(self) -> None:
        # Called on every write while the buffer is over the threshold, not just the first.
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._backlog = 0
        if self.transport.disconnecting:
            # A transport closing with a paused producer closes only once the
            # producer is gone (Twisted's doWrite resumes it instead of closing).
            self.transport.unregisterProducer()

    def stopProducing(self) -> None:
        pass  # the connection is going; onClose does the bookkeeping

    def deliver(self, frame: bytes) -> None:
        if self.state != _OPEN:
            return
        if self._paused:
            self._backlog += len(frame)
            if self._backlog > self.factory.settings.max_pending_bytes:
                self._too_slow()
                return
        self.frames_sent += 1
        if self._outbox is None:
            self._outbox = [frame]
            self.factory.flush_later(self)
        else:
            self._outbox.append(frame)

    def flush(self) -> None:
        """Write the outbox in one piece."""
        outbox, self._outbox = self._outbox, None
        if outbox is not None:
            self._write(outbox[0] if len(outbox) == 1 else b"".join(outbox))

    def _write(self, data: bytes) -> None:
        if self._socket is None or self._paused:
            self.transport.write(data)  # TLS, or bytes already wait in the transport
            return
        try:
            sent = self._socket.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            # A broken connection: the transport's own write below finds out and
            # closes it the usual way.
            sent = 0
        if sent < len(data):
            self.transport.write(data[sent:])
            # Twisted holds bytes now: nothing goes to the socket directly until
            # it has sent them all and says so (resumeProducing).
            hold_writes(self.transport)
            self._paused = True

    def send_raw(self, data: bytes) -> None:
        # Everything Autobahn sends (the handshake response, replies, pings, the
        # close frame) takes the same way, after the deliveries queued before it.
        if self._outbox is not None:
            self.flush()
        self._write(data)

    def send_json(self, obj: Any) -> None:
        if self.state == _OPEN:
            self.sendMessage(_json(obj))
            self.frames_sent += 1

    def _too_slow(self) -> None:
        self.factory.metrics.slow_client_disconnects.inc()
        log.warn(
            "websocket {conn} of user {user} from {peer} is too slow: over {limit} bytes queued; closing it (1013)",
            conn=self.conn_id,
            user=self.user.id if self.user is not None else None,
            peer=self.peer,
            limit=self.factory.settings.max_pending_bytes,
        )
        # The close frame queues behind what the client has not read; a client
        # that reads nothing never sees it, and Autobahn's close-handshake timeout
        # (closeHandshakeTimeout, 1 s) then aborts the TCP connection.
        send_close(self, CLOSE_TRY_AGAIN_LATER, "too slow: messages are queuing up")

    # -- client messages -------------------------------------------------------

    # Every groups message replaces the connection's whole subscription, so of
    # the messages a client sent, only the newest not yet handled matters.  At
    # most one message is in progress (its Tower API checks and bindings) and
    # at most one waits behind it; a newer one supersedes the waiting one.  The
    # rate limit delays the waiting message until the bucket has a token (a
    # timer on the factory's clock) instead of dropping it, so the connection
    # always ends up as its last message says, however fast the UI re-sends.

    #: a message is being handled (parsed, authorized, bound, answered)
    _busy = False
    #: the next message to handle, once nothing is in progress and the rate allows
    _waiting: bytes | None = None
    #: fires when the bucket has a token for the waiting message
    _rate_timer: IDelayedCall | None = None

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            send_close(self, CLOSE_UNSUPPORTED_DATA, "binary messages are not supported")
            return
        if not self._admitted:
            return  # a refused connection is closing; nothing it says counts
        if self._waiting is not None:
            # One answer per message, so a client that counts replies is not left
            # waiting; a pre-framed constant through the outbox, so a flood that
            # is never read is bounded (and closed) like any slow reader.
            self.factory.metrics.subscribes.labels("superseded").inc()
            self.deliver(SUPERSEDED_FRAME)
        self._waiting = payload
        self._next()

    def _next(self) -> None:
        """Handle the waiting message if nothing is in progress and the rate allows; else wait."""
        if self._busy or self._waiting is None or self._rate_timer is not None or self.state != _OPEN:
            return
        if not self._bucket.take():
            self._rate_timer = self.factory.clock.callLater(self._bucket.next_token_due(), self._rate_allows)
            return
        payload, self._waiting = self._waiting, None
        # Messages are handled strictly in order: a reply (and its bindings)
        # completes before the next groups message is looked at.
        self._busy = True
        d = ensureDeferred(self._handle(payload))
        d.addErrback(self._handler_failed)
        d.addBoth(self._handled)

    def _rate_allows(self) -> None:
        self._rate_timer = None
        self._next()

    def _handled(self, _: None) -> None:
        self._busy = False
        self._next()

    def _handler_failed(self, failure: Failure) -> None:
        log.failure("groups message of websocket {conn} failed", failure, conn=self.conn_id)
        self.send_json({"error": "internal error"})

    async def _handle(self, payload: bytes) -> None:
        assert self.user is not None and self.credentials is not None
        settings = self.factory.settings
        outcomes = self.factory.metrics.subscribes
        try:
            request = parse_groups_message(payload.decode("utf-8"), settings.groups, self.user.id)
        except (InvalidMessage, AccessDenied) as exc:
            outcomes.labels("invalid" if isinstance(exc, InvalidMessage) else "denied").inc()
            self.send_json({"error": str(exc)})
            return
        if not self.credentials.xrftoken_matches(request.xrftoken):
            # A cookie-authenticated page proves it is same-site, or nothing changes (AWX's rule).
            outcomes.labels("denied").inc()
            self.send_json({"error": "access denied to channel"})
            return
        if len(request.groups) > settings.max_groups_per_connection:
            outcomes.labels("denied").inc()
            self.send_json({"error": "too many groups"})
            return
        decision = await self.factory.authorizer.authorize(self.user, self.credentials, request.groups)
        if self._closed:
            return
        change = self.factory.hub.set_groups(self, decision.allowed)
        for error in denied_errors(request.denied + decision.denied) + unavailable_errors(decision.unavailable):
            self.send_json(error)
        try:
            await self.factory.bus.when_bound(change.joined)
        except BrokerUnavailable:
            outcomes.labels("broker_unavailable").inc()
            self.send_json({"error": "broker unavailable"})
        else:
            denied = request.denied or decision.denied or decision.unavailable
            outcomes.labels("partly_denied" if denied else "ok").inc()
        self.send_json({"groups_current": change.current, "groups_left": change.left, "groups_joined": change.joined})

    # -- teardown --------------------------------------------------------------

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self._closed:
            return
        self._closed = True
        self._outbox = None
        self._waiting = None
        if self._rate_timer is not None:
            self._rate_timer.cancel()
            self._rate_timer = None
        groups = 0
        if self._admitted:
            assert self.user is not None
            self.factory.limits.release(self.user.id)
            self.factory.connection_gone(self)
            groups = len(self.factory.hub.remove(self))
        if hasattr(self, "conn_id"):
            # The access log: one line per websocket session, whatever its outcome.
            log.info(
                "websocket {conn} closed: user {user} from {peer}, {duration_s}s, {groups} groups, "
                "{frames} frames sent, close code {code}",
                conn=self.conn_id,
                user=self.user.id if self.user is not None else None,
                peer=self.peer,
                forwarded_for=self.forwarded_for,
                duration_s=round(time.monotonic() - self.opened_at, 3),
                groups=groups,
                frames=self.frames_sent,
                code=self.wire_close_code(),
                clean=wasClean,
            )

    def wire_close_code(self) -> int:
        """The close code that ended the session on the wire, for the access log.

        Autobahn's ``onClose`` code is the received one, and 1006 whenever the
        handshake did not complete -- also when this side closed with 1003, 1007,
        1009 or 1013 and the client dropped the connection instead of answering.
        The code that matters is the one of the close frame that started the
        closing handshake: the one sent when the server started it, the one
        received when the client did (Autobahn answers that with 1000).
        """
        sent, received = close_codes(self)
        if closed_first(self):
            return sent if sent is not None else CLOSE_NO_STATUS
        if sent is not None:  # the answer to the client's close frame
            return received if received is not None else CLOSE_NO_STATUS
        return received if received is not None else CLOSE_ABNORMAL

    def __repr__(self) -> str:
        return f"<TowerProtocol {getattr(self, 'conn_id', '?')} {self.peer}>"


class TowerFactory(WebSocketServerFactory):
    protocol = TowerProtocol

    def __init__(
        self,
        settings: Settings,
        hub: Hub,
        bus: Bus,
        authenticator: Authenticator,
        authorizer: Authorizer | None = None,
        clock: IReactorTime | None = None,
        metrics: Metrics | None = None,
    ):
        super().__init__(server=SERVER)  # Autobahn's default names itself and its version
        if clock is None:
            from twisted.internet import reactor as clock
        self.settings = settings
        self.hub = hub
        self.bus = bus
        self.authenticator = authenticator
        self.authorizer: Authorizer = authorizer or AllowAll()
        self.clock = clock
        self.limits = ConnectionLimits(settings.max_connections, settings.max_connections_per_user)
        self.metrics = metrics or Metrics()
        self.connections: set[TowerProtocol] = set()
        #: set at shutdown: handshakes still completing are closed with 1001
        self.draining = False
        self._drained: list[Deferred[None]] = []
        self.ids = itertools.count(1)
        self._to_flush: list[TowerProtocol] = []
        self._flush_call: IDelayedCall | None = None
        self.setProtocolOptions(
            # Protocol violations get the standard close code on the wire (1003,
            # 1007, 1009) instead of a bare TCP drop the client sees as 1006.
            failByDrop=False,
            maxMessagePayloadSize=settings.max_message_size,
            maxFramePayloadSize=settings.max_message_size,
            autoPingInterval=settings.ping_interval,
            autoPingTimeout=settings.ping_timeout,
            openHandshakeTimeout=settings.open_handshake_timeout,
            # Origins are checked in onConnect (403); let "null" reach that check too.
            allowNullOrigin=True,
            # Only upgrades reach Autobahn (see web.Listener); should anything else,
            # it gets 426 rather than Autobahn's status page, which names its version.
            webStatus=False,
        )
        self.protocol = with_class_options(self.protocol, self)

    def flush_later(self, protocol: TowerProtocol) -> None:
        """Flush ``protocol``'s outbox at the end of this reactor turn."""
        self._to_flush.append(protocol)
        if self._flush_call is None:
            self._flush_call = self.clock.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flush_call = None
        protocols, self._to_flush = self._to_flush, []
        for protocol in protocols:
            try:
                protocol.flush()
            except Exception:
                # One broken connection must not cost the others their messages.
                log.failure("writing to websocket {conn} failed", conn=getattr(protocol, "conn_id", None))

    def connection_gone(self, protocol: TowerProtocol) -> None:
        self.connections.discard(protocol)
        if not self.connections:
            waiters, self._drained = self._drained, []
            for d in waiters:
                d.callback(None)

    def drain(self, timeout: float, clock: IReactorTime) -> Deferred[None]:
        """Shutdown: close every client with 1001; fires once all are gone.

        A client still there after ``timeout`` seconds is dropped.
        """
        self.draining = True
        if not self.connections:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._drained.append(d)
        for protocol in list(self.connections):
            protocol.go_away()

        def too_late() -> None:
            for protocol in list(self.connections):
                log.warn("websocket {conn} did not leave in time; dropping it", conn=protocol.conn_id)
                protocol.dropConnection(abort=True)
            # Aborted connections are gone for good; their onClose follows shortly.
            waiters, self._drained = self._drained, []
            for waiter in waiters:
                waiter.callback(None)

        call = clock.callLater(timeout, too_late)

        def done(result: None) -> None:
            if call.active():
                call.cancel()

        return d.addCallback(done)
