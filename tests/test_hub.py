"""The hub without a reactor: membership, activation events, dispatch."""

from __future__ import annotations

import pytest

from towerws.hub import Hub
from towerws.messages import InvalidBody


class Sub:
    def __init__(self, name: str, fail: bool = False):
        self.name, self.fail, self.frames = name, fail, []

    def deliver(self, frame: bytes) -> None:
        if self.fail:
            raise RuntimeError("transport gone")
        self.frames.append(frame)

    def __repr__(self) -> str:
        return self.name


class Events:
    def __init__(self) -> None:
        self.log: list[tuple[str, str]] = []

    def group_activated(self, group: str) -> None:
        self.log.append(("+", group))

    def group_deactivated(self, group: str) -> None:
        self.log.append(("-", group))


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
def hub(events: Events) -> Hub:
    return Hub(frame=lambda body: b"F" + body, listener=events)


def test_set_groups_replaces_and_reports_sorted_changes(hub: Hub) -> None:
    a = Sub("a")
    change = hub.set_groups(a, ["jobs-summary", "job_events-2", "job_events-10"])
    assert change.joined == ["job_events-10", "job_events-2", "jobs-summary"]
    assert change.left == []
    change = hub.set_groups(a, ["job_events-2", "schedules-changed"])
    assert change.current == ["job_events-2", "schedules-changed"]
    assert change.joined == ["schedules-changed"]
    assert change.left == ["job_events-10", "jobs-summary"]
    assert hub.groups_of(a) == {"job_events-2", "schedules-changed"}


def test_activation_only_on_first_and_last_subscriber(hub: Hub, events: Events) -> None:
    a, b = Sub("a"), Sub("b")
    hub.set_groups(a, ["g-1"])
    hub.set_groups(b, ["g-1", "g-2"])
    assert events.log == [("+", "g-1"), ("+", "g-2")]
    hub.set_groups(a, [])
    assert events.log[-1] == ("+", "g-2")  # b still holds g-1
    assert hub.remove(b) == ["g-1", "g-2"]
    assert sorted(events.log[2:]) == [("-", "g-1"), ("-", "g-2")]
    assert hub.active_groups == frozenset()
    assert hub.subscriber_count == 0


def test_publish_frames_once_and_reaches_only_the_group() -> None:
    framed = []
    hub = Hub(frame=lambda body: framed.append(body) or b"F" + body)
    a, b, c = Sub("a"), Sub("b"), Sub("c")
    hub.set_groups(a, ["g-1"])
    hub.set_groups(b, ["g-1", "g-2"])
    hub.set_groups(c, ["g-2"])
    assert hub.publish("g-1", b'{"x": 1}') == 2
    assert a.frames == [b'F{"x": 1}'] and b.frames == [b'F{"x": 1}'] and c.frames == []
    assert framed == [b'{"x": 1}']
    # The very same bytes object goes to every subscriber: no per-subscriber copy.
    assert a.frames[0] is b.frames[0]


def test_publish_to_group_without_subscribers_does_not_parse(hub: Hub) -> None:
    assert hub.publish("nobody-1", b"not json") == 0


@pytest.mark.parametrize("body", [b"", b"{", b"\xff\xfe", b"[" * 100000, b'{"a": 1} trailing'])
def test_publish_rejects_invalid_bodies(hub: Hub, body: bytes) -> None:
    a = Sub("a")
    hub.set_groups(a, ["g-1"])
    with pytest.raises(InvalidBody):
        hub.publish("g-1", body)
    assert a.frames == []


def test_one_failing_subscriber_does_not_stop_the_others(hub: Hub) -> None:
    good1, bad, good2 = Sub("good1"), Sub("bad", fail=True), Sub("good2")
    for s in (good1, bad, good2):
        hub.set_groups(s, ["g-1"])
    assert hub.publish("g-1", b"1") == 3
    assert good1.frames == [b"F1"] and good2.frames == [b"F1"]


def test_subscriber_removed_during_dispatch(hub: Hub) -> None:
    class Leaver(Sub):
        def deliver(self, frame: bytes) -> None:
            super().deliver(frame)
            hub.remove(self)

    subs = [Leaver("l1"), Sub("s"), Leaver("l2")]
    for s in subs:
        hub.set_groups(s, ["g-1"])
    assert hub.publish("g-1", b"2") == 3
    assert all(s.frames == [b"F2"] for s in subs)
    assert hub.subscribers("g-1") == {subs[1]}


def test_group_count_counts_groups_with_subscribers() -> None:
    hub = Hub(frame=lambda body: body)
    a, b = object(), object()
    hub.set_groups(a, ["g1", "g2"])  # type: ignore[arg-type]
    hub.set_groups(b, ["g2", "g3"])  # type: ignore[arg-type]
    assert hub.group_count == 3 == len(hub.active_groups)
    hub.remove(a)  # type: ignore[arg-type]
    assert hub.group_count == 2
