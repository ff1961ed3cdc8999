"""Every use of pika beyond its documented API, in one place (the synchronous emitter's).

``BlockingChannel.basic_publish`` in confirm mode, like every call of pika's
blocking adapter, waits for the broker's answer with no time limit of its own:
a hung broker node (its kernel still ACKing, its VM stopped) would hold the
caller until heartbeats notice, a minute or more.  pika's own timers (the
heartbeat checker, the blocked-connection timeout) end such a wait by
terminating the stream with an error, from a timer of the connection's I/O
loop, which the blocking adapter runs while it waits; :class:`Watchdog` does
the same with a deadline of the emitter's.

* :class:`Watchdog` -- ``connection._impl`` (the ``SelectConnection`` inside a
  ``BlockingConnection``), its ``_adapter_call_later`` /
  ``_adapter_remove_timeout`` (pika's timers) and ``_terminate_stream(error)``
  (how pika itself aborts a connection, making the waiting call raise ``error``).
* :class:`Blocked` -- the ``connection.blocked`` / ``unblocked`` notices, which
  the blocking adapter only hands on from ``process_data_events``: the inner
  connection's callbacks run while a publish waits, when the watchdog asks.

Tripwires: ``tests/test_internals.py`` (the names) and
``tests/test_emit.py::test_hung_node_mid_publish_costs_one_attempt_timeout``
(the behaviour).  ``setup.cfg``'s ``emit`` extra allows pika's 1.x series, whose
releases have all had these names.
"""

from __future__ import annotations

from typing import Any

import pika
import pika.exceptions


class NoAnswer(pika.exceptions.AMQPConnectionError):
    """The watchdog ended the connection: the broker did not answer within the try's time."""


class Blocked:
    """Whether the broker has blocked ``connection`` (``connection.blocked``: a resource alarm) right now."""

    def __init__(self, connection: pika.BlockingConnection) -> None:
        self.now = False
        connection._impl.add_on_connection_blocked_callback(self._on_blocked)
        connection._impl.add_on_connection_unblocked_callback(self._on_unblocked)

    def _on_blocked(self, *_: Any) -> None:
        self.now = True

    def _on_unblocked(self, *_: Any) -> None:
        self.now = False


class Watchdog:
    """Ends ``connection`` unless disarmed within ``seconds``: the pika call waiting then raises.

    It raises :class:`NoAnswer`, or ``ConnectionBlockedTimeout`` when the broker
    had blocked the connection (``blocked``), as pika's own blocked timer would.
    """

    def __init__(self, connection: pika.BlockingConnection, seconds: float, blocked: Blocked) -> None:
        self._impl = connection._impl
        self._blocked = blocked
        self._seconds = seconds
        self._timer: object | None = self._impl._adapter_call_later(seconds, self._expire)

    def _expire(self) -> None:
        self._timer = None
        if self._blocked.now:
            error: Exception = pika.exceptions.ConnectionBlockedTimeout("blocked by the broker (resource alarm)")
        else:
            error = NoAnswer(f"no answer from the broker within {self._seconds:.3g} s")
        self._impl._terminate_stream(error)

    def disarm(self) -> None:
        if self._timer is not None:
            timer, self._timer = self._timer, None
            self._impl._adapter_remove_timeout(timer)
