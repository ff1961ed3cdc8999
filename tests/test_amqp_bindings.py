"""towerws.amqp.bindings without a broker: the per-group state machine, waits, timeouts, re-binding."""

from __future__ import annotations


from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from amqphelpers import fired
from logcapture import LogCapture
from towerws.amqp.bindings import Bindings
from towerws.bus import BrokerUnavailable

# -- Bindings ----------------------------------------------------------------------------------


class FakeChannel:
    """Records queue_bind / queue_unbind; the test answers each one."""

    def __init__(self) -> None:
        self.ops: list[tuple[str, str, Deferred]] = []

    def queue_bind(self, queue: str, exchange: str, routing_key: str) -> Deferred:
        return self._op("bind", routing_key)

    def queue_unbind(self, queue: str, exchange: str, routing_key: str) -> Deferred:
        return self._op("unbind", routing_key)

    def _op(self, op: str, group: str) -> Deferred:
        d: Deferred = Deferred()
        self.ops.append((op, group, d))
        return d

    def pending(self) -> list[tuple[str, str]]:
        return [(op, g) for op, g, d in self.ops if not d.called]

    def answer(self, n: int = 1) -> None:
        for _, _, d in [o for o in self.ops if not o[2].called][:n]:
            d.callback(None)


def make_bindings(grace: float = 5.0, timeout: float = 10.0) -> tuple[Bindings, FakeChannel, Clock]:
    clock = Clock()
    b = Bindings("ex", "q", clock, grace=grace, timeout=timeout)
    ch = FakeChannel()
    b.attach([ch], kept=False)
    return b, ch, clock




def test_reply_waits_for_the_bind() -> None:
    b, ch, _ = make_bindings()
    b.group_activated("g")
    d = b.when_bound(["g"])
    assert ch.pending() == [("bind", "g")] and not d.called
    ch.answer()
    assert d.called and b.bound == {"g"}
    assert fired(b.when_bound(["g"])) is None  # bound: at once


def test_unbind_only_after_grace_and_not_if_resubscribed() -> None:
    b, ch, clock = make_bindings(grace=5)
    b.group_activated("g")
    ch.answer()
    b.group_deactivated("g")
    clock.advance(4.9)
    assert ch.pending() == []  # still bound within the grace period
    b.group_activated("g")  # the UI navigated back
    clock.advance(10)
    assert ch.pending() == [] and b.bound == {"g"}
    b.group_deactivated("g")
    clock.advance(5)
    assert ch.pending() == [("unbind", "g")]
    ch.answer()
    assert b.bound == set()


def test_burst_ends_bound_with_one_operation_at_a_time() -> None:
    b, ch, _ = make_bindings(grace=0)
    b.group_activated("g")
    b.group_deactivated("g")
    b.group_activated("g")
    assert ch.pending() == [("bind", "g")]
    ch.answer()
    assert ch.pending() == []  # wanted again before the bind answered: nothing to undo
    b.group_deactivated("g")
    b.group_activated("g")
    assert ch.pending() == [("unbind", "g")]
    ch.answer()
    assert ch.pending() == [("bind", "g")]
    ch.answer()
    assert b.bound == {"g"} and ch.pending() == []


def test_reply_during_an_unbind_waits_for_the_rebind() -> None:
    # Regression: a group "bound" with its unbind in flight looked ready, so a
    # reply went out while the queue was about to lose the binding.
    b, ch, _ = make_bindings(grace=0)
    b.group_activated("g")
    ch.answer()
    b.group_deactivated("g")  # unbind in flight
    b.group_activated("g")  # a new subscriber
    d = b.when_bound(["g"])
    ch.answer()  # unbind-ok
    assert not d.called
    assert ch.pending() == [("bind", "g")]
    ch.answer()
    assert d.called and fired(d) is None


def test_timeout_says_unavailable_and_keeps_the_subscription() -> None:
    clock = Clock()
    b = Bindings("ex", "q", clock, grace=5, timeout=2)
    b.group_activated("g")  # no channel: the broker is away
    d = b.when_bound(["g"])
    clock.advance(2)
    assert isinstance(fired(d).value, BrokerUnavailable)
    ch = FakeChannel()
    b.attach([ch], kept=False)  # the broker is back
    assert ch.pending() == [("bind", "g")]


def _drop_with_changes(b: Bindings, ch: FakeChannel, clock: Clock) -> None:
    """a, b, c bound; b left (in grace), d's bind in flight when the connection drops; c left and b, c's grace
    ends while disconnected."""
    for g in ("a", "b", "c"):
        b.group_activated(g)
    ch.answer(3)
    b.group_deactivated("b")  # in grace: still wanted bound
    b.group_activated("d")  # bind in flight when the connection drops
    b.detach()
    b.group_deactivated("c")
    clock.advance(5)  # grace over while disconnected


def test_a_kept_queue_binds_only_what_is_missing_and_unbinds_leftovers() -> None:
    b, ch, clock = make_bindings(grace=5)
    _drop_with_changes(b, ch, clock)
    ch2 = FakeChannel()
    b.attach([ch2], kept=True)
    # "a" is still bound on the queue that outlived the connection: no operation for it.
    assert sorted(ch2.pending()) == [("bind", "d"), ("unbind", "b"), ("unbind", "c")]
    assert fired(b.when_bound(["a"])) is None
    ch.answer()  # the old connection's late answer changes nothing
    ch2.answer(3)
    assert b.bound == {"a", "d"}


def test_a_new_queue_binds_everything_wanted() -> None:
    b, ch, clock = make_bindings(grace=5)
    _drop_with_changes(b, ch, clock)
    ch2 = FakeChannel()
    b.attach([ch2], kept=False)  # e.g. it expired while this node was away: no bindings at all
    assert sorted(ch2.pending()) == [("bind", "a"), ("bind", "d")]
    ch2.answer(2)
    assert b.bound == {"a", "d"}


def test_operations_are_pipelined_over_the_channels_one_channel_per_group() -> None:
    clock = Clock()
    b = Bindings("ex", "q", clock, grace=0, timeout=10, window=100)
    channels = [FakeChannel() for _ in range(4)]
    b.attach(channels, kept=False)
    groups = [f"job_events-{i}" for i in range(400)]
    for g in groups:
        b.group_activated(g)

    def in_flight() -> int:
        return sum(len(c.pending()) for c in channels)

    # A window of them in flight at once, spread over all channels; the rest wait their turn.
    assert in_flight() == 100 and all(c.pending() for c in channels)
    b.group_deactivated(groups[-1])  # a queued group nobody wants any more: never bound
    while in_flight():
        for c in channels:
            c.answer(1000)
        assert in_flight() <= 100
    assert b.bound == set(groups[:-1])
    b.group_deactivated(groups[0])
    b.group_activated(groups[0])
    # The unbind and the re-bind of one group go to the same channel (in order), one after the other.
    (home,) = [c for c in channels if c.pending()]
    assert home.pending() == [("unbind", groups[0])]
    home.answer()
    assert home.pending() == [("bind", groups[0])]


def test_failed_operation_asks_for_a_new_connection() -> None:
    b, ch, _ = make_bindings()
    dropped = []
    b.on_error = lambda: dropped.append(True)
    b.group_activated("g")
    with LogCapture() as log:
        ch.ops[0][2].errback(Failure(ValueError("boom")))
    assert dropped == [True]
    assert log.count("AMQP bind of group g failed: ValueError: boom; reconnecting") == 1
