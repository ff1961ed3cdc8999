"""Limits that keep one client from hurting the others.

* :class:`TokenBucket` -- groups messages per second of one connection; it also
  says when the next token is due, so a message over the rate can wait for it.
* :class:`ConnectionLimits` -- open websockets in total and per user.

Both are plain bookkeeping on an injectable clock, so unit tests drive them with
``twisted.internet.task.Clock``; the websocket side turns their answers into
error replies and close codes.
"""

from __future__ import annotations

from collections import Counter

from twisted.internet.interfaces import IReactorTime

TOO_MANY_CONNECTIONS = "too many connections"
TOO_MANY_USER_CONNECTIONS = "too many connections for this user"


class TokenBucket:
    """``rate`` events per second on average, bursts of up to ``max(1, rate)``."""

    def __init__(self, rate: float, clock: IReactorTime):
        self._rate = rate
        self._capacity = max(1.0, rate)
        self._clock = clock
        self._tokens = self._capacity
        self._stamp = clock.seconds()

    def take(self) -> bool:
        """Spend one token if there is one; ``False`` means rate limited."""
        now = self._clock.seconds()
        self._tokens = min(self._capacity, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def next_token_due(self) -> float:
        """Seconds from now until :meth:`take` can succeed; ``0.0`` if it can now.

        A timer set for this delay may still find the bucket a hair short (the
        clock's float arithmetic); asking again then gives a tiny positive delay.
        """
        now = self._clock.seconds()
        tokens = min(self._capacity, self._tokens + (now - self._stamp) * self._rate)
        return 0.0 if tokens >= 1 else (1 - tokens) / self._rate


class ConnectionLimits:
    """Counts admitted connections; refuses the one over the total or per-user maximum."""

    def __init__(self, max_total: int, max_per_user: int):
        self.max_total = max_total
        self.max_per_user = max_per_user
        self.total = 0
        self._per_user: Counter[int] = Counter()

    def full(self) -> bool:
        """True when not even one more connection fits (checked before authenticating)."""
        return self.total >= self.max_total

    def admit(self, user_id: int) -> str | None:
        """Count a new connection of ``user_id``; the refusal reason if it does not fit."""
        if self.full():
            return TOO_MANY_CONNECTIONS
        if self._per_user[user_id] >= self.max_per_user:
            return TOO_MANY_USER_CONNECTIONS
        self.total += 1
        self._per_user[user_id] += 1
        return None

    def release(self, user_id: int) -> None:
        """An admitted connection of ``user_id`` is gone."""
        self.total -= 1
        self._per_user[user_id] -= 1
        if self._per_user[user_id] <= 0:
            del self._per_user[user_id]

    def of_user(self, user_id: int) -> int:
        return self._per_user[user_id]
