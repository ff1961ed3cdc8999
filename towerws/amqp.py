"""The AMQP side: consume this node's RabbitMQ queue and keep its bindings in step.

* :class:`BrokerProtocol` -- a txAMQP client whose frame reader takes a fast
  path for deliveries on the consuming channel (``basic.deliver`` + content
  header + body frames are cut straight out of the buffer, no generic codec,
  no Deferred per message) and acknowledges them in one ``multiple`` ack per read.
* :class:`Bindings` -- binds the queue to each group the hub reports active and
  unbinds it a grace period after the group's last subscriber left; one operation
  in flight per group, re-applied on every new connection.
* :class:`AMQPService` -- ``ClientService`` with exponential backoff and jitter:
  connect (TCP or TLS, :mod:`towerws.amqp_endpoint`), declare exchange and queue,
  re-bind, consume; forever.  It is also the node's bus: a second channel in
  confirm mode publishes for the HTTP publish API.

Queue ``towerws.<node-id>`` is durable, neither exclusive nor auto-delete: it
outlives a dropped connection and a broker restart (``x-expires``), so messages
routed while the connection was down are delivered after reconnect, bounded by
``x-max-length`` (drop-head).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterable
from typing import Any

from twisted.application.internet import ClientService
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from txamqp.protocol import AMQClient

from towerws.amqp_endpoint import SetUpEndpoint, broker_endpoint, describe, retry_delays
from towerws.amqpspec import install_codec, load_spec, silence_txamqp_returnvalue_warning
from towerws.config import Settings
from towerws.confirms import ConfirmDelegate, Confirms, PublishError
from towerws.hub import Hub, InvalidBody
from towerws.metrics import Metrics
from towerws.websocket import BrokerUnavailable

CHANNEL = 1
PUBLISH_CHANNEL = 2
FRAME_END = 0xCE
_HEADER = struct.Struct("!BHI")
_U64 = struct.Struct("!Q")
_DELIVER = b"\x00\x3c\x00\x3c"  # class 60 (basic), method 60 (deliver)


def ack_frame(channel: int, delivery_tag: int) -> bytes:
    """``basic.ack`` with ``multiple=true``: everything up to ``delivery_tag``."""
    return _HEADER.pack(1, channel, 13) + struct.pack("!HHQB", 60, 80, delivery_tag, 1) + b"\xce"


class RateLimitedLog:
    """Logs an event at most once per ``interval`` seconds, counting the ones it held back."""

    def __init__(self, log: Logger, clock: IReactorTime, interval: float = 10.0):
        self._log, self._clock, self._interval = log, clock, interval
        self._next = 0.0
        self._held = 0

    def warn(self, fmt: str, **kw: Any) -> None:
        now = self._clock.seconds()
        if now < self._next:
            self._held += 1
            return
        self._log.warn(fmt + " ({suppressed} similar suppressed)", suppressed=self._held, **kw)
        self._held = 0
        self._next = now + self._interval


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


class BrokerProtocol(AMQClient):
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
                    self.frame_received(self._unpack_frame(bytes(buf[pos : end + 1])))
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
        if self.heartbeatInterval > 0 and pos:
            self.reschedule_check_heartbeat()

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

    def do_close(self, reason: object) -> None:
        # The broker's connection.close (e.g. 320 CONNECTION_FORCED) says more than the TCP close after it.
        if self._close_reason is None:
            self._close_reason = reason
        super().do_close(reason)

    def check_heartbeat(self) -> None:
        silent = self.heartbeatInterval * self.MAX_UNSEEN_HEARTBEAT
        self._close_reason = f"no traffic from the broker for {silent} s (heartbeat)"
        super().check_heartbeat()

    def channel_failed(self, channel: Any, reason: Failure) -> None:
        # The broker closed our only channel (a channel error): without a new
        # connection nothing would be consumed any more.
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


class _Waiter:
    __slots__ = ("missing", "deferred", "timeout")

    def __init__(self, missing: set[str]):
        self.missing = missing
        self.deferred: Deferred[None] = Deferred()
        self.timeout: IDelayedCall | None = None


class Bindings:
    """Keeps the queue's bindings equal to the groups with local subscribers.

    The hub calls :meth:`group_activated` / :meth:`group_deactivated`; a groups
    reply waits on :meth:`when_bound`.  Operations for one group never overlap
    (replies on a channel come in order, but a bind-unbind-bind burst must end
    bound), and the state is re-applied on each new channel.
    """

    log = Logger()

    def __init__(self, exchange: str, queue: str, clock: IReactorTime, grace: float, timeout: float):
        self.exchange, self.queue = exchange, queue
        self.clock, self.grace, self.timeout = clock, grace, timeout
        self.wanted: set[str] = set()
        self.bound: set[str] = set()
        self._unknown: set[str] = set()  # may still be bound from an earlier connection
        self._busy: set[str] = set()
        self._grace_calls: dict[str, IDelayedCall] = {}
        self._waiters: dict[str, set[_Waiter]] = {}
        self._channel: Any = None
        self.on_error: Callable[[], None] = lambda: None

    # -- hub events ------------------------------------------------------------

    def group_activated(self, group: str) -> None:
        self.wanted.add(group)
        call = self._grace_calls.pop(group, None)
        if call is not None:
            call.cancel()
        self._reconcile(group)

    def group_deactivated(self, group: str) -> None:
        self.wanted.discard(group)
        if self.grace > 0:
            self._grace_calls[group] = self.clock.callLater(self.grace, self._grace_over, group)
        else:
            self._reconcile(group)

    def _grace_over(self, group: str) -> None:
        del self._grace_calls[group]
        self._reconcile(group)

    # -- channel lifecycle -----------------------------------------------------

    def attach(self, channel: Any) -> None:
        """A new channel is ready: bind what is wanted, unbind leftovers."""
        self._channel = channel
        self._unknown |= self.bound | self._busy
        self.bound = set()
        self._busy = set()
        for group in self.wanted | set(self._grace_calls) | self._unknown:
            self._reconcile(group)

    def detach(self) -> None:
        self._channel = None

    def stop(self) -> None:
        for call in self._grace_calls.values():
            call.cancel()
        self._grace_calls.clear()

    # -- waiting for bindings --------------------------------------------------

    def when_bound(self, groups: Iterable[str]) -> Deferred[None]:
        # A bound group with an operation in flight is being unbound (a bind only
        # starts when unbound): it is not ready until the re-bind after it.
        missing = {g for g in groups if g not in self.bound or g in self._busy}
        if not missing:
            return succeed(None)
        waiter = _Waiter(missing)
        for group in missing:
            self._waiters.setdefault(group, set()).add(waiter)
        waiter.timeout = self.clock.callLater(self.timeout, self._expire, waiter)
        return waiter.deferred

    def _expire(self, waiter: _Waiter) -> None:
        for group in waiter.missing:
            waiters = self._waiters.get(group)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[group]
        waiter.deferred.errback(BrokerUnavailable())

    def _fire(self, group: str) -> None:
        for waiter in self._waiters.pop(group, ()):
            waiter.missing.discard(group)
            if not waiter.missing:
                assert waiter.timeout is not None
                waiter.timeout.cancel()
                waiter.deferred.callback(None)

    # -- the state machine -----------------------------------------------------

    def _reconcile(self, group: str) -> None:
        channel = self._channel
        if channel is None or group in self._busy:
            return
        want = group in self.wanted or group in self._grace_calls
        if want and group not in self.bound:
            self._run(channel, group, bind=True)
        elif not want and (group in self.bound or group in self._unknown):
            self._run(channel, group, bind=False)
        elif want:
            self._fire(group)

    def _run(self, channel: Any, group: str, bind: bool) -> None:
        self._busy.add(group)
        if bind:
            d = channel.queue_bind(queue=self.queue, exchange=self.exchange, routing_key=group)
        else:
            d = channel.queue_unbind(queue=self.queue, exchange=self.exchange, routing_key=group)

        def done(_: object) -> None:
            if channel is not self._channel:
                return  # an answer from a channel that is gone; attach() redoes it
            self._busy.discard(group)
            self._unknown.discard(group)
            (self.bound.add if bind else self.bound.discard)(group)
            self._reconcile(group)

        def failed(failure: Failure) -> None:
            if channel is not self._channel:
                return
            self._busy.discard(group)
            self.log.error(
                "AMQP {op} of group {group} failed: {error}; reconnecting",
                op="bind" if bind else "unbind",
                group=group,
                error=describe(failure),
            )
            self.on_error()

        d.addCallbacks(done, failed)


class AMQPService(Service):
    """Owns the broker connection: connect with backoff, set up, consume, repeat."""

    log = Logger()

    def __init__(self, settings: Settings, hub: Hub, reactor: Any, metrics: Metrics | None = None):
        install_codec()
        silence_txamqp_returnvalue_warning()
        self.settings = settings
        self.address = settings.amqp_url
        self.hub = hub
        self.reactor = reactor
        self.queue = f"towerws.{settings.node_id}"
        self.bindings = Bindings(
            settings.exchange, self.queue, reactor, grace=settings.unbind_grace, timeout=settings.bind_timeout
        )
        self.bindings.on_error = self._drop
        self.metrics = metrics or Metrics()
        self.client: BrokerProtocol | None = None
        self.confirms: Confirms | None = None
        self.channel: Any = None
        self._setups = 0
        self._ready_waiters: list[Deferred[None]] = []
        self.consumed = 0
        self.dropped = 0
        self._bad_body_log = RateLimitedLog(self.log, reactor)
        factory = Factory.forProtocol(self._build_protocol)
        # The endpoint's connect() includes the AMQP setup (see amqp_endpoint.SetUpEndpoint).
        endpoint = SetUpEndpoint(self._endpoint(), self._set_up, str(self.address), reactor)
        self._service = ClientService(
            endpoint,
            factory,
            retryPolicy=retry_delays(initial=0.5, cap=settings.reconnect_max_delay),
            clock=reactor,
        )

    # The websocket side asks the bus; the bus is these bindings.
    def when_bound(self, groups: Iterable[str]) -> Deferred[None]:
        return self.bindings.when_bound(groups)

    def when_ready(self) -> Deferred[None]:
        """Fires once the node is consuming (at once if it is)."""
        if self.client is not None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._ready_waiters.append(d)
        return d

    def publish(self, group: str, body: bytes) -> Deferred[None]:
        """Publish to the exchange on this node's connection; fires once the broker confirms.

        Fails at once with :class:`PublishError` while the broker is not connected.
        """
        confirms = self.confirms
        if confirms is None:
            return fail(PublishError(f"not connected to the AMQP broker {self.address}"))
        if confirms.error is not None:
            self._drop()  # the publishing channel died: a new connection brings a new one
        return confirms.publish(group, body)

    def _endpoint(self) -> Any:
        s, a = self.settings, self.address
        return broker_endpoint(self.reactor, a.host, a.port, a.tls, s.amqp_ca_file, s.amqp_cert_file, s.amqp_key_file)

    def _build_protocol(self) -> BrokerProtocol:
        return BrokerProtocol(
            self._deliver, self.address.vhost, self.settings.amqp_heartbeat, self.reactor, f"towerws {self.queue}"
        )

    async def _set_up(self, client: BrokerProtocol) -> None:
        """Run on each new connection; a failure fails the attempt (logged and retried by the endpoint)."""
        s = self.settings
        await client.start(f"\0{self.address.username}\0{self.address.password}", mechanism="PLAIN")
        channel = await client.channel(CHANNEL)
        await channel.channel_open()
        await channel.exchange_declare(exchange=s.exchange, type=s.exchange_type, durable=True)
        # Durable, so the queue and its bindings (to the durable exchange) also
        # survive a broker restart: messages published before this node is back
        # wait for it instead of going nowhere.
        await channel.queue_declare(
            queue=self.queue,
            durable=True,
            exclusive=False,
            auto_delete=False,
            arguments={
                "x-expires": int(s.queue_expires * 1000),
                "x-max-length": s.queue_max_length,
                "x-overflow": "drop-head",
            },
        )
        await channel.basic_qos(prefetch_count=s.prefetch)
        confirms = await Confirms.open(client, PUBLISH_CHANNEL, s.exchange, self.reactor, s.publish_timeout)
        client.consuming = True
        await channel.basic_consume(queue=self.queue, consumer_tag=self.queue, no_ack=False)
        self.client, self.channel, self.confirms = client, channel, confirms
        self._setups += 1
        if self._setups > 1:
            self.metrics.amqp_reconnects.inc()
        self.bindings.attach(channel)
        client.lost.addCallback(self._lost, client)
        self.log.info("consuming {queue} on {broker}", queue=self.queue, broker=str(self.address))
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            d.callback(None)

    def _lost(self, reason: object, client: BrokerProtocol) -> None:
        if self.client is client:
            self.client = self.channel = self.confirms = None
            self.bindings.detach()
            if self.running:
                self.log.warn(
                    "lost the connection to {broker}: {reason}; reconnecting",
                    broker=str(self.address),
                    reason=describe(reason),  # type: ignore[arg-type]
                )

    def _drop(self) -> None:
        if self.client is not None:
            self.client.drop("a binding failed")

    def _deliver(self, group: str, body: bytes, received: float) -> None:
        self.consumed += 1
        try:
            reached = self.hub.publish(group, body)
        except InvalidBody as exc:
            self.dropped += 1
            self._bad_body_log.warn("dropped a message for {group}: {reason}", group=group, reason=str(exc))
            return
        except Exception:
            # A bug must not turn one message into a reconnect-and-redeliver loop.
            self.dropped += 1
            self.log.failure("dispatching a message for {group} failed", group=group)
            return
        if reached:
            # One observation per message, once the hub queued it for every subscriber.
            self.metrics.latency.observe(time.perf_counter() - received)

    @property
    def ready(self) -> bool:
        return self.client is not None

    @property
    def state(self) -> str:
        """``connecting``, ``consuming``, ``stopping`` or ``stopped`` (for /readyz)."""
        if self.running:
            return "consuming" if self.client is not None else "connecting"
        return "stopping" if self.client is not None else "stopped"

    def startService(self) -> None:
        super().startService()
        self._service.startService()

    async def _stop(self) -> None:
        self.bindings.stop()
        client, channel = self.client, self.channel
        if client is not None:
            # The websocket clients are gone by now (TowerService drains them first):
            # deliveries still in flight are not acknowledged, and the clean channel
            # and connection close below makes the broker requeue them at once.
            client.holding = True
            try:
                await _within(channel.basic_cancel(consumer_tag=self.queue), self.reactor)
                await _within(channel.channel_close(reply_code=200, reply_text="shutting down"), self.reactor)
                await client.close(within=2)
            except Exception as exc:
                self.log.warn("closing the AMQP connection: {error}", error=describe(exc))
            else:
                self.log.info("AMQP consumer cancelled, channel and connection closed")
        await self._service.stopService()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())


def _within(d: Deferred[Any], clock: IReactorTime, seconds: float = 2.0) -> Deferred[Any]:
    """``d``, failed with ``TimeoutError`` if the broker has not answered in time."""
    return d.addTimeout(seconds, clock)
