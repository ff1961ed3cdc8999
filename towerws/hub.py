"""The hub: who is subscribed to what, and the dispatch of one message to its group.

Pure bookkeeping, no I/O: group -> subscribers, subscriber -> groups, and a
listener told when a group gets its first local subscriber (``group_activated``)
or loses its last (``group_deactivated``) -- that is what drives AMQP bindings.

A message is validated and framed once, and the same bytes are handed to every
subscriber of its group (``deliver(frame)``), so a publish costs one framing plus
one write per subscriber, whatever the number of groups or connections.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from twisted.logger import Logger

from towerws.messages import check_body


class Subscriber(Protocol):
    def deliver(self, frame: bytes) -> None:
        """Write an already-framed message.  Must not raise for a closing connection."""


class GroupListener(Protocol):
    def group_activated(self, group: str) -> None: ...

    def group_deactivated(self, group: str) -> None: ...


@dataclass(frozen=True)
class Change:
    """The outcome of replacing a subscriber's groups; each list sorted."""

    current: list[str]
    joined: list[str]
    left: list[str]


class Hub:
    log = Logger()

    def __init__(self, frame: Callable[[bytes], bytes], listener: GroupListener | None = None):
        self._frame = frame
        self.listener = listener
        self._members: dict[str, set[Subscriber]] = {}
        self._groups: dict[Subscriber, frozenset[str]] = {}
        # Totals for the metrics, counted per message, never per subscriber.
        self.delivered_frames = 0
        self.delivered_bytes = 0

    # -- queries ---------------------------------------------------------------

    def groups_of(self, subscriber: Subscriber) -> frozenset[str]:
        return self._groups.get(subscriber, frozenset())

    def subscribers(self, group: str) -> frozenset[Subscriber]:
        return frozenset(self._members.get(group, ()))

    @property
    def active_groups(self) -> frozenset[str]:
        return frozenset(self._members)

    @property
    def group_count(self) -> int:
        """How many groups have a local subscriber (without copying them, for metrics)."""
        return len(self._members)

    @property
    def subscriber_count(self) -> int:
        return len(self._groups)

    # -- membership ------------------------------------------------------------

    def set_groups(self, subscriber: Subscriber, groups: Iterable[str]) -> Change:
        """Replace ``subscriber``'s groups with ``groups``."""
        new = frozenset(groups)
        old = self._groups.get(subscriber, frozenset())
        joined, left = new - old, old - new
        if new:
            self._groups[subscriber] = new
        else:
            self._groups.pop(subscriber, None)
        for group in joined:
            members = self._members.setdefault(group, set())
            members.add(subscriber)
            if len(members) == 1 and self.listener is not None:
                self.listener.group_activated(group)
        for group in left:
            self._leave(subscriber, group)
        return Change(sorted(new), sorted(joined), sorted(left))

    def remove(self, subscriber: Subscriber) -> list[str]:
        """Forget ``subscriber`` (its connection is gone); returns the groups it left."""
        return self.set_groups(subscriber, ()).left

    def _leave(self, subscriber: Subscriber, group: str) -> None:
        members = self._members[group]
        members.discard(subscriber)
        if not members:
            del self._members[group]
            if self.listener is not None:
                self.listener.group_deactivated(group)

    # -- dispatch --------------------------------------------------------------

    def publish(self, group: str, body: bytes) -> int:
        """Deliver ``body`` to every subscriber of ``group``; returns how many.

        Raises :class:`towerws.messages.InvalidBody` (and delivers nothing) for a
        body that is not UTF-8 RFC 8259 JSON.  A body for a group without subscribers is not even parsed.
        """
        members = self._members.get(group)
        if not members:
            return 0
        check_body(body)
        frame = self._frame(body)
        # A copy: a delivery may end in a disconnect that edits the set.
        targets = tuple(members)
        self.delivered_frames += len(targets)
        self.delivered_bytes += len(frame) * len(targets)
        for subscriber in targets:
            try:
                subscriber.deliver(frame)
            except Exception:
                # One broken subscriber must not cost the others their message.
                self.log.failure("delivery to {subscriber!r} failed", subscriber=subscriber)
        return len(targets)
