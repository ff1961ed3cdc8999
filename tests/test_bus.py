"""towerws.bus: the Bus interface and LocalBus, the broker-less bus (no reactor, no broker).

The publish contract every bus keeps: an invalid group or body fails (ValueError/TypeError)
before anything is delivered; a valid message reaches the hub's subscribers.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from towerws.bus import Bus, LocalBus
from towerws.hub import Hub
from towerws.messages import InvalidBody


class Sub:
    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def deliver(self, frame: bytes) -> None:
        self.frames.append(frame)


def fired(d: Deferred) -> Any:
    """What ``d`` already fired with (a Failure if it failed); fails the test if it has not fired."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    return out[0]


@pytest.fixture
def hub() -> Hub:
    return Hub(frame=lambda body: b"F" + body)


@pytest.fixture
def bus(hub: Hub) -> LocalBus:
    bus = LocalBus(hub)
    hub.listener = bus
    return bus


def test_local_bus_has_everything_the_bus_interface_declares(bus: LocalBus) -> None:
    declared = set(Bus.__annotations__) | {
        name for name, value in vars(Bus).items()
        if (callable(value) or isinstance(value, property)) and not name.startswith("_")
    }
    assert {"state", "ready", "broker", "bound_count", "publish", "when_bound", "when_ready"} <= declared
    missing = sorted(name for name in declared if not hasattr(bus, name))
    assert not missing, f"LocalBus lacks {missing}"


def test_broker_less_state(bus: LocalBus) -> None:
    assert (bus.state, bus.ready, bus.broker, bus.bound_count) == ("disabled", True, None, 0)
    assert (bus.consumed, bus.dropped) == (0, 0)


def test_subscriptions_and_readiness_need_no_wait(bus: LocalBus, hub: Hub) -> None:
    hub.set_groups(Sub(), ["jobs-summary"])  # group_activated: nothing to bind
    assert fired(bus.when_bound(["jobs-summary", "job_events-1"])) is None
    assert fired(bus.when_bound([])) is None
    assert fired(bus.when_ready()) is None
    assert bus.bound_count == 0


def test_a_valid_publish_reaches_the_hub(bus: LocalBus, hub: Hub) -> None:
    a, b, other = Sub(), Sub(), Sub()
    hub.set_groups(a, ["jobs-summary"])
    hub.set_groups(b, ["jobs-summary", "job_events-1"])
    hub.set_groups(other, ["job_events-2"])
    assert fired(bus.publish("jobs-summary", b'{"n": 1}')) is None
    assert a.frames == b.frames == [b'F{"n": 1}'] and other.frames == []
    assert bus.consumed == 1
    # A group without subscribers is accepted too (nobody gets it).
    assert fired(bus.publish("jobs-nobody", b"{}")) is None
    assert bus.consumed == 2 and bus.dropped == 0


@pytest.mark.parametrize("group, body, error", [
    ("", b"{}", ValueError),
    ("jobs summary", b"{}", ValueError),
    ("g" * 256, b"{}", ValueError),
    (7, b"{}", TypeError),
    ("jobs-summary", "{}", TypeError),
    ("jobs-summary", b"not json", InvalidBody),
    ("jobs-summary", b"NaN", InvalidBody),
    ("jobs-summary", b"\xff", InvalidBody),
])
def test_an_invalid_publish_fails_before_anything_is_delivered(
    bus: LocalBus, hub: Hub, group: Any, body: Any, error: type
) -> None:
    sub = Sub()
    hub.set_groups(sub, ["jobs-summary"])
    result = fired(bus.publish(group, body))
    assert isinstance(result, Failure) and result.check(error)
    assert sub.frames == [] and bus.consumed == 0 and bus.dropped == 0


def test_the_hub_tells_the_bus_and_it_stays_harmless(bus: LocalBus, hub: Hub) -> None:
    sub = Sub()
    hub.set_groups(sub, ["jobs-summary"])
    hub.remove(sub)  # group_deactivated
    assert hub.active_groups == frozenset() and bus.bound_count == 0
    assert fired(bus.publish("jobs-summary", b"{}")) is None and sub.frames == []


def test_local_bus_is_a_service(bus: LocalBus) -> None:
    bus.startService()
    assert bus.running and bus.state == "disabled"
    bus.stopService()
    assert not bus.running
