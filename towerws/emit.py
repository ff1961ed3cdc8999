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

Delivery: each publish waits for the broker's publisher confirm, so a return means the
broker accepted the message. After the broker dropped the connection the publish is
retried once on a fresh connection; if the first connection died after the broker had
already taken the message, subscribers may see it twice (at-least-once).

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
import ssl
import sys
import threading
import uuid
import weakref
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from towerws import messages
from towerws.broker_urls import DEFAULT_AMQP_URL, AMQPAddress, amqp_address, redact_url
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


def _connection_parameters(address: AMQPAddress, timeout: float) -> pika.ConnectionParameters:
    """pika's parameters for ``address``: every wait bounded by ``timeout``, one attempt."""
    tls = None
    if address.tls:
        tls = pika.SSLOptions(ssl.create_default_context(), server_hostname=address.host)
    return pika.ConnectionParameters(
        host=address.host,
        port=address.port,
        virtual_host=address.vhost,
        credentials=pika.PlainCredentials(address.username, address.password),
        ssl_options=tls,
        # Every wait in connection setup is bounded, and a broker that blocks publishers
        # (resource alarm) fails the publish instead of hanging the web request.
        socket_timeout=timeout,
        stack_timeout=timeout,
        blocked_connection_timeout=timeout,
        connection_attempts=1,
    )


# Errors meaning the connection is gone (reset, closed by the broker, heartbeat missed):
# worth one reconnect and retry. ConnectionBlockedTimeout (an AMQPConnectionError) is
# turned into EmitError first, in _publish_once: the broker is up but out of resources,
# and a retry would only double the wait.
_CONNECTION_LOST = (pika.exceptions.AMQPConnectionError, pika.exceptions.ChannelWrongStateError, OSError)

_emitters: weakref.WeakSet[Emitter] = weakref.WeakSet()


class Emitter:
    """A publisher with one lazily opened connection and channel, safe across threads and fork."""

    def __init__(self, amqp_url: str = DEFAULT_AMQP_URL, exchange: str = DEFAULT_EXCHANGE,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        try:
            messages.check_name(exchange, "exchange name")
        except (TypeError, ValueError) as exc:
            raise ValueError(f"invalid exchange name {exchange!r}: {exc}") from None
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0, not {timeout!r}")
        self.broker = redact_url(amqp_url)
        try:
            address = amqp_address(amqp_url)
        except ValueError as exc:
            raise ValueError(f"invalid AMQP URL {self.broker}: {exc}") from None
        self._password = address.password
        self._params = _connection_parameters(address, timeout)
        self.exchange = exchange
        self.timeout = timeout
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self.connection_name: str | None = None
        _emitters.add(self)

    def __repr__(self) -> str:
        return f"<Emitter {self.broker} exchange={self.exchange!r}>"

    # -- public API

    def emit(self, group: str, payload: Any) -> None:
        """Serialise ``payload`` and publish it to ``group``, waiting for the broker's confirm."""
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
        conn = self._connection
        self._drop()
        if conn is not None and conn.is_open:
            try:
                conn.close()
            except (pika.exceptions.AMQPError, OSError) as exc:
                # Best effort: the broker cleans up a dead connection itself.
                log.debug("closing the connection to %s failed: %s", self.broker, self._detail(exc))

    def _drop(self) -> None:
        self._connection = None
        self._channel = None
        self.connection_name = None

    def _detail(self, exc: BaseException) -> str:
        """Describe a pika/socket error in one line, without the password."""
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
        if len(self._password) >= 4:  # short ones would mangle ordinary words
            text = text.replace(self._password, "***")
        return f"{type(exc).__name__}: {text}".replace("\n", " ")

    def _open(self) -> BlockingChannel:
        """The channel, connecting first if needed; raises EmitError if the broker cannot be reached."""
        if self._channel is not None and self._channel.is_open:
            return self._channel
        if self._connection is None or not self._connection.is_open:
            self._drop()
            # A recognisable name (with the pid) in the broker's connection list.
            name = f"towerws-emit-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            self._params.client_properties = {"connection_name": name}
            try:
                self._connection = pika.BlockingConnection(self._params)
            except (pika.exceptions.AMQPError, OSError) as exc:
                raise EmitError(f"cannot connect to the AMQP broker {self.broker} "
                                f"(timeout {self.timeout:g} s): {self._detail(exc)}") from exc
            self.connection_name = name
        try:
            channel = self._connection.channel()
            channel.confirm_delivery()
        except (pika.exceptions.AMQPError, OSError) as exc:
            self._discard()
            raise EmitError(f"cannot open a channel on the AMQP broker {self.broker}: {self._detail(exc)}") from exc
        self._channel = channel
        return channel

    def _publish(self, group: str, body: bytes) -> None:
        with self._lock:
            self._forget_if_forked()
            reused = self._channel is not None and self._channel.is_open
            try:
                self._publish_once(group, body)
            except _CONNECTION_LOST as exc:
                self._discard()
                if not reused:
                    raise self._lost(exc) from exc
                # The broker dropped a connection that was idle since the last publish
                # (restart, forced close, missed heartbeats): one fresh try.
                log.info("connection to %s lost (%s); reconnecting", self.broker, self._detail(exc))
                try:
                    self._publish_once(group, body)
                except _CONNECTION_LOST as exc2:
                    self._discard()
                    raise self._lost(exc2) from exc2

    def _lost(self, exc: BaseException) -> EmitError:
        return EmitError(f"lost the connection to the AMQP broker {self.broker} while publishing "
                         f"to exchange '{self.exchange}': {self._detail(exc)}")

    def _publish_once(self, group: str, body: bytes) -> None:
        channel = self._open()
        props = pika.BasicProperties(content_type="application/json", delivery_mode=1)
        try:
            # mandatory=False: a group nobody subscribes to is normal, not an error.
            channel.basic_publish(self.exchange, group, body, props, mandatory=False)
        except pika.exceptions.ChannelClosedByBroker as exc:
            self._channel = None  # the connection survives a channel error
            if exc.reply_code == 404:
                raise EmitError(f"exchange '{self.exchange}' does not exist on the AMQP broker {self.broker} "
                                f"(is towerws running?)") from exc
            raise EmitError(f"the AMQP broker {self.broker} refused the message for exchange "
                            f"'{self.exchange}': {self._detail(exc)}") from exc
        except pika.exceptions.NackError as exc:
            raise EmitError(f"the AMQP broker {self.broker} refused (nacked) the message for exchange "
                            f"'{self.exchange}'") from exc
        except pika.exceptions.ConnectionBlockedTimeout as exc:
            self._drop()  # pika has closed it
            raise EmitError(f"the AMQP broker {self.broker} blocked publishing for more than "
                            f"{self.timeout:g} s (resource alarm?)") from exc


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
                        help="RabbitMQ URL (env TOWERWS_AMQP_URL; default " + DEFAULT_AMQP_URL.replace("%", "%%") + ")")
    parser.add_argument("--exchange", default=os.environ.get("TOWERWS_EXCHANGE") or DEFAULT_EXCHANGE,
                        help="exchange towerws consumes (env TOWERWS_EXCHANGE; default %(default)s)")
    parser.add_argument("--timeout", type=_positive_float, default=DEFAULT_TIMEOUT,
                        help="seconds to wait for the broker (default %(default)g)")
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
                      f"with routing key '{args.group}'", file=sys.stdout, flush=True)
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
