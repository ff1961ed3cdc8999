"""The node queue's bindings, kept equal to the groups with local subscribers.

:class:`Bindings` binds the queue to each group the hub reports active and
unbinds it a grace period after the group's last subscriber left; one operation
in flight per group (replies on a channel come in order, but a bind-unbind-bind
burst must end bound), re-applied on every new channel.  A groups reply waits
on :meth:`Bindings.when_bound` for its own groups, bounded by ``bind_timeout``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from towerws.amqp.endpoint import describe
from towerws.bus import BrokerUnavailable


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
