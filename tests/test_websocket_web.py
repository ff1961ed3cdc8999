"""towerws.websocket.web without a network: which first requests go straight to Autobahn, the
handshake deadline on a Clock, the Listener's hand-over on a StringTransport, and the HTTP
resources (426, 404, /healthz, /readyz) rendered with DummyRequest."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.test.requesthelper import DummyRequest

from towerws.auth import AllowAll, StaticTokenAuthenticator, User
from towerws.bus import LocalBus
from towerws.config import load
from towerws.hub import Hub
from towerws.metrics import Metrics, MetricsResource
from towerws.websocket.protocol import TowerFactory, TowerProtocol, text_frame
from towerws.websocket.web import (
    MAX_HEAD,
    Deadline,
    HandshakeChannel,
    JSONResource,
    Listener,
    Root,
    TowerSite,
    UpgradeRequired,
    is_websocket_upgrade,
    make_ops_site,
    make_site,
    ops_resources,
)

ADDR = IPv4Address("TCP", "127.0.0.1", 50000)
HANDSHAKE = (b"GET /websocket/?token=t HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


@pytest.mark.parametrize("head, upgrade", [
    (b"GET /websocket/?token=t HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade", True),
    (b"GET /websocket HTTP/1.1\r\nupgrade:  WebSocket", True),
    (b"GET /websocket/ HTTP/1.1\r\nHost: h", False),  # no Upgrade: Twisted Web answers 426
    (b"GET /websocket/x HTTP/1.1\r\nUpgrade: websocket", True),  # Autobahn: 404
    (b"GET /websocketx HTTP/1.1\r\nUpgrade: websocket", False),  # Twisted Web: 404
    (b"POST /websocket/ HTTP/1.1\r\nUpgrade: websocket", False),
    (b"GET /metrics HTTP/1.1\r\nUpgrade: websocket", False),
    (b"GET /websocket/ HTTP/1.1\r\nUpgrade: h2c", False),
    (b"\x16\x03\x01 garbage", False),
    (b"", False),
])
def test_which_first_requests_go_straight_to_autobahn(head: bytes, upgrade: bool) -> None:
    assert is_websocket_upgrade(head) is upgrade


# -- Deadline ----------------------------------------------------------------------------------------------


def test_deadline_aborts_unless_met() -> None:
    clock, transport = Clock(), StringTransport()
    Deadline(clock.callLater, 5, transport)
    clock.advance(4.9)
    assert not transport.disconnecting
    clock.advance(0.1)
    assert transport.disconnecting and transport.disconnected  # abortConnection, not loseConnection


def test_a_met_deadline_is_cancelled_and_met_twice_is_harmless() -> None:
    clock, transport = Clock(), StringTransport()
    deadline = Deadline(clock.callLater, 5, transport)
    deadline.met()
    assert clock.getDelayedCalls() == []
    deadline.met()
    clock.advance(10)
    assert not transport.disconnecting


def test_met_after_the_abort_is_harmless() -> None:
    clock, transport = Clock(), StringTransport()
    deadline = Deadline(clock.callLater, 1, transport)
    clock.advance(1)
    deadline.met()
    assert transport.disconnected


# -- resources ----------------------------------------------------------------------------------------------


def render(resource: IResource, path: bytes = b"") -> tuple[int, DummyRequest, bytes]:
    """(status, request, body) of a GET of ``resource``."""
    request = DummyRequest([path])
    request.method = b"GET"
    body = resource.render(request)
    return request.responseCode or 200, request, body


def header(request: DummyRequest, name: bytes) -> bytes:
    return request.responseHeaders.getRawHeaders(name)[0]


def test_root_answers_404_for_anything_it_does_not_hold() -> None:
    root = Root()
    root.putChild(b"healthz", Resource())
    for name in (b"anything", b"", b"..", b"metrics"):
        status, _, _ = render(root.getChild(name, DummyRequest([name])))
        assert status == 404


def test_websocket_without_an_upgrade_is_426() -> None:
    resource = UpgradeRequired()
    status, request, body = render(resource)
    assert status == 426
    assert header(request, b"upgrade") == b"websocket"
    assert header(request, b"content-type") == b"text/plain; charset=utf-8"
    assert b"websocket only" in body
    assert resource.getChild(b"", DummyRequest([b""])) is resource  # /websocket/
    assert render(resource.getChild(b"x", DummyRequest([b"x"])))[0] == 404  # /websocket/x


def test_json_resource() -> None:
    status, request, body = render(JSONResource(lambda: (503, {"status": "not ready", "n": 1})))
    assert status == 503 and json.loads(body) == {"status": "not ready", "n": 1} and body.endswith(b"\n")
    assert header(request, b"content-type") == b"application/json"
    assert header(request, b"cache-control") == b"no-store"


def test_ops_resources_healthz_readyz_metrics() -> None:
    state = {"ready": False}
    ops = ops_resources(lambda: {"status": "ready" if state["ready"] else "not ready"}, lambda: state["ready"],
                        Metrics())
    assert set(ops) == {b"healthz", b"readyz", b"metrics"} and isinstance(ops[b"metrics"], MetricsResource)
    assert render(ops[b"healthz"])[::2] == (200, b'{"status": "ok"}\n')
    assert render(ops[b"readyz"])[::2] == (503, b'{"status": "not ready"}\n')
    state["ready"] = True
    assert render(ops[b"readyz"])[::2] == (200, b'{"status": "ready"}\n')
    assert render(ops[b"healthz"])[0] == 200


# -- the sites ------------------------------------------------------------------------------------------


def factory(clock: Clock | None = None, **options: str) -> TowerFactory:
    settings = load({"ping_interval": "0", **options}, environ={})
    hub = Hub(text_frame)
    return TowerFactory(settings, hub, LocalBus(hub), StaticTokenAuthenticator({"t": User(7, "alice")}), AllowAll(),
                        clock or Clock())


def resource_at(site: Any, path: bytes) -> IResource:
    return site.getResourceFor(DummyRequest(path.strip(b"/").split(b"/")))


def test_public_site_with_and_without_the_ops_endpoints() -> None:
    ops = ops_resources(dict, lambda: True, Metrics())
    public = make_site(factory(), ops)
    assert isinstance(resource_at(public, b"/websocket"), UpgradeRequired)
    assert resource_at(public, b"/healthz") is ops[b"healthz"]
    # --metrics-listen: the ops endpoints are only on their own site.
    alone = make_site(factory())
    assert render(resource_at(alone, b"/healthz"))[0] == 404
    ops_site = make_ops_site(ops, 3)
    assert resource_at(ops_site, b"/metrics") is ops[b"metrics"]
    assert render(resource_at(ops_site, b"/websocket"))[0] == 404
    assert isinstance(ops_site, TowerSite) and ops_site.handshake_timeout == 3


def test_publish_api_and_console_only_when_configured(tmp_path: Any) -> None:
    site = make_site(factory())
    assert render(resource_at(site, b"/api/publish"))[0] == 404
    assert render(resource_at(site, b"/console"))[0] == 404
    secret = tmp_path / "secret"
    secret.write_text("s" * 32)
    site = make_site(factory(publish_secret_file=str(secret), console="true"))
    assert render(resource_at(site, b"/api/publish"))[0] != 404
    assert render(resource_at(site, b"/console"))[0] != 404


def test_the_site_shows_no_tracebacks_and_logs_no_requests() -> None:
    site = make_site(factory(open_handshake_timeout="7"))
    assert site.displayTracebacks is False and site.handshake_timeout == 7
    assert site.protocol is HandshakeChannel
    assert site.log(DummyRequest([b""])) is None


# -- HandshakeChannel: the first request in time ------------------------------------------------------------


def channel(timeout: float = 5) -> tuple[HandshakeChannel, StringTransport, Clock]:
    clock = Clock()
    site = TowerSite(Root(), timeout)
    site.reactor = clock  # HTTPFactory hands its reactor's callLater to each channel
    proto = site.buildProtocol(ADDR)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport, clock


def test_a_request_trickled_in_is_aborted_at_the_deadline() -> None:
    proto, transport, clock = channel(timeout=5)
    for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\n":
        proto.dataReceived(bytes([byte]))
        clock.advance(0.1)  # never idle long enough for an idle timeout
    assert not transport.disconnecting
    clock.advance(5)
    assert transport.disconnected


def test_a_complete_request_meets_the_deadline() -> None:
    proto, transport, clock = channel(timeout=5)
    proto.dataReceived(b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 404 ")
    clock.advance(5)
    assert not transport.disconnecting  # keep-alive: the deadline was only for the first request


def test_a_closed_connection_leaves_no_timer() -> None:
    proto, transport, clock = channel()
    proto.connectionLost(Failure(ConnectionDone()))
    assert clock.getDelayedCalls() == []


# -- Listener: the first request decides who gets the connection --------------------------------------------


def listen(**options: str) -> tuple[Listener, Any, StringTransport, Clock]:
    clock = Clock()
    tower = factory(clock, **options)
    site = make_site(tower, ops_resources(dict, lambda: True, Metrics()))
    site.reactor = clock  # the channels' timers too
    listener = Listener(site, tower)
    first = listener.buildProtocol(ADDR)
    transport = StringTransport()
    transport.protocol = first
    first.makeConnection(transport)
    return listener, first, transport, clock


def test_a_websocket_upgrade_goes_straight_to_autobahn() -> None:
    listener, first, transport, _ = listen()
    first.dataReceived(HANDSHAKE[:20])  # a head in pieces: nothing decided yet
    assert transport.protocol is first and transport.value() == b""
    first.dataReceived(HANDSHAKE[20:])
    assert isinstance(transport.protocol, TowerProtocol)
    assert transport.value().startswith(b"HTTP/1.1 101 ")


def test_other_requests_go_to_twisted_web() -> None:
    _, first, transport, _ = listen()
    first.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert isinstance(transport.protocol, HandshakeChannel)
    assert transport.value().startswith(b"HTTP/1.1 200 ") and transport.value().endswith(b'{"status": "ok"}\n')


def test_a_head_too_long_to_read_is_left_to_twisted_web() -> None:
    _, first, transport, _ = listen()
    first.dataReceived(b"GET /websocket/ HTTP/1.1\r\nX-Long: " + b"a" * MAX_HEAD)
    assert isinstance(transport.protocol, HandshakeChannel)


def test_a_first_request_that_never_ends_is_aborted() -> None:
    _, first, transport, clock = listen(open_handshake_timeout="4")
    first.dataReceived(b"GET /websocket/ HTTP/1.1\r\n")
    clock.advance(3.9)
    assert not transport.disconnecting
    clock.advance(0.1)
    assert transport.disconnected and transport.protocol is first


def test_a_connection_gone_before_its_request_leaves_no_timer() -> None:
    _, first, _, clock = listen()
    first.connectionLost(Failure(ConnectionDone()))
    assert clock.getDelayedCalls() == []


def test_the_listener_starts_and_stops_both_factories() -> None:
    listener, _, _, _ = listen()
    listener.doStart()
    assert listener.site.numPorts == 1 and listener.factory.numPorts == 1
    listener.doStop()
    assert listener.site.numPorts == 0 and listener.factory.numPorts == 0
