"""The node's message bus: what the rest of towerws asks of it, and the broker-less one.

Two implementations share :class:`NodeBus`:

* :class:`towerws.amqp.AMQPService` -- RabbitMQ: every node gets every message
  published to the exchange; ``state`` is ``connecting`` or ``consuming``.
* :class:`LocalBus` (``--amqp-url none``) -- one node, no broker: a publish goes
  straight to the hub, a subscription can receive at once; ``state`` is ``disabled``.

The websocket side waits on ``when_bound``; the HTTP publish API and in-process
Twisted code call ``publish``; readiness reports read ``state`` and ``ready``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed

from towerws.hub import Hub, check_json_body
from towerws.routing import check_group


class NodeBus(Protocol):
    #: "disabled" (no broker), "connecting" or "consuming"
    state: str
    #: True once subscriptions can receive and publishes can be confirmed
    ready: bool

    def when_bound(self, groups: list[str]) -> Deferred[None]:
        """Fires once every group can receive (see :class:`towerws.websocket.Bus`)."""

    def when_ready(self) -> Deferred[None]:
        """Fires once the bus is ready (at once if it is)."""

    def publish(self, group: str, body: bytes) -> Deferred[None]:
        """Publish one UTF-8 JSON ``body`` to ``group``'s subscribers on every node of the bus.

        Fires once the message is accepted (with RabbitMQ: confirmed by the broker);
        fails with ValueError for an invalid group or body (nothing sent) and with
        :class:`towerws.confirms.PublishError` when the broker is down or refuses.
        """


def check_message(group: str, body: bytes) -> None:
    """Raise TypeError/ValueError unless ``body`` (UTF-8 JSON bytes) can be published to ``group``."""
    check_group(group)
    if not isinstance(body, bytes):
        raise TypeError(f"body must be bytes, not {type(body).__name__}")
    check_json_body(body)


class LocalBus(Service):
    """The single-node, in-process bus of broker-less mode."""

    state = "disabled"
    ready = True

    def __init__(self, hub: Hub):
        self.hub = hub
        self.consumed = 0
        self.dropped = 0  # stays 0: invalid bodies are refused at publish time

    def when_bound(self, groups: Iterable[str]) -> Deferred[None]:
        return succeed(None)

    def when_ready(self) -> Deferred[None]:
        return succeed(None)

    def publish(self, group: str, body: bytes) -> Deferred[None]:
        try:
            check_message(group, body)
        except (TypeError, ValueError) as exc:
            return fail(exc)
        self.consumed += 1
        self.hub.publish(group, body)
        return succeed(None)
