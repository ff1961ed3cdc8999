"""Publisher confirms over txAMQP: a publish is done when the broker says so.

txAMQP 0.8.2 has no handlers for the broker's ``basic.ack`` / ``basic.nack``
(``TwistedDelegate`` would fail on them and close the connection), so
:class:`ConfirmDelegate` adds them and routes each to the :class:`Confirms` of
its channel.  :class:`Confirms` numbers the messages published on a channel in
confirm mode (delivery tags count from 1 after ``confirm.select``) and fires
each one's Deferred when its tag is acknowledged, one by one or ``multiple``
up to a tag.  A nack, a channel closed by the broker, a lost connection or no
answer within the timeout fail the pending Deferreds with :class:`PublishError`.

Used by the node's own connection (:class:`towerws.amqp.service.AMQPService`,
for the HTTP publish API) and by :class:`towerws.amqp.publisher.Publisher`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Coroutine
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from txamqp.client import TwistedDelegate
from txamqp.content import Content

from towerws.bus import PublishError

PROPERTIES = {"content-type": "application/json", "delivery-mode": 1}


class Nacked(PublishError):
    """The broker refused (nacked) the message; the channel still works."""


class ChannelRefused(PublishError):
    """The broker closed the confirm-mode channel (``reply_code``, e.g. 404: no such exchange)."""

    def __init__(self, message: str, reply_code: int):
        super().__init__(message)
        self.reply_code = reply_code


class PublishAttempt:
    """One publish that may be sent several times (failover): why its last try failed, for its caller."""

    last_error = "not connected to a broker"


def confirmed_within(
    send: Callable[[float, PublishAttempt], Coroutine[Any, Any, None]], timeout: float, clock: IReactorTime
) -> Deferred[None]:
    """Run ``send(deadline, attempt)`` -- tries until a broker confirms -- bounded by ``timeout`` seconds.

    Fails with :class:`PublishError` naming the last try's problem when no broker
    node confirmed in time.
    """
    attempt = PublishAttempt()
    d = Deferred.fromCoroutine(send(clock.seconds() + timeout, attempt))
    d.addTimeout(timeout, clock)

    def timed_out(failure: Failure) -> Failure:
        if failure.check(TimeoutError):
            raise PublishError(f"no broker node confirmed the message within {timeout:g} s ({attempt.last_error})")
        return failure

    return d.addErrback(timed_out)


class Confirms:
    """The messages in flight on one confirm-mode channel, by delivery tag."""

    log = Logger()

    def __init__(self, channel: Any, exchange: str, clock: IReactorTime, timeout: float):
        self.channel = channel
        self.exchange = exchange
        self.clock = clock
        self.timeout = timeout
        #: tag -> Deferred, in ascending tag order (dicts keep insertion order)
        self._pending: dict[int, Deferred[None]] = {}
        self._tags = itertools.count(1)
        #: set once the channel is unusable; every later publish fails with it
        self.error: PublishError | None = None

    @classmethod
    async def open(cls, client: Any, channel_id: int, exchange: str, clock: IReactorTime,
                   timeout: float) -> "Confirms":
        """Open ``channel_id`` on ``client`` (whose delegate is a :class:`ConfirmDelegate`) in confirm mode."""
        channel = await client.channel(channel_id)
        await channel.channel_open()
        await channel.confirm_select()
        confirms = cls(channel, exchange, clock, timeout)
        client.delegate.confirms[channel_id] = confirms
        return confirms

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def publish(self, routing_key: str, body: bytes, timeout: float | None = None) -> Deferred[None]:
        """Send one message; the Deferred fires when the broker confirms it, fails with PublishError otherwise.

        ``timeout``: seconds to wait for the confirm (default: the channel's).
        """
        if self.error is not None:
            return fail(self.error)
        tag = next(self._tags)
        # Cancelling (the timeout does) forgets the tag; a late ack for it is ignored.
        d: Deferred[None] = Deferred(lambda _: self._pending.pop(tag, None))
        self._pending[tag] = d
        sent = self.channel.basic_publish(
            exchange=self.exchange, routing_key=routing_key, content=Content(body, properties=dict(PROPERTIES))
        )
        sent.addErrback(self._send_failed)
        seconds = self.timeout if timeout is None else timeout
        d.addTimeout(seconds, self.clock)
        d.addErrback(self._timed_out, seconds)
        return d

    def _send_failed(self, failure: Failure) -> None:
        self.fail(PublishError(f"cannot publish to exchange '{self.exchange}': {failure.getErrorMessage()}"))

    def _timed_out(self, failure: Failure, seconds: float) -> Failure:
        if failure.check(TimeoutError):
            raise PublishError(f"the broker did not confirm the message within {seconds:g} s")
        return failure

    def settle(self, tag: int, multiple: bool, ok: bool) -> None:
        """The broker acked (``ok``) or nacked ``tag`` (and, with ``multiple``, every tag before it)."""
        if multiple:
            tags = list(itertools.takewhile(lambda t: t <= tag, self._pending))
        else:
            tags = [tag] if tag in self._pending else []
        for t in tags:
            d = self._pending.pop(t)
            if ok:
                d.callback(None)
            else:
                d.errback(Nacked(f"the broker refused (nacked) the message for exchange '{self.exchange}'"))

    def fail(self, error: PublishError) -> None:
        """The channel is gone: fail every message in flight and every later publish."""
        if self.error is None:
            self.error = error
        pending, self._pending = self._pending, {}
        for d in pending.values():
            d.errback(error)


class ConfirmDelegate(TwistedDelegate):
    """``TwistedDelegate`` plus the broker's confirms (``basic.ack``/``basic.nack``) and their failures."""

    log = Logger()

    def __init__(self) -> None:
        super().__init__()
        self.confirms: dict[int, Confirms] = {}

    def basic_ack(self, ch: Any, msg: Any) -> None:
        self._settle(ch, msg, ok=True)

    def basic_nack(self, ch: Any, msg: Any) -> None:
        self._settle(ch, msg, ok=False)

    def _settle(self, ch: Any, msg: Any, ok: bool) -> None:
        confirms = self.confirms.get(ch.id)
        if confirms is None:
            self.log.warn("unexpected publisher confirm on AMQP channel {channel}", channel=ch.id)
            return
        confirms.settle(msg.delivery_tag, msg.multiple, ok)

    def channel_close(self, ch: Any, msg: Any) -> None:
        confirms = self.confirms.pop(ch.id, None)
        super().channel_close(ch, msg)
        if confirms is not None:
            # e.g. "404 NOT_FOUND - no exchange 'x' in vhost '/'"
            confirms.fail(ChannelRefused(f"the broker closed the publishing channel: {msg.reply_code} {msg.reply_text}",
                                         msg.reply_code))

    def close(self, reason: Any) -> None:
        confirms, self.confirms = self.confirms, {}
        for c in confirms.values():
            c.fail(PublishError("lost the connection to the AMQP broker before it confirmed the message"))
        super().close(reason)
