"""The node's message bus: the one seam where the websocket wing and the AMQP wing meet.

:class:`Bus` declares everything the rest of towerws asks of a bus; two
implementations exist:

* :class:`towerws.amqp.service.AMQPService` -- RabbitMQ: every node gets every
  message published to the exchange; ``state`` is ``connecting`` or ``consuming``.
* :class:`LocalBus` (``--amqp-url none``) -- one node, no broker: a publish goes
  straight to the hub, a subscription can receive at once; ``state`` is ``disabled``.

The hub tells the bus when a group gets its first local subscriber or loses its
last (the bus is the hub's :class:`~towerws.hub.GroupListener`); the websocket
side waits on ``when_bound``; the HTTP publish API and in-process Twisted code
call ``publish``; readiness reports and metrics read the rest.

The publish contract is the same for every bus: the group and body are checked
first (:func:`towerws.messages.check_message`; ``ValueError``/``TypeError``,
nothing sent), then the message is sent and the Deferred fires once it is
accepted -- with RabbitMQ, confirmed by the broker -- or fails with
:class:`PublishError`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed

from towerws.hub import Hub
from towerws.messages import check_message


class BrokerUnavailable(Exception):
    """The broker could not confirm a binding in time; the subscription is kept."""


class PublishError(Exception):
    """The broker did not confirm a message: refused (nack), unreachable, or no answer in time."""


class Bus(Protocol):
    """What towerws asks of its message bus (see the module docstring)."""

    # Read-only properties: an implementation may use plain attributes or properties.

    @property
    def state(self) -> str:
        """"disabled" (no broker), "connecting", "consuming", "stopping" or "stopped"."""

    @property
    def ready(self) -> bool:
        """True once subscriptions can receive and publishes can be confirmed."""

    @property
    def consumed(self) -> int:
        """Messages taken from the bus (consumed from this node's queue)."""

    @property
    def dropped(self) -> int:
        """Messages dropped: a body that is not UTF-8 RFC 8259 JSON, or a dispatch that failed."""

    @property
    def bound_count(self) -> int:
        """Groups this node's queue is bound to (0 without a broker)."""

    @property
    def broker(self) -> str | None:
        """``host:port`` of the broker node in use (None without one, or while connecting)."""

    # -- the hub's listener ------------------------------------------------------

    def group_activated(self, group: str) -> None:
        """``group`` got its first local subscriber: start receiving it."""

    def group_deactivated(self, group: str) -> None:
        """``group`` lost its last local subscriber: stop receiving it (perhaps after a grace period)."""

    # -- the websocket side --------------------------------------------------------

    def when_bound(self, groups: Iterable[str]) -> Deferred[None]:
        """Fires once every group can receive; fails with :class:`BrokerUnavailable`."""

    def when_ready(self) -> Deferred[None]:
        """Fires once the bus is ready (at once if it is)."""

    def publish(self, group: str, body: bytes) -> Deferred[None]:
        """Publish one UTF-8 JSON ``body`` to ``group``'s subscribers on every node of the bus (see above)."""

    # -- life cycle (twisted.application.service.IService) -----------------------------

    running: int

    def setServiceParent(self, parent: Any) -> Any: ...

    def startService(self) -> None: ...

    def stopService(self) -> Deferred[None] | None: ...


class LocalBus(Service):
    """The single-node, in-process bus of broker-less mode."""

    state = "disabled"
    ready = True
    bound_count = 0
    broker: str | None = None

    def __init__(self, hub: Hub):
        self.hub = hub
        self.consumed = 0
        self.dropped = 0  # stays 0: invalid bodies are refused at publish time

    def group_activated(self, group: str) -> None:
        pass  # nothing to bind: every publish reaches the hub

    def group_deactivated(self, group: str) -> None:
        pass

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
