"""Publish live updates to towerws from synchronous code (Django/uWSGI) and from the shell.

The AMQP contract: a durable exchange (default ``towerws``, direct or topic, declared by the
towerws server at its start; publishers never declare it), routing key = group name,
body = UTF-8 JSON, content type ``application/json``.

Library use (same name and arguments AWX calls)::

    from towerws.emit import emit_channel_notification
    emit_channel_notification("jobs-status_changed", {"unified_job_id": 42, "status": "running"})

Configuration: :func:`configure`, otherwise the environment variables ``TOWERWS_AMQP_URL``
(default ``amqp://guest:guest@localhost:5672/%2F``) and ``TOWERWS_EXCHANGE`` (default
``towerws``), read when the process-wide emitter is first used.

Serialisation follows Django's ``DjangoJSONEncoder``: datetimes are ISO 8601 with
microseconds truncated to milliseconds and ``+00:00`` written ``Z``; dates and naive times
are ISO 8601 (times truncated to milliseconds; aware times are refused); a ``timedelta``
is an ISO 8601 duration in Django's format, e.g. ``P1DT02H03M04.500000S``; ``Decimal``
and ``UUID`` are strings. NaN and infinities are refused (browsers' ``JSON.parse``
cannot read them). Anything that cannot be serialised raises ``TypeError`` before any I/O.

Brokers: ``TOWERWS_AMQP_URL`` / ``--amqp-url`` is one URL or a comma-separated list, one per
node of a RabbitMQ cluster, as the server's ``--amqp-url``. The emitter connects to one node
(in a random order, so a fleet of processes spreads over the cluster) and keeps that
connection.

Delivery: each publish waits for a publisher confirm, so a return means a node of the
cluster accepted the message. A connection that is lost (before or while publishing), a
node that cannot be reached or does not answer within a couple of seconds
(:data:`ATTEMPT_TIMEOUT`), or a broker that refuses (nacks) the message: the message is
sent again, on the next node, until one confirms it
or the ``timeout`` (the whole budget of one publish) is spent; only then does the caller
get :class:`EmitError`. If a connection died after the broker had already taken the
message, subscribers may see it twice (at-least-once). A missing exchange, a refused
permission and a resource alarm fail at once: every node of a cluster would answer the same.

Command line::

    towerws-publish [--amqp-url URL] [--exchange NAME] [--timeout S] [-v] GROUP [PAYLOAD|-]

``PAYLOAD`` (a JSON text) is published byte for byte. Without it, or with ``-``, stdin is
read to its end: one JSON document per non-empty line. Every line is validated before the
first one is published, so invalid input publishes nothing; the valid lines are then
published in order, each exactly as read minus its line terminator.
"""

from __future__ import annotations

import argparse
import datetime
import decimal
import json
import logging
import os
import random
import ssl
import sys
import threading
import time
import uuid
import weakref
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.adapters.utils.connection_workflow import AMQPConnectorException

from towerws import messages
from towerws.pika_internals import Blocked, Watchdog
from towerws.broker_urls import DEFAULT_AMQP_URL, AMQPAddress, brokers, redact_url
from towerws.messages import check_group as _check_group

__all__ = ["DEFAULT_AMQP_URL", "DEFAULT_EXCHANGE", "DEFAULT_TIMEOUT", "EmitError", "Emitter",
           "TowerJSONEncoder", "configure", "dumps", "emit_channel_notification", "main", "redact_url"]

log = logging.getLogger(__name__)

DEFAULT_EXCHANGE = "towerws"
DEFAULT_TIMEOUT = 5.0


class EmitError(Exception):
    """The broker could not be reached in time or refused the message."""


# -- serialisation -------------------------------------------------------------------------


def _duration_iso_string(duration: datetime.timedelta) -> str:
    """Django's ``duration_iso_string``: ``[-]P<d>DT<hh>H<mm>M<ss>[.ffffff]S``."""
    sign = ""
    if duration < datetime.timedelta(0):
        sign = "-"
        duration = -duration
    minutes, seconds = divmod(duration.seconds, 60)
    hours, minutes = divmod(minutes, 60)
    fraction = f".{duration.microseconds:06d}" if duration.microseconds else ""
    return f"{sign}P{duration.days}DT{hours:02d}H{minutes:02d}M{seconds:02d}{fraction}S"


class TowerJSONEncoder(json.JSONEncoder):
    """JSON encoder compatible with Django's ``DjangoJSONEncoder`` for the types AWX emits."""

    def default(self, o: Any) -> Any:
        """Encode dates, times, durations, decimals and UUIDs as Django does."""
        # datetime before date: datetime is a subclass of date.
        if isinstance(o, datetime.datetime):
            text = o.isoformat()
            if o.microsecond:
                text = text[:23] + text[26:]  # milliseconds, as JavaScript's Date
            if text.endswith("+00:00"):
                text = text[:-6] + "Z"
            return text
        if isinstance(o, datetime.date):
            return o.isoformat()
        if isinstance(o, datetime.time):
            if o.utcoffset() is not None:
                raise TypeError("JSON can't represent timezone-aware times.")
            text = o.isoformat()
            return text[:12] if o.microsecond else text
        if isinstance(o, datetime.timedelta):
            return _duration_iso_string(o)
        if isinstance(o, (decimal.Decimal, uuid.UUID)):
            return str(o)
        return super().default(o)


def dumps(payload: Any) -> bytes:
    """Serialise ``payload`` to compact UTF-8 JSON; raises TypeError if it cannot be."""
    try:
        text = json.dumps(payload, cls=TowerJSONEncoder, separators=(",", ":"), allow_nan=False)
    except ValueError as exc:  # NaN/Infinity, circular reference: a payload problem, like a bad type
        raise TypeError(f"payload is not JSON serialisable: {exc}") from exc
    return text.encode("utf-8")


# -- the emitter -----------------------------------------------------------------------------

#: seconds one try may take (connect, or open a channel and wait for the confirm): an
#: unreachable or hung node costs at most this much of a publish's budget, then the next
#: node is tried.  A refused port costs ~10 ms; a blackholed address or a node that accepts
#: TCP and says nothing costs this.
ATTEMPT_TIMEOUT = 2.0
#: seconds before a message the broker refused (nack) is sent again (on the next node)
RETRY_PAUSE = 0.2
#: the pause after a failed pass over every node doubles from this up to MAX_PASS_PAUSE
FIRST_PASS_PAUSE = 0.1
MAX_PASS_PAUSE = 1.0
#: no new try in the last seconds of a publish's budget: it could not finish
LAST_TRY_MARGIN = 0.05


def _connection_parameters(address: AMQPAddress, attempt: float, blocked: float) -> pika.ConnectionParameters:
    """pika's parameters for ``address``: connection setup bounded by ``attempt``, one attempt."""
    tls = None
    if address.tls:
        tls = pika.SSLOptions(ssl.create_default_context(), server_hostname=address.host)
    return pika.ConnectionParameters(
        host=address.host,
        port=address.port,
        virtual_host=address.vhost,
        credentials=pika.PlainCredentials(address.username, address.password),
        ssl_options=tls,
        # socket_timeout bounds the TCP connect (what an unreachable host costs),
        # stack_timeout the whole setup (TLS, AMQP handshake) of a node that accepts
        # and then says nothing.  A connection blocked for longer than ``blocked``
        # (resource alarm) is closed by pika, so a later publish starts afresh.
        socket_timeout=attempt,
        stack_timeout=attempt,
        blocked_connection_timeout=blocked,
        connection_attempts=1,
    )


# Errors meaning the connection is gone (reset, closed by the broker, heartbeat missed,
# no answer in time): the message is sent again, on the next node.
# ConnectionBlockedTimeout (an AMQPConnectionError) is turned into EmitError first, in
# _publish_once: a resource alarm blocks publishers on every node of a RabbitMQ
# cluster, so another node would only make the caller wait longer.
_CONNECTION_LOST = (pika.exceptions.AMQPConnectionError, pika.exceptions.ChannelWrongStateError, OSError)

#: channel.close reply codes that are the cluster's definite answer for this exchange
#: (404 NOT_FOUND: it does not exist; 403 ACCESS_REFUSED: no write permission).  Exchanges
#: and permissions are cluster-wide, so every node would say the same: fail at once.
_REFUSED_FOR_GOOD = (403, 404)

_emitters: weakref.WeakSet[Emitter] = weakref.WeakSet()


class _Retry(Exception):
    """One try failed in a way another try may fix; ``reason`` is one line without a password."""

    def __init__(self, reason: str, *, pause: float = 0.0) -> None:
        super().__init__(reason)
        self.reason = reason
        #: seconds to wait before the next try
        self.pause = pause


class Emitter:
    """A publisher with one lazily opened connection to one node of a list, safe across threads and fork.

    ``amqp_url`` is one broker URL or a comma-separated list, one per node of a RabbitMQ
    cluster (:func:`towerws.broker_urls.brokers`).  The nodes are tried in a random order
    (so a fleet of processes spreads over the cluster), the next one after a failure.
    ``timeout`` is each publish's whole budget: it returns once a node confirmed the
    message, trying node after node until then, and raises :class:`EmitError` only
    when no node confirmed within ``timeout`` seconds (or the cluster refused the
    message for good: a missing exchange, no permission, a resource alarm).
    """

    def __init__(self, amqp_url: str = DEFAULT_AMQP_URL, exchange: str = DEFAULT_EXCHANGE,
                 timeout: float = DEFAULT_TIMEOUT, rng: random.Random | None = None) -> None:
        try:
            messages.check_name(exchange, "exchange name")
        except (TypeError, ValueError) as exc:
            raise ValueError(f"invalid exchange name {exchange!r}: {exc}") from None
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0, not {timeout!r}")
        try:
            nodes = brokers(amqp_url)
        except ValueError as exc:
            # brokers() never quotes a URL; redact_url shows a single one without its password.
            where = "" if "," in amqp_url else f" {redact_url(amqp_url)}"
            raise ValueError(f"invalid AMQP URL{where}: {exc}") from None
        #: every node, without passwords (for messages)
        self.broker = str(nodes)
        self._nodes = nodes.shuffled(rng)
        self._index = 0  # the node to connect to next (or connected to)
        self._passwords = [a.password for a in nodes if len(a.password) >= 4]  # short ones would mangle words
        self.exchange = exchange
        self.timeout = timeout
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._blocked: Blocked | None = None
        self.connection_name: str | None = None
        #: the node of the open connection (None while there is none)
        self.address: AMQPAddress | None = None
        _emitters.add(self)

    def __repr__(self) -> str:
        return f"<Emitter {self.broker} exchange={self.exchange!r}>"

    @property
    def node(self) -> str | None:
        """``host:port`` of the node of the open connection (None while there is none)."""
        return self.address.node if self.address is not None else None

    # -- public API

    def emit(self, group: str, payload: Any) -> None:
        """Serialise ``payload`` and publish it to ``group``, waiting for a node's confirm."""
        _check_group(group)
        self._publish(group, dumps(payload))

    def emit_raw(self, group: str, body: bytes) -> None:
        """Publish ``body`` (UTF-8 RFC 8259 JSON, checked before any I/O) to ``group`` as is."""
        messages.check_message(group, body)
        self._publish(group, body)

    def close(self) -> None:
        """Close the connection (a no-op if none is open); the next publish reopens one."""
        with self._lock:
            self._forget_if_forked()
            self._discard()

    # -- internals

    def _after_fork_in_child(self) -> None:
        """In a forked child: a fresh lock (another parent thread may have held it) and no connection."""
        self._lock = threading.Lock()
        self._forget_if_forked()

    def _forget_if_forked(self) -> None:
        if self._pid != os.getpid():
            # The socket is shared with the parent: closing the connection would send
            # Connection.Close on the parent's behalf. Only drop our references; the
            # inherited fd is closed by the garbage collector, which the parent never notices.
            self._drop()
            self._pid = os.getpid()

    def _discard(self) -> None:
        """Forget the connection, closing it first if pika still thinks it is open."""
        conn, address = self._connection, self.address
        self._drop()
        if conn is not None and conn.is_open:
            try:
                conn.close()
            except (pika.exceptions.AMQPError, OSError) as exc:
                # Best effort: the broker cleans up a dead connection itself.
                log.debug("closing the connection to %s failed: %s", address, self._detail(exc))

    def _drop(self) -> None:
        self._connection = None
        self._channel = None
        self._blocked = None
        self.connection_name = None
        self.address = None

    def _detail(self, exc: BaseException) -> str:
        """Describe a pika/socket error in one line, without a password."""
        # pika wraps the socket error twice: AMQPConnectionError(AMQPConnector...Error(exception=OSError)).
        for _ in range(3):
            inner = exc.args[0] if len(exc.args) == 1 else None
            inner = getattr(inner, "exception", inner)
            if not isinstance(inner, BaseException):
                break
            exc = inner
        if isinstance(exc, (pika.exceptions.ConnectionClosed, pika.exceptions.ChannelClosed)):
            text = f"{exc.reply_code} {exc.reply_text}"
        elif isinstance(exc, OSError) and exc.strerror:
            text = exc.strerror
        else:
            text = str(exc) or repr(exc)
        for password in self._passwords:
            text = text.replace(password, "***")
        return f"{type(exc).__name__}: {text}".replace("\n", " ")

    def _connect(self, seconds: float) -> pika.BlockingConnection:
        """The connection, opening one to the current node first (within ``seconds``) if needed."""
        if self._connection is not None and self._connection.is_open:
            return self._connection
        self._drop()
        address = self._nodes[self._index]
        # A recognisable name (with the pid) in the broker's connection list.
        name = f"towerws-emit-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        params = _connection_parameters(address, seconds, self.timeout)
        params.client_properties = {"connection_name": name}
        try:
            connection = pika.BlockingConnection(params)
        except (pika.exceptions.AMQPError, AMQPConnectorException, OSError) as exc:
            # pika raises its connector's own errors (a stack timeout) as they are.
            raise _Retry(f"cannot connect ({self._detail(exc)})") from exc
        self._connection, self._blocked = connection, Blocked(connection)
        self.connection_name, self.address = name, address
        return connection

    def _publish(self, group: str, body: bytes) -> None:
        with self._lock:
            self._forget_if_forked()
            clock = time.monotonic
            deadline = clock() + self.timeout
            why: dict[str, str] = {}  # node -> why its last try failed, for the error
            failed_connects = 0  # since the last working connection: a whole pass failed -> pause
            pause = FIRST_PASS_PAUSE
            while True:
                reused = self._connection is not None and self._connection.is_open
                node = self._nodes[self._index]
                try:
                    self._publish_once(group, body, deadline)
                    return
                except _Retry as exc:
                    why[str(node)] = exc.reason
                    retry = exc
                self._discard()
                # The next node: after a connection that had worked (lost while idle)
                # at once, after a whole pass of failed ones a pause.
                self._index = (self._index + 1) % len(self._nodes)
                wait = retry.pause
                if not reused:
                    failed_connects += 1
                    if failed_connects % len(self._nodes) == 0:
                        wait, pause = max(wait, pause), min(MAX_PASS_PAUSE, pause * 2)
                # A last try just before the deadline rather than none after it.
                remaining = deadline - clock() - LAST_TRY_MARGIN
                wait = min(wait, remaining)
                if remaining <= 0:
                    details = "; ".join(f"{n}: {reason}" for n, reason in why.items())
                    raise EmitError(f"no AMQP broker node confirmed the message for exchange '{self.exchange}' "
                                    f"within {self.timeout:g} s ({details})") from retry.__cause__
                log.info("publishing via %s failed: %s; reconnecting to %s", node, retry.reason,
                         self._nodes[self._index])
                if wait:
                    # A backoff between tries, not a synchronisation: nothing to wait for.
                    time.sleep(wait)

    def _publish_once(self, group: str, body: bytes, deadline: float) -> None:
        """One try on the current node, bounded by ATTEMPT_TIMEOUT and ``deadline``."""
        def seconds() -> float:
            return max(0.001, min(ATTEMPT_TIMEOUT, deadline - time.monotonic()))

        connection = self._connect(seconds())
        assert self._blocked is not None
        address = self.address
        # Opening the channel and the confirm wait have no time limit in pika: the watchdog's.
        watchdog = Watchdog(connection, seconds(), self._blocked)
        try:
            channel = self._channel
            if channel is None or not channel.is_open:
                self._channel = None
                channel = connection.channel()
                channel.confirm_delivery()
                self._channel = channel
            props = pika.BasicProperties(content_type="application/json", delivery_mode=1)
            # mandatory=False: a group nobody subscribes to is normal, not an error.
            channel.basic_publish(self.exchange, group, body, props, mandatory=False)
        except pika.exceptions.ChannelClosedByBroker as exc:
            self._channel = None  # the connection survives a channel error
            if exc.reply_code == 404:
                raise EmitError(f"exchange '{self.exchange}' does not exist on the AMQP broker {address} "
                                f"(is towerws running?)") from exc
            if exc.reply_code in _REFUSED_FOR_GOOD:
                raise EmitError(f"the AMQP broker {address} refused the message for exchange "
                                f"'{self.exchange}': {self._detail(exc)}") from exc
            raise _Retry(f"channel closed ({self._detail(exc)})") from exc
        except pika.exceptions.NackError as exc:
            # Again on a new connection (the next node), a moment later: a channel whose
            # quorum queue's leader died can go on nacking for as long as it lives
            # (RabbitMQ 3.10: 10 s and more, measured); a new channel finds the new leader.
            raise _Retry(f"refused (nacked) the message for exchange '{self.exchange}'", pause=RETRY_PAUSE) from exc
        except pika.exceptions.ConnectionBlockedTimeout as exc:
            self._drop()  # pika has closed it
            raise EmitError(f"the AMQP broker {address} blocked publishing (resource alarm?); a resource "
                            f"alarm blocks publishers on every node of a cluster") from exc
        except _CONNECTION_LOST as exc:
            raise _Retry(f"lost the connection ({self._detail(exc)})") from exc
        finally:
            watchdog.disarm()


def _after_fork_in_child() -> None:
    global _default_lock
    _default_lock = threading.Lock()
    for emitter in list(_emitters):
        emitter._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


# -- the process-wide emitter ---------------------------------------------------------------

_default: Emitter | None = None
_default_lock = threading.Lock()
_settings: dict[str, Any] = {}


def configure(amqp_url: str | None = None, exchange: str | None = None, timeout: float | None = None) -> None:
    """Set the process-wide emitter's settings; ``None`` means environment variable or default.

    Each call replaces all three settings and closes the current connection; the next
    :func:`emit_channel_notification` connects with the new settings.
    """
    global _default
    with _default_lock:
        old, _default = _default, None
        _settings.clear()
        _settings.update(amqp_url=amqp_url, exchange=exchange, timeout=timeout)
    if old is not None:
        old.close()


def _get_default() -> Emitter:
    global _default
    with _default_lock:
        if _default is None:
            timeout = _settings.get("timeout")
            _default = Emitter(
                _settings.get("amqp_url") or os.environ.get("TOWERWS_AMQP_URL") or DEFAULT_AMQP_URL,
                _settings.get("exchange") or os.environ.get("TOWERWS_EXCHANGE") or DEFAULT_EXCHANGE,
                DEFAULT_TIMEOUT if timeout is None else timeout,
            )
        return _default


def emit_channel_notification(group: str, payload: Any) -> None:
    """Publish ``payload`` as JSON to the websocket clients subscribed to ``group``.

    Raises ValueError for an invalid group, TypeError for a payload that cannot be
    serialised (both before any I/O), EmitError if the broker is unreachable or refuses.
    """
    _check_group(group)
    body = dumps(payload)
    _get_default()._publish(group, body)


# -- command line ------------------------------------------------------------------------------

PROG = "towerws-publish"


class _InvalidJSON(Exception):
    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"invalid JSON on line {line}: {reason}")


def _validate(raw: bytes, line: int) -> None:
    """Raise _InvalidJSON unless ``raw`` is one UTF-8 JSON document (strict: no NaN/Infinity)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _InvalidJSON(line, f"not UTF-8 (byte {exc.start + 1})") from exc
    try:
        messages.loads(text)
    except json.JSONDecodeError as exc:
        # For a multi-line PAYLOAD argument the decoder's own line number is the useful one.
        raise _InvalidJSON(line + exc.lineno - 1, f"{exc.msg} (column {exc.colno})") from exc
    except ValueError as exc:  # NaN, Infinity
        raise _InvalidJSON(line, str(exc)) from exc
    except RecursionError:
        raise _InvalidJSON(line, "nested too deeply") from None


def _read_stream(data: bytes) -> list[bytes]:
    """Split stdin into validated bodies: one per non-blank line, line terminator removed."""
    bodies = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line.strip():
            continue
        _validate(line, number)
        bodies.append(line)
    return bodies


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Publish JSON messages to towerws websocket clients subscribed to GROUP.",
        epilog="Without PAYLOAD, or with '-', stdin is read to its end: one JSON document per "
               "non-empty line. All lines are validated before any is published, so invalid input "
               "publishes nothing. Exit status: 0 published, 1 broker unreachable or refused, "
               "2 invalid arguments or JSON.")
    parser.add_argument("--amqp-url", default=os.environ.get("TOWERWS_AMQP_URL") or DEFAULT_AMQP_URL,
                        help="RabbitMQ URL, or a comma-separated list of URLs, one per node of a cluster: "
                             "a message is sent again to the next node until one confirms it "
                             "(env TOWERWS_AMQP_URL; default " + DEFAULT_AMQP_URL.replace("%", "%%") + ")")
    parser.add_argument("--exchange", default=os.environ.get("TOWERWS_EXCHANGE") or DEFAULT_EXCHANGE,
                        help="exchange towerws consumes (env TOWERWS_EXCHANGE; default %(default)s)")
    parser.add_argument("--timeout", type=_positive_float, default=DEFAULT_TIMEOUT,
                        help="seconds one message may take until a broker node confirms it (default %(default)g)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print one line per published message")
    parser.add_argument("group", metavar="GROUP", help="group name = routing key, e.g. jobs-status_changed")
    parser.add_argument("payload", metavar="PAYLOAD", nargs="?", default="-",
                        help="JSON text to publish, or '-' (default) for stdin")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``towerws-publish``; returns the exit status."""
    args = _parser().parse_args(argv)
    # pika logs connection failures itself; with no logging configured Python would print
    # them to stderr, and this command's errors are exactly one line.
    for name in ("pika", __name__):
        logging.getLogger(name).addHandler(logging.NullHandler())
        logging.getLogger(name).propagate = False

    def fail(status: int, message: str) -> int:
        sys.stderr.write(f"{PROG}: {message}\n")
        return status

    try:
        _check_group(args.group)
    except ValueError as exc:
        return fail(2, f"invalid GROUP: {exc}")
    try:
        if args.payload == "-":
            bodies = _read_stream(sys.stdin.buffer.read())
        else:
            # The bytes exactly as typed (argv is decoded with surrogateescape).
            body = os.fsencode(args.payload)
            _validate(body, 1)
            bodies = [body]
    except _InvalidJSON as exc:
        return fail(2, str(exc))
    try:
        emitter = Emitter(args.amqp_url, args.exchange, args.timeout)
    except ValueError as exc:
        return fail(2, str(exc))

    published = 0
    try:
        for body in bodies:
            emitter.emit_raw(args.group, body)
            published += 1
            if args.verbose:
                print(f"published {len(body)} bytes to exchange '{emitter.exchange}' "
                      f"with routing key '{args.group}' via {emitter.node}", file=sys.stdout, flush=True)
    except EmitError as exc:
        progress = f" ({published} of {len(bodies)} messages were published)" if len(bodies) > 1 else ""
        return fail(1, f"{exc}{progress}")
    except KeyboardInterrupt:
        return fail(130, f"interrupted ({published} of {len(bodies)} messages were published)")
    finally:
        emitter.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
