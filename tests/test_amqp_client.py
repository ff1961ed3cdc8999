"""towerws.amqp.client without a broker: the fast delivery path, acks, heartbeats, channel failures."""

from __future__ import annotations

import struct
from typing import Any

from twisted.internet import error
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from txamqp.message import Message

from amqphelpers import amqp_method, close_message
from towerws.amqp.client import BrokerProtocol, ack_frame
from towerws.amqp.endpoint import describe
from towerws.amqp.txamqp_internals import install as install_codec

# -- BrokerProtocol ---------------------------------------------------------------------------------


def frame(ftype: int, payload: bytes, channel: int = 1) -> bytes:
    return struct.pack("!BHI", ftype, channel, len(payload)) + payload + b"\xce"


def delivery(tag: int, key: str, body: bytes) -> bytes:
    short = lambda s: bytes([len(s)]) + s.encode()  # noqa: E731
    method = struct.pack("!HH", 60, 60) + short("ctag") + struct.pack("!QB", tag, 0) + short("ex") + short(key)
    header = struct.pack("!HHQH", 60, 0, len(body), 0)
    return frame(1, method) + frame(2, header) + frame(3, body)


def connected_protocol(heartbeat: int = 0) -> tuple[BrokerProtocol, StringTransport, list, Clock]:
    install_codec()
    got: list[tuple[str, bytes]] = []
    clock = Clock()
    proto = BrokerProtocol(lambda k, b, received: got.append((k, b)), "/", heartbeat, clock)
    transport = StringTransport()
    proto.makeConnection(transport)
    transport.clear()
    return proto, transport, got, clock


def test_one_multiple_ack_per_read_after_dispatch() -> None:
    proto, transport, got, _ = connected_protocol()
    proto.consuming = True
    data = delivery(1, "g-1", b'{"a": 1}') + delivery(2, "g-2", b"{}")
    proto.dataReceived(data[:20])  # a partial frame: nothing yet
    assert got == [] and transport.value() == b""
    proto.dataReceived(data[20:])
    assert got == [("g-1", b'{"a": 1}'), ("g-2", b"{}")]
    assert transport.value() == ack_frame(1, 2)
    assert ack_frame(1, 2) == frame(1, struct.pack("!HHQB", 60, 80, 2, 1))  # basic.ack, multiple


def test_missed_heartbeats_drop_the_connection_with_a_reason() -> None:
    proto, transport, _, clock = connected_protocol(heartbeat=1)
    reasons: list[Any] = []
    proto.lost.addCallback(reasons.append)
    clock.advance(3)
    assert transport.disconnected  # aborted
    proto.connectionLost(Failure(error.ConnectionAborted()))
    assert describe(reasons[0]) == "no traffic from the broker for 3 s (heartbeat)"


def test_channel_closed_by_the_broker_drops_the_connection() -> None:
    proto, transport, _, _ = connected_protocol()
    reasons: list[Any] = []
    proto.lost.addCallback(reasons.append)
    channel = proto.channelFactory(1, proto.outgoing, proto)
    channel.do_close(close_message("channel_close", 406, "PRECONDITION_FAILED - unknown delivery tag 7"))
    assert transport.disconnected  # otherwise consumption would silently stop
    proto.connectionLost(Failure(error.ConnectionAborted()))
    assert describe(reasons[0]) == "channel closed by the broker: 406 PRECONDITION_FAILED - unknown delivery tag 7"


def test_client_properties_ask_for_auth_failure_close() -> None:
    proto, transport, _, _ = connected_protocol()
    proto.response, proto.mechanism, proto.locale = "\0u\0p", "PLAIN", "en_US"
    start = Message(amqp_method("connection", "start"), [0, 9, {}, b"PLAIN", b"en_US"])
    proto.delegate.connection_start(proto.channels.get(0) or _channel0(proto), start)
    sent = transport.value()
    assert b"authentication_failure_close" in sent and b"consumer_cancel_notify" in sent


def _channel0(proto: BrokerProtocol) -> Any:
    ch = proto.channelFactory(0, proto.outgoing, proto)
    proto.channels[0] = ch
    return ch
