"""Publishing from Twisted code: :class:`Publisher`, a confirm-mode txAMQP connection.

::

    from towerws.publish import Publisher

    publisher = await Publisher.connect("amqp://guest:guest@localhost:5672/%2F", exchange="towerws")
    await publisher.publish("jobs-status_changed", b'{"unified_job_id": 42, "status": "running"}')
    await publisher.close()

``publish`` returns a Deferred that fires once the broker has confirmed the
message and fails with :class:`PublishError` if it refused it (nack), the
connection or channel was lost, or no confirm came within ``timeout``; an invalid
group or a body that is not UTF-8 RFC 8259 JSON fails with ValueError before any I/O.
For ``amqps://``, ``ca_file`` (default: the system's trust store), ``cert_file``
and ``key_file`` are the server's ``--amqp-ca-file``, ``--amqp-cert-file`` and
``--amqp-key-file``.

Inside a towerws process the node's bus (``TowerService.bus``) offers the same
``publish(group, body) -> Deferred``, with RabbitMQ or without (``--amqp-url none``),
so in-process code publishes the same way in both modes.

One connection, no reconnection: a long-lived user reconnects on PublishError.
The exchange is declared by the towerws server; a publisher never declares it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail
from twisted.internet.endpoints import connectProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from towerws.amqp import txamqp_internals
from towerws.amqp.client import BrokerProtocol
from towerws.amqp.confirms import Confirms
from towerws.amqp.endpoint import broker_endpoint, describe
from towerws.broker_urls import AMQPAddress, amqp_address
from towerws.bus import PublishError
from towerws.messages import check_message

__all__ = ["Publisher", "PublishError"]

CHANNEL = 1


class Publisher:
    """One AMQP connection with one channel in confirm mode."""

    log = Logger()

    def __init__(self, client: BrokerProtocol, confirms: Confirms, address: AMQPAddress):
        self.client = client
        self.confirms = confirms
        self.address = address

    @classmethod
    def connect(cls, url: str | AMQPAddress, exchange: str = "towerws", reactor: Any = None,
                timeout: float = 10.0, heartbeat: int = 30, ca_file: str | None = None,
                cert_file: str | None = None, key_file: str | None = None) -> Deferred["Publisher"]:
        """Connect, log in and select confirm mode, all within ``timeout`` seconds.

        Fails with :class:`PublishError` (the password never in its message) when
        the broker cannot be reached or refuses the login.
        """
        if reactor is None:
            from twisted.internet import reactor
        txamqp_internals.install()  # idempotent; a publisher may be the process's only txAMQP user
        try:
            address = url if isinstance(url, AMQPAddress) else amqp_address(url)
        except ValueError as exc:
            return fail(ValueError(f"invalid AMQP URL: {exc}"))
        try:
            endpoint = broker_endpoint(reactor, address.host, address.port, address.tls, ca_file, cert_file, key_file)
        except ValueError as exc:  # an unreadable PEM file, named in the message
            return fail(exc)
        d = Deferred.fromCoroutine(cls._connect(address, endpoint, exchange, reactor, timeout, heartbeat))
        d.addTimeout(timeout, reactor)

        def timed_out(failure: Failure) -> Failure:
            if failure.check(TimeoutError):
                raise PublishError(f"no answer from the AMQP broker {address} within {timeout:g} s")
            return failure

        return d.addErrback(timed_out)

    @classmethod
    async def _connect(cls, address: AMQPAddress, endpoint: Any, exchange: str, reactor: Any, timeout: float,
                       heartbeat: int) -> "Publisher":
        # A publisher never consumes: every frame takes BrokerProtocol's generic path.
        client = BrokerProtocol(_no_delivery, address.vhost, heartbeat, reactor)
        try:
            await connectProtocol(endpoint, client)
        except CancelledError:
            raise
        except Exception as exc:
            raise PublishError(f"cannot connect to the AMQP broker {address}: {describe(exc)}") from None
        try:
            await client.start(address.login, mechanism="PLAIN")
            confirms = await Confirms.open(client, CHANNEL, exchange, reactor, timeout)
        except Exception as exc:
            client.transport.abortConnection()
            if isinstance(exc, CancelledError):
                raise  # the timeout: reported as such by connect()
            raise PublishError(f"AMQP setup on {address} failed: {describe(exc)}") from None
        return cls(client, confirms, address)

    def publish(self, group: str, body: bytes) -> Deferred[None]:
        """Publish ``body`` with routing key ``group``; fires once the broker confirms it."""
        try:
            check_message(group, body)
        except (TypeError, ValueError) as exc:
            return fail(exc)
        return self.confirms.publish(group, body)

    async def _close(self) -> None:
        try:
            await self.client.close(within=2)
        except Exception as exc:
            self.log.warn("closing the AMQP connection: {error}", error=describe(exc))
        self.client.transport.loseConnection()
        await self.client.lost

    def close(self) -> Deferred[None]:
        """Close the connection cleanly; messages not yet confirmed fail with PublishError."""
        return Deferred.fromCoroutine(self._close())


def _no_delivery(group: str, body: bytes, received: float) -> None:
    raise AssertionError("a publisher's connection consumes nothing")
