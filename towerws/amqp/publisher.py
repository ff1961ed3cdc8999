"""Publishing from Twisted code: :class:`Publisher`, confirm-mode txAMQP connections to a list of broker nodes.

::

    from towerws.publish import Publisher

    publisher = await Publisher.connect("amqp://guest:guest@localhost:5672/%2F", exchange="towerws")
    await publisher.publish("jobs-status_changed", b'{"unified_job_id": 42, "status": "running"}')
    await publisher.close()

``url`` is one broker URL or a comma-separated list, one per node of a RabbitMQ
cluster (:func:`towerws.broker_urls.brokers`), as the server's ``--amqp-url``.
``connect`` tries the nodes in a random order (a fleet of publishers spreads
over the cluster) and fires once one of them is connected, logged in and in
confirm mode; it fails with :class:`PublishError` when every node failed once
or ``timeout`` passed.

``publish`` returns a Deferred that fires once a node has confirmed the
message.  A message that was not confirmed (the connection or the channel was
lost, the node did not confirm within :data:`ATTEMPT_TIMEOUT`) is sent again on
a new connection, to the next node of the list; so is one the broker refused
(nack), a moment later (a channel whose quorum queue lost its leader can go on
refusing).  The Deferred fails with
:class:`PublishError` only when no node confirmed within ``timeout`` -- or at
once when the cluster refused the exchange itself (404: it does not exist,
403: no permission), which every node would answer alike.  So a caller told
of success got a confirm; a message can arrive twice (when a connection died
after the broker took it), never not at all.  An invalid group or a body that
is not UTF-8 RFC 8259 JSON fails with ValueError before any I/O.

For ``amqps://``, ``ca_file`` (default: the system's trust store),
``cert_file`` and ``key_file`` are the server's ``--amqp-ca-file``,
``--amqp-cert-file`` and ``--amqp-key-file``.

Inside a towerws process the node's bus (``TowerService.bus``) offers the same
``publish(group, body) -> Deferred``, with RabbitMQ or without (``--amqp-url none``),
so in-process code publishes the same way in both modes.

The exchange is declared by the towerws server; a publisher never declares it.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail
from twisted.internet.endpoints import connectProtocol
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import deferLater
from twisted.logger import Logger

from towerws.amqp import txamqp_internals
from towerws.amqp.client import BrokerProtocol
from towerws.amqp.confirms import ChannelRefused, Confirms, Nacked, PublishAttempt, confirmed_within
from towerws.amqp.endpoint import HANDSHAKE_TIMEOUT, broker_endpoint, describe, retry_delays
from towerws.broker_urls import AMQPAddress, Brokers, brokers
from towerws.bus import PublishError
from towerws.messages import check_message

__all__ = ["Publisher", "PublishError"]

CHANNEL = 1
#: seconds one try may take: connecting to one node (TCP, AMQP handshake, confirm
#: mode), or waiting for one confirm.  A node that is unreachable, or accepts and
#: then says nothing, costs this much of a publish's ``timeout``, then the next is tried.
ATTEMPT_TIMEOUT = HANDSHAKE_TIMEOUT
#: seconds between two tries of a message the broker refused (nack) on a working connection
RETRY_PAUSE = 0.2
#: channel.close codes that are the cluster's answer for the exchange, the same on every
#: node (exchanges and permissions are cluster-wide): 403 ACCESS_REFUSED, 404 NOT_FOUND
REFUSED_FOR_GOOD = (403, 404)


class Publisher:
    """Confirm-mode publishing over one connection at a time, to one node of a list; reconnects on demand."""

    log = Logger()

    def __init__(self, addresses: Sequence[AMQPAddress], exchange: str, reactor: Any, timeout: float,
                 heartbeat: int, endpoint_for: Callable[[AMQPAddress], IStreamClientEndpoint]):
        if not addresses:
            raise ValueError("no broker addresses")
        #: the nodes, in the order they are tried
        self.addresses = list(addresses)
        self.exchange = exchange
        self.reactor = reactor
        self.timeout = timeout
        self.heartbeat = heartbeat
        self._endpoint_for = endpoint_for
        self._next = 0  # the node to try first on the next connect: the one after the last used
        #: the connection in use, its confirms and its node (None while there is none)
        self.client: BrokerProtocol | None = None
        self.confirms: Confirms | None = None
        self.address: AMQPAddress | None = None
        self.closed = False
        #: publishes waiting for a (new) connection
        self._waiters: list[Deferred[None]] = []
        self._reconnecting: Deferred[None] | None = None
        self._pass_delay = retry_delays(initial=0.2, cap=2.0)

    @classmethod
    def connect(cls, url: str | AMQPAddress | Brokers, exchange: str = "towerws", reactor: Any = None,
                timeout: float = 10.0, heartbeat: int = 30, ca_file: str | None = None,
                cert_file: str | None = None, key_file: str | None = None,
                rng: random.Random | None = None) -> Deferred["Publisher"]:
        """Connect to one node of ``url`` (trying the others in turn), within ``timeout`` seconds.

        ``timeout`` also bounds each :meth:`publish`.  Fails with
        :class:`PublishError` (the password never in its message) when no node
        could be reached and set up, saying why for each.
        """
        if reactor is None:
            from twisted.internet import reactor
        txamqp_internals.install()  # idempotent; a publisher may be the process's only txAMQP user
        try:
            if isinstance(url, Brokers):
                nodes = url
            elif isinstance(url, AMQPAddress):
                nodes = Brokers((url,))
            else:
                nodes = brokers(url)
        except ValueError as exc:
            return fail(ValueError(f"invalid AMQP URL: {exc}"))
        try:
            # Built up front: an unreadable PEM file fails here, named in the message.
            endpoints = {a: broker_endpoint(reactor, a.host, a.port, a.tls, ca_file, cert_file, key_file) for a in nodes}
        except ValueError as exc:
            return fail(exc)
        publisher = cls(nodes.shuffled(rng), exchange, reactor, timeout, heartbeat, endpoints.__getitem__)
        d = Deferred.fromCoroutine(publisher._connect_pass(reactor.seconds() + timeout, quiet=True))
        return d.addCallback(lambda _: publisher)

    # -- connecting

    async def _connect_pass(self, deadline: float | None, quiet: bool = False) -> None:
        """Connect to the first node that works, starting after the one used last; each tried once.

        Raises PublishError naming why each node failed.  ``quiet``: the caller
        reports the error, so the attempts are not logged.
        """
        count = len(self.addresses)
        reasons: list[str] = []
        for step in range(count):
            seconds = ATTEMPT_TIMEOUT
            if deadline is not None:
                seconds = min(seconds, deadline - self.reactor.seconds())
                if seconds <= 0:
                    break
            index = (self._next + step) % count
            address = self.addresses[index]
            try:
                await self._attempt(address, seconds)
            except PublishError as exc:
                reasons.append(str(exc))
                if not quiet:
                    self.log.warn("{reason}", reason=str(exc))
                continue
            self._next = (index + 1) % count
            return
        if count == 1 and reasons:
            raise PublishError(reasons[0])
        tried = f"; tried {len(reasons)} of {count} before the timeout" if len(reasons) < count else ""
        raise PublishError(f"none of the {count} AMQP brokers could be used: {'; '.join(reasons)}{tried}")

    async def _attempt(self, address: AMQPAddress, seconds: float) -> None:
        """Connect to ``address`` and make it the publisher's connection, within ``seconds``."""
        d = Deferred.fromCoroutine(self._open(address))
        d.addTimeout(seconds, self.reactor)
        try:
            client, confirms = await d
        except TimeoutError:
            raise PublishError(f"no answer from the AMQP broker {address} within {seconds:.3g} s") from None
        if self.closed:  # close() came while this attempt was under way
            client.transport.abortConnection()
            raise PublishError("the publisher was closed")
        self.client, self.confirms, self.address = client, confirms, address
        client.lost.addCallback(self._lost, client)

    async def _open(self, address: AMQPAddress) -> tuple[BrokerProtocol, Confirms]:
        """A new connection to ``address``, logged in, with a channel in confirm mode."""
        # A publisher never consumes: every frame takes BrokerProtocol's generic path.
        client = BrokerProtocol(_no_delivery, address.vhost, self.heartbeat, self.reactor, "towerws publisher")
        try:
            await connectProtocol(self._endpoint_for(address), client)
        except (CancelledError, ConnectingCancelledError):
            # The attempt's timeout cancelled the TCP connect (HostnameEndpoint says so
            # with its own exception): _attempt reports "no answer ... within".
            raise CancelledError() from None
        except Exception as exc:
            raise PublishError(f"cannot connect to the AMQP broker {address}: {describe(exc)}") from None
        try:
            await client.start(address.login, mechanism="PLAIN")
            confirms = await Confirms.open(client, CHANNEL, self.exchange, self.reactor, self.timeout)
        except Exception as exc:
            client.transport.abortConnection()
            if isinstance(exc, CancelledError):
                raise  # the attempt's timeout: reported as such by _attempt
            raise PublishError(f"AMQP setup on {address} failed: {describe(exc)}") from None
        return client, confirms

    def _lost(self, reason: object, client: BrokerProtocol) -> None:
        if self.client is client:
            address = self.address
            self.client = self.confirms = self.address = None
            if not self.closed:
                # Reconnected on demand, by the next publish (or the ones in flight).
                self.log.info("lost the connection to {broker}: {reason}", broker=str(address),
                              reason=describe(reason))  # type: ignore[arg-type]

    def _abandon(self, confirms: Confirms, reason: str) -> None:
        """Stop using the connection of ``confirms`` (if it is still the current one) and drop it."""
        if self.confirms is confirms and self.client is not None:
            client, address = self.client, self.address
            # Forget it now, not when the transport reports the loss: a publish
            # arriving meanwhile must not take the dying connection for a working one.
            self.client = self.confirms = self.address = None
            self.log.info("dropping the connection to {broker}: {reason}", broker=str(address), reason=reason)
            client.drop(reason)

    def _reconnected(self) -> Deferred[None]:
        """Fires once there is a working connection again, or the publisher is closed (a new one is made if needed)."""
        d: Deferred[None] = Deferred(self._gave_up)
        self._waiters.append(d)
        if self._reconnecting is None:
            reconnecting = Deferred.fromCoroutine(self._reconnect())
            if not reconnecting.called:  # (it may have finished at once; then it is no longer running)
                self._reconnecting = reconnecting
            reconnecting.addErrback(lambda failure: failure.trap(CancelledError))  # close() stops it
        return d

    def _gave_up(self, waiter: Deferred[None]) -> None:
        """A publish stopped waiting (its timeout); with nobody left waiting, stop reconnecting."""
        if waiter in self._waiters:
            self._waiters.remove(waiter)
        if not self._waiters and self._reconnecting is not None:
            self._reconnecting.cancel()  # the next publish starts it again

    async def _reconnect(self) -> None:
        """Passes over the nodes, with backoff between failed ones, until one connects or nobody waits."""
        passes = 0
        try:
            # Only while some publish waits: an idle publisher reconnects when next used.
            while self._waiters and not self.closed and self.confirms is None:
                try:
                    await self._connect_pass(None)
                except PublishError:
                    passes += 1
                    delay = self._pass_delay(passes)
                    self.log.warn("no AMQP broker could be used; trying again in {delay:.1f} s", delay=delay)
                    await deferLater(self.reactor, delay, lambda: None)
        finally:
            self._reconnecting = None
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.callback(None)  # each publish looks at the state again

    # -- publishing

    def publish(self, group: str, body: bytes) -> Deferred[None]:
        """Publish ``body`` with routing key ``group``; fires once a broker node confirms it.

        Fails with :class:`PublishError` when no node confirmed it within the
        publisher's ``timeout`` (or the exchange is refused for good).
        """
        try:
            check_message(group, body)
        except (TypeError, ValueError) as exc:
            return fail(exc)
        if self.closed:
            return fail(PublishError("the publisher is closed"))
        return confirmed_within(functools.partial(self._publish, group, body), self.timeout, self.reactor)

    async def _publish(self, group: str, body: bytes, deadline: float, attempt: PublishAttempt) -> None:
        while True:
            if self.closed:
                raise PublishError(f"the publisher was closed before a broker confirmed the message "
                                   f"({attempt.last_error})")
            confirms = self.confirms
            if confirms is None or confirms.error is not None:
                if confirms is not None:
                    attempt.last_error = str(confirms.error)
                    self._abandon(confirms, "the publishing channel failed")
                await self._reconnected()
                continue
            seconds = max(0.001, min(ATTEMPT_TIMEOUT, deadline - self.reactor.seconds()))
            try:
                await confirms.publish(group, body, timeout=seconds)
                return
            except ChannelRefused as exc:
                if exc.reply_code in REFUSED_FOR_GOOD:
                    raise
                attempt.last_error = str(exc)  # the channel is gone: a new connection brings a new one
            except Nacked as exc:
                attempt.last_error = str(exc)
                # Again on a new connection (the next node), a moment later: a channel whose
                # quorum queue's leader died can go on nacking for as long as it lives
                # (RabbitMQ 3.10: 10 s and more, measured), a new channel finds the new leader.
                self._abandon(confirms, "the broker refused (nacked) a message")
                await deferLater(self.reactor, RETRY_PAUSE, lambda: None)
            except PublishError as exc:
                attempt.last_error = str(exc)
                if confirms.error is None:
                    # No confirm in time on a connection that looks alive: a hung node. The next one.
                    self._abandon(confirms, f"no confirm within {seconds:g} s")

    # -- closing

    async def _close(self) -> None:
        self.closed = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        client = self.client
        if client is None:
            return
        try:
            await client.close(within=2)
        except Exception as exc:
            self.log.warn("closing the AMQP connection: {error}", error=describe(exc))
        client.transport.loseConnection()
        await client.lost

    def close(self) -> Deferred[None]:
        """Stop reconnecting and close the connection cleanly; messages not yet confirmed fail with PublishError."""
        return Deferred.fromCoroutine(self._close())


def _no_delivery(group: str, body: bytes, received: float) -> None:
    raise AssertionError("a publisher's connection consumes nothing")
