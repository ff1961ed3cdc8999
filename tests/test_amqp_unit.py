"""AMQP-side pieces without a broker: the ack frame, rate-limited logging, the Bindings state machine."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel

from towerws.amqp import Bindings, RateLimitedLog, ack_frame
from towerws.websocket import BrokerUnavailable


def test_ack_frame_is_basic_ack_multiple() -> None:
    frame = ack_frame(1, 258)
    assert frame[:7] == b"\x01\x00\x01\x00\x00\x00\x0d"  # method frame, channel 1, 13 bytes
    assert frame[7:11] == b"\x00\x3c\x00\x50"  # basic.ack
    assert int.from_bytes(frame[11:19], "big") == 258
    assert frame[19:] == b"\x01\xce"  # multiple=true, frame end


def test_rate_limited_log_holds_back_and_counts() -> None:
    events: list[dict] = []
    clock = Clock()
    limited = RateLimitedLog(Logger(observer=events.append), clock, interval=10)
    for _ in range(5):
        limited.warn("bad body for {group}", group="g")
    clock.advance(10)
    limited.warn("bad body for {group}", group="g")
    assert len(events) == 2
    assert events[0]["log_level"] == LogLevel.warn and events[0]["suppressed"] == 0
    assert events[1]["suppressed"] == 4


class FakeChannel:
    """Records bind/unbind calls; the test answers them in order, like a broker."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Deferred]] = []

    def queue_bind(self, queue: str, exchange: str, routing_key: str) -> Deferred:
        d: Deferred = Deferred()
        self.calls.append(("bind", routing_key, d))
        return d

    def queue_unbind(self, queue: str, exchange: str, routing_key: str) -> Deferred:
        d: Deferred = Deferred()
        self.calls.append(("unbind", routing_key, d))
        return d

    def answer_all(self) -> list[tuple[str, str]]:
        done = []
        while self.calls:
            op, key, d = self.calls.pop(0)
            done.append((op, key))
            d.callback(None)
        return done


def make(grace: float = 0) -> tuple[Bindings, FakeChannel, Clock]:
    clock = Clock()
    bindings = Bindings("ex", "q", clock, grace=grace, timeout=5)
    channel = FakeChannel()
    bindings.attach(channel)
    return bindings, channel, clock


def test_bind_unbind_bind_burst_ends_bound_with_one_op_in_flight() -> None:
    bindings, channel, _ = make()
    bindings.group_activated("g-1")
    bindings.group_deactivated("g-1")
    bindings.group_activated("g-1")
    assert [c[:2] for c in channel.calls] == [("bind", "g-1")]  # nothing overlaps
    assert channel.answer_all() == [("bind", "g-1")]
    assert bindings.bound == {"g-1"}


def test_unbind_waits_for_the_grace_period() -> None:
    bindings, channel, clock = make(grace=5)
    bindings.group_activated("g-1")
    channel.answer_all()
    bindings.group_deactivated("g-1")
    clock.advance(4)
    bindings.group_activated("g-1")  # back within the grace: no churn
    clock.advance(10)
    assert channel.calls == []
    bindings.group_deactivated("g-1")
    clock.advance(5)
    assert channel.answer_all() == [("unbind", "g-1")]
    assert bindings.bound == set()


def test_when_bound_fires_after_the_binding_and_times_out_without_broker() -> None:
    bindings, channel, clock = make()
    bindings.group_activated("g-1")
    d = bindings.when_bound(["g-1"])
    assert not d.called
    channel.answer_all()
    assert d.called
    bindings.detach()  # broker gone
    bindings.group_activated("g-2")
    late = bindings.when_bound(["g-2"])
    failures: list = []
    late.addErrback(failures.append)
    clock.advance(5)
    assert failures and failures[0].check(BrokerUnavailable)
    # The subscription is kept: the group is bound once a channel is back.
    bindings.attach(channel)
    assert ("bind", "g-2") in channel.answer_all()


def test_reattach_rebinds_wanted_and_unbinds_leftovers() -> None:
    bindings, channel, _ = make()
    for g in ("g-1", "g-2"):
        bindings.group_activated(g)
    channel.answer_all()
    bindings.detach()
    bindings.group_deactivated("g-2")  # left while the broker was away
    new_channel = FakeChannel()
    bindings.attach(new_channel)
    assert sorted(new_channel.answer_all()) == [("bind", "g-1"), ("unbind", "g-2")]
    assert bindings.bound == {"g-1"}


def test_answer_from_an_old_channel_is_ignored() -> None:
    bindings, old, _ = make()
    bindings.group_activated("g-1")
    new = FakeChannel()
    bindings.attach(new)
    old.answer_all()  # late reply from the dead channel
    assert bindings.bound == set()
    new.answer_all()
    assert bindings.bound == {"g-1"}
