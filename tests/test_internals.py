"""Tripwires: the library internals towerws's adapters rely on are still there and still behave.

One test (or more) per adapter function.  When an upgrade of Twisted, Autobahn
txAMQP or pika changes an internal, the failing test names it and the adapter to
fix: ``towerws/twisted_internals.py``, ``towerws/websocket/autobahn_internals.py``,
``towerws/amqp/txamqp_internals.py``, ``towerws/pika_internals.py``.  No network, no broker.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.application import strports
from twisted.application.internet import ClientService
from twisted.internet import abstract
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import implementer
from twisted.internet.interfaces import IStreamClientEndpoint

from conftest import ws_frame
from towerws import twisted_internals
from towerws.websocket import autobahn_internals

HANDSHAKE = (
    b"GET /websocket/ HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def fired(d: Deferred) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


# -- Twisted ----------------------------------------------------------------------------------------


def test_twisted_listening_port_is_the_services_waiting_deferred() -> None:
    reactor = MemoryReactorClock()
    service = strports.service("tcp:0", Factory.forProtocol(Protocol), reactor=reactor)
    service.privilegedStartService()
    port = fired(twisted_internals.listening_port(service))
    assert hasattr(port, "getHost"), (
        "StreamServerEndpointService._waitingForPort no longer fires with the listening port: "
        "fix towerws.twisted_internals.listening_port"
    )


def test_twisted_exit_signal_is_where_twistd_reads_it() -> None:
    import inspect

    from twisted.application import app
    from twisted.internet import reactor
    from twisted.internet.interfaces import _ISupportsExitSignalCapturing

    assert _ISupportsExitSignalCapturing.providedBy(reactor)
    assert "reactor._exitSignal" in inspect.getsource(app.ApplicationRunner.startReactor), (
        "twistd no longer reads reactor._exitSignal: fix towerws.twisted_internals.forget_exit_signal"
    )
    saved = reactor._exitSignal
    try:
        reactor._exitSignal = 15
        twisted_internals.forget_exit_signal(reactor)
        assert reactor._exitSignal is None
    finally:
        reactor._exitSignal = saved


@implementer(IStreamClientEndpoint)
class _CapturingEndpoint:
    def __init__(self) -> None:
        self.factories: list[Any] = []

    def connect(self, factory: Any) -> Deferred:
        self.factories.append(factory)
        return Deferred()


def test_twisted_client_service_proxy_holds_our_protocol() -> None:
    class Mine(Protocol):
        pass

    endpoint = _CapturingEndpoint()
    service = ClientService(endpoint, Factory.forProtocol(Mine), clock=MemoryReactorClock())
    service.startService()
    try:
        proxy = endpoint.factories[0].buildProtocol(None)
        assert not isinstance(proxy, Mine), "ClientService no longer wraps the protocol (then the adapter is moot)"
        assert isinstance(twisted_internals.reconnecting_protocol(proxy), Mine), (
            "ClientService's protocol proxy no longer keeps the protocol in ._protocol: "
            "fix towerws.twisted_internals.reconnecting_protocol"
        )
    finally:
        service.stopService()


class _Recorder(Protocol):
    def __init__(self) -> None:
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data


def test_twisted_hand_over_of_a_tls_wrapper() -> None:
    first, second = _Recorder(), _Recorder()
    wrapper = ProtocolWrapper(WrappingFactory(Factory.forProtocol(_Recorder)), first)
    wrapper.makeConnection(StringTransport())
    twisted_internals.hand_over(wrapper, second)
    wrapper.dataReceived(b"after")
    assert (first.data, second.data) == (b"", b"after"), (
        "ProtocolWrapper no longer delivers to .wrappedProtocol: fix towerws.twisted_internals.hand_over"
    )


def test_twisted_tcp_connections_deliver_to_their_protocol_attribute() -> None:
    import inspect

    from twisted.internet import tcp

    assert "self.protocol.dataReceived" in inspect.getsource(tcp.Connection._dataReceived), (
        "tcp.Connection no longer delivers to .protocol: fix towerws.twisted_internals.hand_over"
    )


def test_twisted_producer_paused_makes_the_transport_resume_its_producer() -> None:
    class Fd(abstract.FileDescriptor):
        def writeSomeData(self, data: bytes) -> int:
            return len(data)

        def startWriting(self) -> None:
            pass

        def stopWriting(self) -> None:
            pass

    class Producer:
        resumed = 0

        def resumeProducing(self) -> None:
            self.resumed += 1

        def pauseProducing(self) -> None:
            pass

        def stopProducing(self) -> None:
            pass

    fd = Fd(reactor=MemoryReactorClock())
    fd.connected = True
    producer = Producer()
    fd.registerProducer(producer, True)
    fd.write(b"held by the transport")  # below bufferSize: Twisted itself would not pause
    twisted_internals.hold_writes(fd)
    fd.doWrite()
    assert producer.resumed == 1, (
        "FileDescriptor.doWrite no longer resumes a streaming producer flagged producerPaused once "
        "its buffer drained: fix towerws.twisted_internals.hold_writes"
    )


# -- Autobahn ---------------------------------------------------------------------------------------


class _Raw(autobahn_internals.RawSend, WebSocketServerProtocol):
    def __init__(self) -> None:
        super().__init__()
        self.raw: list[bytes] = []

    def send_raw(self, data: bytes) -> None:
        self.raw.append(data)


def _open_protocol(**options: Any) -> tuple[_Raw, StringTransport, WebSocketServerFactory]:
    factory = WebSocketServerFactory()
    factory.setProtocolOptions(failByDrop=False, **options)
    factory.protocol = _Raw
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    transport.registerProducer(proto, True)  # as TowerProtocol does; Autobahn unregisters it at close
    proto.dataReceived(HANDSHAKE)
    return proto, transport, factory


def test_autobahn_sends_everything_through_send_data() -> None:
    proto, transport, _ = _open_protocol()
    proto.sendMessage(b"hello")
    proto.sendPing()
    autobahn_internals.send_close(proto, 1013, "try again later")
    raw = b"".join(proto.raw)
    assert raw.startswith(b"HTTP/1.1 101"), "the handshake response no longer goes through sendData"
    assert b"\x81\x05hello" in raw and b"\x89\x00" in raw, "data frames or pings no longer go through sendData"
    assert b"\x88" + bytes([2 + len("try again later")]) + struct.pack("!H", 1013) in raw, (
        "sendCloseFrame(code=, reasonUtf8=) no longer sends that close frame: fix autobahn_internals.send_close"
    )
    assert transport.value() == b"", "Autobahn wrote around sendData: fix towerws.websocket.autobahn_internals.RawSend"


def test_autobahn_close_codes_of_both_sides() -> None:
    message = "localCloseCode/remoteCloseCode no longer record the close handshake: fix autobahn_internals.close_codes"
    first = "closedByMe no longer says which side started the closing handshake: fix autobahn_internals.closed_first"
    client_closes, _, _ = _open_protocol()
    assert not autobahn_internals.closed_first(client_closes), first
    client_closes.dataReceived(ws_frame(True, 0, 8, True, struct.pack("!H", 4000) + b"bye"))
    assert autobahn_internals.close_codes(client_closes) == (1000, 4000), message  # Autobahn answers 1000
    assert not autobahn_internals.closed_first(client_closes), first
    server_closes, _, _ = _open_protocol()
    autobahn_internals.send_close(server_closes, 1003, "binary")
    assert autobahn_internals.close_codes(server_closes) == (1003, None), message
    assert autobahn_internals.closed_first(server_closes), first
    # Autobahn's own close for a protocol error (a client frame without a mask) starts it too.
    violation, _, _ = _open_protocol()
    violation.dataReceived(ws_frame(True, 0, 1, False, b"unmasked"))
    assert autobahn_internals.close_codes(violation) == (1002, None), message
    assert autobahn_internals.closed_first(violation), first


def test_autobahn_options_on_the_class_are_not_copied_per_connection() -> None:
    assert WebSocketServerProtocol.CONFIG_ATTRS, "WebSocketServerProtocol.CONFIG_ATTRS is gone"
    factory = WebSocketServerFactory()
    factory.setProtocolOptions(autoPingInterval=7.0, maxMessagePayloadSize=1234)
    factory.protocol = autobahn_internals.with_class_options(_Raw, factory)
    proto = factory.buildProtocol(None)
    proto.makeConnection(StringTransport())
    copied = set(vars(proto)) & set(WebSocketServerProtocol.CONFIG_ATTRS)
    assert not copied, f"Autobahn copied {sorted(copied)} into the connection: fix with_class_options"
    assert (proto.autoPingInterval, proto.maxMessagePayloadSize) == (7.0, 1234)


# -- txAMQP -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("owner, name", [
    ("txamqp.protocol.AMQClient", "_unpack_frame"),
    ("txamqp.protocol.AMQClient", "frame_received"),
    ("txamqp.protocol.AMQClient", "reschedule_check_heartbeat"),
    ("txamqp.protocol.AMQClient", "MAX_UNSEEN_HEARTBEAT"),
    ("txamqp.protocol.AMQClient", "check_heartbeat"),
    ("txamqp.protocol.AMQClient", "do_close"),
    ("txamqp.protocol.AMQClient", "channel_failed"),
    ("txamqp.codec.Codec", "decode_table"),
    ("txamqp.codec.Codec", "encode_table"),
    ("txamqp.codec.Codec", "decode_longbytes"),
    ("txamqp.connection.Body", "decode"),
])
def test_txamqp_internals_exist(owner: str, name: str) -> None:
    import importlib

    module, _, cls = owner.rpartition(".")
    assert hasattr(getattr(importlib.import_module(module), cls), name), (
        f"txAMQP changed: {owner}.{name} is gone; fix towerws/amqp/txamqp_internals.py"
    )


def test_txamqp_calls_our_hooks() -> None:
    """The internals are not just there: txAMQP still calls them where the adapter expects."""
    import inspect

    from txamqp.protocol import AMQChannel, AMQClient

    assert "self.check_heartbeat" in inspect.getsource(AMQClient.__init__) + inspect.getsource(
        AMQClient.reschedule_check_heartbeat
    ), "AMQClient no longer schedules check_heartbeat"
    assert "channel_failed" in inspect.getsource(AMQChannel), "AMQChannel no longer reports a failed channel"
    assert "self.frame_received" in inspect.getsource(AMQClient.dataReceived), (
        "AMQClient.dataReceived no longer hands frames to frame_received (BrokerProtocol replaces it)"
    )


# -- pika ---------------------------------------------------------------------------------------------
# (what the watchdog does with them is tested against the broker:
# tests/test_emit.py::test_hung_node_mid_publish_costs_one_attempt_timeout)


@pytest.mark.parametrize("name", ["_adapter_call_later", "_adapter_remove_timeout", "_terminate_stream",
                                  "add_on_connection_blocked_callback", "add_on_connection_unblocked_callback"])
def test_pika_connection_internals_exist(name: str) -> None:
    from pika.adapters.select_connection import SelectConnection

    assert callable(getattr(SelectConnection, name, None)), f"pika SelectConnection.{name} is gone: see pika_internals"


def test_pika_blocking_connection_wraps_a_select_connection_as_impl() -> None:
    import inspect

    from pika.adapters.blocking_connection import BlockingConnection

    source = inspect.getsource(BlockingConnection.__init__)
    assert "self._impl = self._create_connection(" in source, "pika BlockingConnection._impl moved: see pika_internals"
