"""towerws.websocket.protocol without a network: options, producer registration, the slow-consumer bound, and
groups messages in a hurry (the last one wins, within the rate, in bounded memory).

Which first requests reach this protocol at all: ``test_websocket_web.py``."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest

from autobahn.twisted.websocket import WebSocketServerProtocol
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from conftest import ws_frame
from towerws.auth import AllowAll, Credentials, Decision, StaticTokenAuthenticator, User
from towerws.bus import LocalBus
from towerws.config import load
from towerws.hub import Hub
from towerws.websocket.protocol import (
    CLOSE_TRY_AGAIN_LATER, SUPERSEDED, TowerFactory, TowerProtocol, text_frame,
)


def make_protocol(**options: str) -> tuple[TowerProtocol, StringTransport]:
    settings = load({"max_message_size": "1234", "ping_interval": "7", **options}, environ={})
    hub = Hub(text_frame)
    factory = TowerFactory(settings, hub, LocalBus(hub), StaticTokenAuthenticator({}), AllowAll(), Clock())
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_options_live_on_the_protocol_class_not_in_each_connection() -> None:
    protocol, _ = make_protocol()
    assert protocol.maxMessagePayloadSize == 1234 and protocol.autoPingInterval == 7.0
    assert protocol.failByDrop is False
    # Nothing of Autobahn's ~40 options was copied into the connection's own dict.
    assert not set(WebSocketServerProtocol.CONFIG_ATTRS) & set(vars(protocol))
    # A callable option stays a plain function (not bound to the connection).
    assert protocol.perMessageCompressionAccept([]) is None


def test_the_protocol_is_its_transports_streaming_producer() -> None:
    protocol, transport = make_protocol()
    assert transport.producer is protocol and transport.streaming is True


def open_protocol(limit: int = 4 * 1024 * 1024) -> tuple[TowerProtocol, StringTransport, Clock]:
    protocol, transport = make_protocol(max_pending_bytes=str(limit))
    protocol.state = protocol.STATE_OPEN
    protocol.conn_id, protocol.user = 1, User(7, "alice")
    transport.clear()
    return protocol, transport, protocol.factory.clock


FRAME = text_frame(json.dumps({"x": "y" * 30}).encode())  # 43 bytes


def test_deliveries_of_one_reactor_turn_are_written_once_at_its_end() -> None:
    protocol, transport, clock = open_protocol()
    writes: list[bytes] = []
    transport.write = writes.append  # type: ignore[method-assign]
    for _ in range(3):
        protocol.deliver(FRAME)
    assert writes == []
    clock.advance(0)
    assert writes == [FRAME * 3]


def test_a_reply_never_overtakes_queued_deliveries() -> None:
    protocol, transport, clock = open_protocol()
    protocol.deliver(FRAME)
    protocol.send_json({"groups_current": []})
    assert transport.value().startswith(FRAME) and b"groups_current" in transport.value()[len(FRAME):]
    clock.advance(0)  # nothing left to flush
    assert transport.value().count(FRAME) == 1


def test_bytes_queued_while_paused_are_bounded_then_1013() -> None:
    protocol, transport, clock = open_protocol(limit=100)
    protocol.pauseProducing()  # the transport's buffer is full
    protocol.deliver(FRAME)
    protocol.deliver(FRAME)
    protocol.deliver(FRAME)  # 129 > 100: this one is not queued; the close is
    assert transport.value().startswith(FRAME * 2)  # the close goes after what was queued
    close = transport.value()[len(FRAME) * 2:]
    assert close[0] == 0x88 and int.from_bytes(close[2:4], "big") == CLOSE_TRY_AGAIN_LATER
    assert protocol.factory.metrics.registry.get_sample_value("towerws_slow_client_disconnects_total") == 1
    transport.clear()
    protocol.deliver(FRAME)  # closing: nothing more is queued
    clock.advance(0)
    assert transport.value() == b""


def test_an_emptied_buffer_starts_the_count_again() -> None:
    protocol, transport, clock = open_protocol(limit=100)
    for _ in range(10):  # 430 bytes in all, never more than 86 while paused
        protocol.pauseProducing()
        protocol.deliver(FRAME)
        protocol.deliver(FRAME)
        clock.advance(0)
        protocol.resumeProducing()
    assert transport.value() == FRAME * 20
    assert protocol.state == protocol.STATE_OPEN


# -- groups messages: the last one always wins -------------------------------------------------------
#
# A real TowerProtocol on a StringTransport, fed a real client handshake and masked
# client frames (so Autobahn's own path reaches onMessage), on a Clock.


class HeldAuthorizer:
    """An authorizer whose answers wait until the test releases them (a slow Tower API)."""

    def __init__(self) -> None:
        self.asked: list[frozenset[str]] = []
        self._held: list[tuple[Deferred[Decision], frozenset[str]]] = []

    def authorize(self, user: User, credentials: Credentials, groups: frozenset[str]) -> Deferred[Decision]:
        self.asked.append(groups)
        d: Deferred[Decision] = Deferred()
        self._held.append((d, groups))
        return d

    def release(self) -> None:
        held, self._held = self._held, []
        for d, groups in held:
            d.callback(Decision(allowed=groups))


HANDSHAKE = (b"GET /websocket/?token=t HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each unmasked server frame in ``data``."""
    frames = []
    while data:
        opcode, n, at = data[0] & 0x0F, data[1] & 0x7F, 2
        if n == 126:
            n, at = struct.unpack("!H", data[2:4])[0], 4
        elif n == 127:
            n, at = struct.unpack("!Q", data[2:10])[0], 10
        frames.append((opcode, data[at:at + n]))
        data = data[at + n:]
    return frames


class Peer:
    """One admitted connection; ``send`` feeds client frames, ``answers`` reads what the server wrote."""

    def __init__(self, rate: float = 5, authorizer: Any = None, **options: str) -> None:
        settings = load({"max_groups_messages_per_second": str(rate), "ping_interval": "0", **options}, environ={})
        self.clock = Clock()
        self.hub = Hub(text_frame)
        self.factory = TowerFactory(settings, self.hub, LocalBus(self.hub),
                                    StaticTokenAuthenticator({"t": User(7, "alice")}), authorizer or AllowAll(),
                                    self.clock)
        self.protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.protocol.dataReceived(HANDSHAKE)
        head, _, rest = self.transport.value().partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 ")
        self.transport.clear()
        self.unread = rest
        assert self.answers() == [{"accept": True, "user": 7}]

    def send(self, groups: dict[str, list[Any]]) -> None:
        self.protocol.dataReceived(ws_frame(True, 0, 1, True, json.dumps({"groups": groups}).encode()))

    def answers(self) -> list[Any]:
        """Every text frame written since the last call (the end of this reactor turn included)."""
        self.clock.advance(0)  # the outbox is written at the end of the turn
        data, self.unread = self.unread + self.transport.value(), b""
        self.transport.clear()
        return [json.loads(payload) for opcode, payload in server_frames(data) if opcode == 1]

    def groups(self) -> set[str]:
        return set(self.hub.groups_of(self.protocol))

    def outcome(self, name: str) -> float:
        value = self.factory.metrics.registry.get_sample_value("towerws_subscribe_requests_total", {"outcome": name})
        return value or 0.0


def reply(current: list[str], left: list[str] = (), joined: list[str] = ()) -> dict:  # type: ignore[assignment]
    return {"groups_current": current, "groups_left": list(left), "groups_joined": list(joined)}


def test_a_burst_over_the_rate_ends_in_the_last_set() -> None:
    peer = Peer(rate=2)  # bursts of 2, then one every 0.5 s
    for i in range(1, 7):
        peer.send({"job_events": [i]})
    # 1 and 2 within the burst; 3 waits for a token and is superseded by 4, 4 by 5, 5 by 6.
    assert peer.answers() == [
        reply(["job_events-1"], joined=["job_events-1"]),
        reply(["job_events-2"], left=["job_events-1"], joined=["job_events-2"]),
        SUPERSEDED, SUPERSEDED, SUPERSEDED,
    ]
    assert peer.groups() == {"job_events-2"}
    peer.clock.advance(0.5)
    assert peer.answers() == [reply(["job_events-6"], left=["job_events-2"], joined=["job_events-6"])]
    assert peer.groups() == {"job_events-6"}
    assert (peer.outcome("ok"), peer.outcome("superseded")) == (3, 3)
    assert peer.clock.getDelayedCalls() == []


def test_a_waiting_message_is_handled_when_the_bucket_has_a_token() -> None:
    peer = Peer(rate=0.5)  # one now, the next in 2 s
    peer.send({"jobs": ["summary"]})
    peer.send({"jobs": ["status_changed"]})
    assert peer.answers() == [reply(["jobs-summary"], joined=["jobs-summary"])]
    (timer,) = peer.clock.getDelayedCalls()
    assert timer.getTime() == pytest.approx(2.0)
    peer.clock.advance(1.99)
    assert peer.answers() == [] and peer.groups() == {"jobs-summary"}
    peer.clock.advance(0.01)
    assert peer.answers() == [reply(["jobs-status_changed"], left=["jobs-summary"], joined=["jobs-status_changed"])]
    # A message sent once the bucket has refilled goes straight through again.
    peer.clock.advance(2)
    peer.send({})
    assert peer.answers() == [reply([], left=["jobs-status_changed"])]


def test_one_message_in_progress_one_waiting_the_newest_supersedes_it() -> None:
    authorizer = HeldAuthorizer()
    peer = Peer(authorizer=authorizer)  # within the rate: only the slow check holds things up
    peer.send({"job_events": [1]})
    peer.send({"job_events": [2]})
    assert authorizer.asked == [frozenset({"job_events-1"})] and peer.answers() == []
    peer.send({"job_events": [3]})  # 2 was waiting: superseded, answered at once
    assert peer.answers() == [SUPERSEDED] and peer.outcome("superseded") == 1
    assert authorizer.asked == [frozenset({"job_events-1"})]  # still one at a time
    authorizer.release()
    # 1's reply, then 3 (never 2) is looked at.
    assert peer.answers() == [reply(["job_events-1"], joined=["job_events-1"])]
    assert authorizer.asked == [frozenset({"job_events-1"}), frozenset({"job_events-3"})]
    authorizer.release()
    assert peer.answers() == [reply(["job_events-3"], left=["job_events-1"], joined=["job_events-3"])]
    assert peer.groups() == {"job_events-3"}


def test_a_closed_connection_drops_its_waiting_message_and_timer() -> None:
    peer = Peer(rate=0.5)
    peer.send({"jobs": ["summary"]})
    peer.send({"jobs": ["status_changed"]})
    peer.answers()
    assert len(peer.clock.getDelayedCalls()) == 1
    peer.protocol.connectionLost(Failure(ConnectionDone()))
    assert peer.clock.getDelayedCalls() == [] and peer.protocol._waiting is None
    peer.clock.advance(10)
    assert peer.hub.groups_of(peer.protocol) == frozenset()


def test_a_connection_closed_during_a_check_handles_nothing_more() -> None:
    authorizer = HeldAuthorizer()
    peer = Peer(authorizer=authorizer)
    peer.send({"job_events": [1]})
    peer.send({"job_events": [2]})
    peer.protocol.connectionLost(Failure(ConnectionDone()))
    authorizer.release()
    peer.clock.advance(10)
    assert authorizer.asked == [frozenset({"job_events-1"})]
    assert peer.hub.groups_of(peer.protocol) == frozenset() and peer.clock.getDelayedCalls() == []


FLOOD = 5_000


def test_memory_stays_bounded_under_a_flood() -> None:
    authorizer = HeldAuthorizer()
    peer = Peer(rate=1, authorizer=authorizer)
    peer.send({"job_events": [1]})  # in progress (held) and the only token spent
    for i in range(2, FLOOD + 2):
        peer.send({"job_events": [i]})
    # One in progress, one waiting (the newest), no rate timer while the check runs.
    assert authorizer.asked == [frozenset({"job_events-1"})]
    assert peer.protocol._waiting is not None and str(FLOOD + 1).encode() in peer.protocol._waiting
    assert peer.answers() == [SUPERSEDED] * (FLOOD - 1)
    assert peer.clock.getDelayedCalls() == []
    authorizer.release()
    assert peer.answers() == [reply(["job_events-1"], joined=["job_events-1"])]
    # The bucket is empty now: 10001 waits on one timer, however many more messages come.
    for i in range(FLOOD + 2, 2 * FLOOD + 2):
        peer.send({"job_events": [i]})
    assert peer.answers() == [SUPERSEDED] * FLOOD and len(peer.clock.getDelayedCalls()) == 1
    assert authorizer.asked == [frozenset({"job_events-1"})]
    peer.clock.advance(1)
    authorizer.release()
    last = f"job_events-{2 * FLOOD + 1}"
    assert peer.answers() == [reply([last], left=["job_events-1"], joined=[last])]
    assert authorizer.asked[1:] == [frozenset({last})]
    assert peer.outcome("superseded") == 2 * FLOOD - 1


def test_a_flood_that_is_never_read_is_closed_like_a_slow_reader() -> None:
    authorizer = HeldAuthorizer()
    peer = Peer(authorizer=authorizer, max_pending_bytes="1000")
    peer.send({"job_events": [1]})
    peer.protocol.pauseProducing()  # the client reads nothing: its buffer is full
    for i in range(2, 200):
        peer.send({"job_events": [i]})
    frames = server_frames(peer.unread + peer.transport.value())
    assert frames[-1][0] == 0x8 and int.from_bytes(frames[-1][1][:2], "big") == CLOSE_TRY_AGAIN_LATER
    assert sum(len(text_frame(p)) for op, p in frames if op == 1) <= 1000
