"""The websocket side without a network: routing of first requests, options, producer registration, the slow-consumer bound."""

from __future__ import annotations

import json

import pytest

from autobahn.twisted.websocket import WebSocketServerProtocol
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from towerws.auth import AllowAll, StaticTokenAuthenticator, User
from towerws.bus import LocalBus
from towerws.config import load
from towerws.hub import Hub
from towerws.websocket.web import is_websocket_upgrade
from towerws.websocket.protocol import CLOSE_TRY_AGAIN_LATER, TowerFactory, TowerProtocol, text_frame


@pytest.mark.parametrize("head, upgrade", [
    (b"GET /websocket/?token=t HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade", True),
    (b"GET /websocket HTTP/1.1\r\nupgrade:  WebSocket", True),
    (b"GET /websocket/ HTTP/1.1\r\nHost: h", False),  # no Upgrade: Twisted Web answers 426
    (b"GET /websocket/x HTTP/1.1\r\nUpgrade: websocket", True),  # Autobahn: 404
    (b"GET /websocketx HTTP/1.1\r\nUpgrade: websocket", False),  # Twisted Web: 404
    (b"POST /websocket/ HTTP/1.1\r\nUpgrade: websocket", False),
    (b"GET /metrics HTTP/1.1\r\nUpgrade: websocket", False),
    (b"\x16\x03\x01 garbage", False),
    (b"", False),
])
def test_which_first_requests_go_straight_to_autobahn(head: bytes, upgrade: bool) -> None:
    assert is_websocket_upgrade(head) is upgrade


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
