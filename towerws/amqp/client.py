"""The broker connection's protocol: a txAMQP client with a fast path for deliveries.

:class:`BrokerProtocol` reads frames itself: ``basic.deliver`` + content header +
body frames on the consuming channel (:data:`CHANNEL`) are cut straight out of
the buffer (no generic codec, no Deferred per message) and acknowledged in one
``multiple`` ack per read; every other frame takes txAMQP's generic path.
:class:`BrokerDelegate` names the connection for the broker's admin tools, asks
for the notices towerws acts on, and settles publisher confirms.

Used by the node's consumer (:mod:`towerws.amqp.service`) and by the Twisted
publisher (:mod:`towerws.amqp.publisher`), which never consumes.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from towerws.amqp.confirms import ConfirmDelegate
from towerws.amqp.endpoint import describe
from towerws.amqp.spec import load_spec
from towerws.amqp.txamqp_internals import ClientBase

#: the consuming channel (deliveries take the fast path only here)
CHANNEL = 1
#: the node's confirm-mode publishing channel
PUBLISH_CHANNEL = 2
#: channels the queue's bind/unbind operations are spread over
BINDING_CHANNELS = (3, 4, 5, 6)
#: a short-lived channel: do the exchange and the node's queue exist already?
PROBE_CHANNEL = 7
FRAME_END = 0xCE
_HEADER = struct.Struct("!BHI")
_U64 = struct.Struct("!Q")
_DELIVER = b"\x00\x3c\x00\x3c"  # class 60 (basic), method 60 (deliver)


def ack_frame(channel: int, delivery_tag: int) -> bytes:
    """``basic.ack`` with ``multiple=true``: everything up to ``delivery_tag``."""
    return _HEADER.pack(1, channel, 13) + struct.pack("!HHQB", 60, 80, delivery_tag, 1) + b"\xce"


class BrokerDelegate(ConfirmDelegate):
    """Names the connection for the broker's admin tools, asks for the two notices we act on,
    and settles publisher confirms (:mod:`towerws.confirms`)."""

    def __init__(self, connection_name: str):
        super().__init__()
        self.properties = {
            "product": "towerws",
            "connection_name": connection_name,
            # authentication_failure_close: a refused login gets a connection.close
            # saying so (otherwise RabbitMQ just drops the socket);
            # consumer_cancel_notify: a deleted queue gets a basic.cancel (otherwise
            # consumption would silently stop).
            "capabilities": {"authentication_failure_close": True, "consumer_cancel_notify": True},
        }

    def connection_start(self, ch: Any, msg: Any) -> None:
        ch.connection_start_ok(
            client_properties=self.properties,
            mechanism=self.client.mechanism,
            response=self.client.response,
            locale=self.client.locale,
        )

    def basic_cancel(self, ch: Any, msg: Any) -> None:
        # The queue is gone (deleted by hand, or a broker node failed): a new
        # connection declares it again and re-binds.
        self.client.drop("the broker cancelled the consumer (queue deleted?)")


class BrokerProtocol(ClientBase):
    """txAMQP client with a fast path for ``basic.deliver`` on :data:`CHANNEL`."""

    log = Logger()
    #: set once ``basic.consume`` is sent; until then every frame takes the generic path
    consuming = False
    #: set at shutdown once the clients are gone: deliveries still arriving are
    #: neither handed on nor acknowledged, so closing the channel requeues them
    holding = False

    def __init__(
        self,
        on_delivery: Callable[[str, bytes, float], None],
        vhost: str,
        heartbeat: int,
        clock: IReactorTime,
        connection_name: str = "towerws",
    ):
        super().__init__(BrokerDelegate(connection_name), vhost, load_spec(), heartbeat=heartbeat, clock=clock)
        self.on_delivery = on_delivery
        #: fires with the reason (for the log) when the connection is gone
        self.lost: Deferred[object] = Deferred()
        self._close_reason: object = None
        self._buffer = bytearray()
        self._delivery: list[Any] | None = None  # [tag, routing key, size, received, chunks]
        self._last_tag = 0
        self._acked_tag = 0

    def dataReceived(self, data: bytes) -> None:
        # Start of the AMQP-receive-to-write latency of every message in this read.
        self._read_started = time.perf_counter()
        buf = self._buffer
        buf += data
        pos, size = 0, len(buf)
        try:
            while size - pos > 7:
                ftype, channel, length = _HEADER.unpack_from(buf, pos)
                end = pos + 7 + length
                if end >= size:
                    break
                if buf[end] != FRAME_END:
                    raise ValueError(f"frame end octet is {buf[end]:#x}")
                if not (self.consuming and channel == CHANNEL and self._fast_path(ftype, buf, pos + 7, end)):
                    self.handle_frame(bytes(buf[pos : end + 1]))
                pos = end + 1
        except Exception:
            # A frame we cannot read leaves the stream unusable: drop the connection
            # (ClientService reconnects); unacknowledged deliveries are redelivered.
            self.log.failure("unreadable AMQP frame from the broker; reconnecting")
            self.drop("unreadable frame")
            return
        finally:
            del buf[:pos]
        if self._last_tag != self._acked_tag:
            self._acked_tag = self._last_tag
            self.transport.write(ack_frame(CHANNEL, self._last_tag))
        if pos:
            self.traffic_seen()

    def _fast_path(self, ftype: int, buf: bytearray, start: int, end: int) -> bool:
        if ftype == 1:
            if buf[start : start + 4] != _DELIVER:
                return False
            p = start + 4
            p += 1 + buf[p]  # consumer tag
            (tag,) = _U64.unpack_from(buf, p)
            p += 9  # delivery tag, redelivered bit
            p += 1 + buf[p]  # exchange
            key = bytes(buf[p + 1 : p + 1 + buf[p]]).decode("utf-8", "replace")
            self._delivery = [tag, key, None, 0, []]
            return True
        delivery = self._delivery
        if delivery is None:
            return False
        if ftype == 2:
            # class-id, weight, then the body size; properties are not needed.
            (delivery[2],) = _U64.unpack_from(buf, start + 4)
        elif ftype == 3:
            chunk = bytes(buf[start:end])
            delivery[3] += len(chunk)
            delivery[4].append(chunk)
        else:
            return False
        if delivery[2] is not None and delivery[3] >= delivery[2]:
            self._delivery = None
            if self.holding:
                return True
            self._last_tag = delivery[0]
            body = delivery[4][0] if len(delivery[4]) == 1 else b"".join(delivery[4])
            self.on_delivery(delivery[1], body, self._read_started)
        return True

    def on_close(self, reason: object) -> None:
        # The broker's connection.close (e.g. 320 CONNECTION_FORCED) says more than the TCP close after it.
        if self._close_reason is None:
            self._close_reason = reason

    def on_heartbeat_missed(self) -> None:
        self._close_reason = f"no traffic from the broker for {self.silence_limit:g} s (heartbeat)"

    def on_channel_failed(self, channel: Any, reason: Failure) -> None:
        if channel.id == PROBE_CHANNEL:
            return  # the probe's 404 answers its question (see AMQPService._bindings_kept)
        # The broker closed a channel we rely on (a channel error): without a new
        # connection nothing would be consumed, bound or published any more.
        self.drop(describe(reason))

    def drop(self, reason: str) -> None:
        """Abort the connection (the service reconnects); ``reason`` is what the log will say."""
        self._close_reason = self._close_reason or reason
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure) -> None:
        # ``lost`` first: the service detaches the bindings before txAMQP fails the
        # operations still in flight on the dead channel.
        if not self.lost.called:
            # Never a Failure: callback(Failure) would take the errback path.
            self.lost.callback(self._close_reason or reason.value)
        super().connectionLost(reason)
