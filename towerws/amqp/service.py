"""The AMQP side: the node's broker connection, its queue, and the bus built on them.

:class:`AMQPService` is a ``ClientService`` with exponential backoff and jitter:
connect (TCP or TLS, :mod:`towerws.amqp.endpoint`), declare exchange and queue,
re-bind (:mod:`towerws.amqp.bindings`), consume (:mod:`towerws.amqp.client`);
forever.  It is also the node's :class:`~towerws.bus.Bus`: a second channel in
confirm mode publishes for the HTTP publish API and in-process code.

Queue ``towerws.<node-id>`` is durable, neither exclusive nor auto-delete: it
outlives a dropped connection and a broker restart (``x-expires``), so messages
routed while the connection was down are delivered after reconnect, bounded by
``x-max-length`` (drop-head).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from twisted.application.internet import ClientService
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from towerws.amqp.bindings import Bindings
from towerws.amqp.client import CHANNEL, PUBLISH_CHANNEL, BrokerProtocol
from towerws.amqp.confirms import Confirms
from towerws.amqp.endpoint import SetUpEndpoint, broker_endpoint, describe, retry_delays
from towerws.bus import PublishError
from towerws.config import QUEUE_PREFIX, Settings
from towerws.hub import Hub
from towerws.logs import RateLimitedLog
from towerws.messages import InvalidBody, check_message
from towerws.metrics import Metrics


class AMQPService(Service):
    """Owns the broker connection: connect with backoff, set up, consume, repeat."""

    log = Logger()

    def __init__(self, settings: Settings, hub: Hub, reactor: Any, metrics: Metrics | None = None):
        self.settings = settings
        self.address = settings.amqp_url
        self.hub = hub
        self.reactor = reactor
        self.queue = QUEUE_PREFIX + settings.node_id
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

    # -- the Bus: the hub's events and the websocket side's waits go to the bindings

    def group_activated(self, group: str) -> None:
        self.bindings.group_activated(group)

    def group_deactivated(self, group: str) -> None:
        self.bindings.group_deactivated(group)

    def when_bound(self, groups: Iterable[str]) -> Deferred[None]:
        return self.bindings.when_bound(groups)

    @property
    def bound_count(self) -> int:
        return len(self.bindings.bound)

    def when_ready(self) -> Deferred[None]:
        """Fires once the node is consuming (at once if it is)."""
        if self.client is not None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._ready_waiters.append(d)
        return d

    def publish(self, group: str, body: bytes) -> Deferred[None]:
        """Publish to the exchange on this node's connection; fires once the broker confirms.

        Fails with ValueError/TypeError for an invalid group or body (nothing sent),
        at once with :class:`PublishError` while the broker is not connected.
        """
        try:
            check_message(group, body)
        except (TypeError, ValueError) as exc:
            return fail(exc)
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
        await client.start(self.address.login, mechanism="PLAIN")
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
