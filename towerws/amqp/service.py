"""The AMQP side: the node's broker connection, its queue, and the bus built on them.

:class:`AMQPService` is a ``ClientService`` with exponential backoff and jitter
over a list of broker nodes (:class:`~towerws.amqp.endpoint.FailoverEndpoint`):
connect to one (TCP or TLS), declare exchange and queue, consume
(:mod:`towerws.amqp.client`), then bind what is missing
(:mod:`towerws.amqp.bindings`); on a failed attempt or a lost connection, the
next node; forever.  It is also the node's :class:`~towerws.bus.Bus`: a channel
in confirm mode publishes for the HTTP publish API and in-process code, and a
message that was not confirmed is sent again after the failover.

Queue ``towerws.<node-id>`` is durable, neither exclusive nor auto-delete: it
outlives a dropped connection and a broker restart (``x-expires``), so messages
routed while the connection was down are delivered after reconnect, bounded by
``x-max-length`` (drop-head).  ``--queue-type quorum`` (the default with several
URLs) replicates it over the cluster, so it also outlives its broker node.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Iterable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.logger import Logger
from txamqp.client import Closed

from towerws.amqp.bindings import Bindings
from towerws.amqp.client import BINDING_CHANNELS, CHANNEL, PROBE_CHANNEL, PUBLISH_CHANNEL, BrokerProtocol
from towerws.amqp.confirms import Confirms, PublishAttempt, confirmed_within
from towerws.amqp.endpoint import (
    HANDSHAKE_TIMEOUT,
    FailoverEndpoint,
    QueueTypeConflict,
    SetUpEndpoint,
    broker_endpoint,
    describe,
    retry_delays,
)
from towerws.broker_urls import AMQPAddress
from towerws.bus import PublishError
from towerws.config import QUEUE_PREFIX, Settings
from towerws.hub import Hub
from towerws.logs import RateLimitedLog
from towerws.messages import InvalidBody, check_message
from towerws.metrics import Metrics
from towerws.twisted_internals import QuietClientService


#: seconds between two tries of a publish the broker refused on a working connection
RETRY_PAUSE = 0.2


class AMQPService(Service):
    """Owns the broker connection: connect (to one node of the list) with backoff, set up, consume, repeat."""

    log = Logger()

    def __init__(self, settings: Settings, hub: Hub, reactor: Any, metrics: Metrics | None = None,
                 rng: random.Random | None = None):
        assert settings.amqp_url is not None
        self.settings = settings
        self.brokers = settings.amqp_url
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
        #: the broker node of the current connection (None while not consuming)
        self.address: AMQPAddress | None = None
        self._setups = 0
        self._ready_waiters: list[Deferred[None]] = []
        self.consumed = 0
        self.dropped = 0
        self._bad_body_log = RateLimitedLog(self.log, reactor)
        factory = Factory.forProtocol(self._build_protocol)
        # Each endpoint's connect() includes the AMQP setup on that node (see endpoint.SetUpEndpoint).
        self._failover = FailoverEndpoint([
            SetUpEndpoint(self._endpoint(address), functools.partial(self._set_up, address=address),
                          str(address), reactor)
            for address in self.brokers.shuffled(rng)
        ])
        self._service = QuietClientService(
            self._failover, factory, retryPolicy=retry_delays(initial=0.5, cap=settings.reconnect_max_delay),
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
        """Publish to the exchange; fires once a broker node confirmed the message.

        Fails with ValueError/TypeError for an invalid group or body (nothing sent).
        A message that was not confirmed (connection lost, nack) is sent again on
        the next connection, to whichever node that is: a caller told of success
        got a confirm (duplicates are possible, losses are not); a caller is told
        of failure (:class:`PublishError`) only when no node confirmed within
        ``publish_timeout``.
        """
        try:
            check_message(group, body)
        except (TypeError, ValueError) as exc:
            return fail(exc)
        return confirmed_within(functools.partial(self._publish, group, body), self.settings.publish_timeout,
                                self.reactor)

    async def _publish(self, group: str, body: bytes, deadline: float, attempt: PublishAttempt) -> None:
        while True:
            confirms = self.confirms
            if confirms is None or confirms.error is not None:
                if confirms is not None:
                    attempt.last_error = str(confirms.error)
                    self._drop("the publishing channel failed")  # a new connection brings a new one
                await self._connected_again(confirms)
                continue
            try:
                await confirms.publish(group, body, timeout=max(0.0, deadline - self.reactor.seconds()))
                return
            except PublishError as exc:
                attempt.last_error = str(exc)
            if confirms.error is None and confirms is self.confirms:
                # Refused (nack) on a working connection: try again there, a moment later.
                await deferLater(self.reactor, RETRY_PAUSE, lambda: None)
            else:
                await self._connected_again(confirms)

    def _connected_again(self, old: Confirms | None) -> Deferred[None]:
        """Fires once a connection other than the one ``old`` belongs to is consuming."""
        if self.confirms is not None and self.confirms is not old:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._ready_waiters.append(d)
        return d

    def _endpoint(self, address: AMQPAddress) -> Any:
        s = self.settings
        return broker_endpoint(
            self.reactor, address.host, address.port, address.tls, s.amqp_ca_file, s.amqp_cert_file, s.amqp_key_file
        )

    def _build_protocol(self) -> BrokerProtocol:
        # The vhost is set per broker node in _set_up (each URL may name its own).
        return BrokerProtocol(self._deliver, "/", self.settings.amqp_heartbeat, self.reactor, f"towerws {self.queue}")

    def queue_arguments(self) -> dict[str, Any]:
        """``queue.declare`` arguments of this node's queue (``x-queue-type`` only for quorum)."""
        s = self.settings
        arguments: dict[str, Any] = {
            "x-expires": int(s.queue_expires * 1000),
            "x-max-length": s.queue_max_length,
            "x-overflow": "drop-head",
        }
        if s.queue_type == "quorum":
            # Leaders spread over the cluster's nodes instead of piling up on the first.
            arguments.update({"x-queue-type": "quorum", "x-queue-leader-locator": "balanced"})
        return arguments

    async def _set_up(self, client: BrokerProtocol, address: AMQPAddress) -> None:
        """Run on each new connection; a failure fails the attempt (logged by the endpoint, next node)."""
        s = self.settings
        client.vhost = address.vhost
        # A node that accepts TCP but never answers (frozen) must not hold up the next one.
        await client.start(address.login, mechanism="PLAIN").addTimeout(HANDSHAKE_TIMEOUT, self.reactor)
        channel = await client.channel(CHANNEL)
        await channel.channel_open()
        kept = await self._bindings_kept(client)
        await channel.exchange_declare(exchange=s.exchange, type=s.exchange_type, durable=True)
        # Durable, so the queue and its bindings (to the durable exchange) also
        # survive a broker restart: messages published before this node is back
        # wait for it instead of going nowhere.
        try:
            await channel.queue_declare(
                queue=self.queue, durable=True, exclusive=False, auto_delete=False, arguments=self.queue_arguments()
            )
        except Closed as exc:
            raise self._explain_declare_refusal(exc) from None
        await channel.basic_qos(prefetch_count=s.prefetch)
        confirms = await Confirms.open(client, PUBLISH_CHANNEL, s.exchange, self.reactor, s.publish_timeout)
        client.consuming = True
        # Consume first, bind after: deliveries of the groups still bound resume at once.
        await channel.basic_consume(queue=self.queue, consumer_tag=self.queue, no_ack=False)
        binding_channels = []
        for number in BINDING_CHANNELS:
            bindings_channel = await client.channel(number)
            await bindings_channel.channel_open()
            binding_channels.append(bindings_channel)
        self.client, self.channel, self.confirms, self.address = client, channel, confirms, address
        self._setups += 1
        if self._setups > 1:
            self.metrics.amqp_reconnects.inc()
        self.bindings.attach(binding_channels, kept=kept)
        client.lost.addCallback(self._lost, client)
        self.log.info("consuming {queue} on {broker} ({queue_type} queue)", queue=self.queue, broker=str(address),
                      queue_type=s.queue_type)
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            d.callback(None)

    async def _bindings_kept(self, client: BrokerProtocol) -> bool:
        """Whether the exchange and this node's queue outlived the last connection (and the bindings with them)."""
        probe = await client.channel(PROBE_CHANNEL)
        await probe.channel_open()
        try:
            # A passive declare of something missing closes the channel with 404.
            await probe.exchange_declare(exchange=self.settings.exchange, type=self.settings.exchange_type,
                                         passive=True)
            await probe.queue_declare(queue=self.queue, passive=True)
        except Closed:
            return False
        await probe.channel_close(reply_code=200, reply_text="probed")
        return True

    def _explain_declare_refusal(self, exc: Closed) -> Exception:
        text = describe(exc)
        if "inequivalent arg 'x-queue-type'" not in text:
            return exc
        other = "classic" if self.settings.queue_type == "quorum" else "quorum"
        return QueueTypeConflict(
            f"queue {self.queue} exists as a {other} queue, but --queue-type is {self.settings.queue_type}; "
            f"nothing was changed. Delete it once empty (rabbitmqctl delete_queue {self.queue} --if-empty), "
            f"or keep --queue-type {other}, or give this node another --node-id"
        )

    def _lost(self, reason: object, client: BrokerProtocol) -> None:
        if self.client is client:
            address = self.address
            self.client = self.channel = self.confirms = self.address = None
            self.bindings.detach()
            if self.running:
                self.log.warn(
                    "lost the connection to {broker}: {reason}; reconnecting",
                    broker=str(address),
                    reason=describe(reason),  # type: ignore[arg-type]
                )

    def _drop(self, reason: str = "a binding failed") -> None:
        if self.client is not None:
            self.client.drop(reason)

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
    def broker(self) -> str | None:
        """``host:port`` of the broker node in use (None while not consuming)."""
        return self.address.node if self.address is not None else None

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
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            d.errback(PublishError("the node is shutting down"))

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())


def _within(d: Deferred[Any], clock: IReactorTime, seconds: float = 2.0) -> Deferred[Any]:
    """``d``, failed with ``TimeoutError`` if the broker has not answered in time."""
    return d.addTimeout(seconds, clock)
