"""towerws.app without listening: a broker-less TowerService's status and readiness, the wiring of the ops
endpoints, make_auth's choices, freeze_heap, and the order of a graceful shutdown (with fakes).

Started for real, with its ports: ``test_ops.py``, ``test_brokerless.py``, ``test_twistd.py``."""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import pytest
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.web.test.requesthelper import DummyRequest

from amqphelpers import fired
from conftest import TOKENS
from towerws import __version__
from towerws.app import TowerService, freeze_heap, make_auth
from towerws.auth import AllowAll, Credentials, DenyAll, StaticTokenAuthenticator, User
from towerws.bus import LocalBus
from towerws.config import load
from towerws.metrics import Metrics
from towerws.tower import TowerAPI, TowerAuthenticator, TowerAuthorizer


@pytest.fixture
def tokens(tmp_path: Path) -> str:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps(TOKENS))
    return str(path)


def node(tokens: str | None = None, **options: str) -> tuple[TowerService, MemoryReactorClock]:
    """A broker-less node, built but not started (no port is bound)."""
    cli = {"amqp_url": "none", "listen": "tcp:0:interface=127.0.0.1", "node_id": "node-a", **options}
    if tokens is not None:
        cli["tokens_file"] = tokens
    reactor = MemoryReactorClock()
    reactor.advance(1000)
    return TowerService(load(cli, environ={}), reactor=reactor), reactor


def get(site: Any, path: bytes) -> tuple[int, bytes]:
    request = DummyRequest([path])
    request.method = b"GET"
    body = site.getResourceFor(request).render(request)
    return request.responseCode or 200, body


# -- health --------------------------------------------------------------------------------------------------


def test_a_broker_less_node_reports_its_status(tokens: str) -> None:
    svc, reactor = node(tokens)
    assert isinstance(svc.bus, LocalBus) and svc.hub.listener is svc.bus
    reactor.advance(12.5)
    assert svc.status() == {
        "status": "not ready", "amqp": "disabled", "broker": None, "connections": 0, "groups": 0,
        "node_id": "node-a", "version": __version__, "uptime_s": 12.5,
    }


def test_a_running_broker_less_node_is_ready(tokens: str) -> None:
    # docs/operations.md: ready means running and the bus ready; the local bus always is.
    svc, _ = node(tokens)
    assert svc.ready() is False
    assert get(svc.site, b"readyz")[0] == 503  # not started yet
    Service.startService(svc)  # running, without starting the listener
    try:
        assert svc.ready() is True and svc.status()["status"] == "ready" and svc.status()["amqp"] == "disabled"
        assert get(svc.site, b"readyz") == (200, json.dumps(svc.status()).encode() + b"\n")
    finally:
        Service.stopService(svc)
    assert svc.ready() is False  # shutting down


def test_ready_needs_a_running_node_and_a_ready_bus(tokens: str) -> None:
    svc, _ = node(tokens)

    class BrokerBus(LocalBus):  # stands in for the AMQP bus: its own idea of ready
        state, ready, broker = "connecting", False, None

    bus = svc.bus = BrokerBus(svc.hub)
    Service.startService(svc)
    assert svc.ready() is False and svc.status()["amqp"] == "connecting"
    bus.state, bus.ready, bus.broker = "consuming", True, "rabbit-1:5672"
    assert svc.ready() is True and svc.status()["status"] == "ready" and svc.status()["broker"] == "rabbit-1:5672"
    Service.stopService(svc)  # the first step of a shutdown
    assert svc.ready() is False


def test_ops_endpoints_on_the_public_site_or_only_on_their_own(tokens: str) -> None:
    svc, _ = node(tokens)
    assert svc.ops_listener is None
    assert get(svc.site, b"healthz") == (200, b'{"status": "ok"}\n')
    svc, _ = node(tokens, metrics_listen="tcp:0:interface=127.0.0.1")
    assert svc.ops_listener is not None and svc.ops_listener.parent is svc
    assert get(svc.site, b"healthz")[0] == 404 and get(svc.site, b"metrics")[0] == 404


def test_metrics_are_bound_to_the_node(tokens: str) -> None:
    svc, _ = node(tokens)
    registry = svc.metrics.registry
    assert registry.get_sample_value("towerws_info", {"version": __version__, "node_id": "node-a"}) == 1
    assert registry.get_sample_value("towerws_amqp_consuming") == 1  # docs/operations.md: 1 in broker-less mode
    fired(svc.bus.publish("jobs-summary", b"{}"))
    assert registry.get_sample_value("towerws_amqp_messages_consumed_total") == 1
    # No broker configured: no towerws_amqp_broker series at all.
    assert [s for f in registry.collect() if f.name == "towerws_amqp_broker" for s in f.samples] == []


# -- make_auth ----------------------------------------------------------------------------------------------------


def test_static_tokens_when_given(tokens: str) -> None:
    authenticator, authorizer, api = make_auth(load({"tokens_file": tokens}, environ={}), MemoryReactorClock())
    assert isinstance(authenticator, StaticTokenAuthenticator) and isinstance(authorizer, AllowAll) and api is None
    assert fired(authenticator.authenticate(Credentials(token="token-alice"))) == User(7, "alice")


def test_nobody_gets_in_without_authentication() -> None:
    authenticator, authorizer, api = make_auth(load({}, environ={}), MemoryReactorClock())
    assert isinstance(authenticator, DenyAll) and isinstance(authorizer, AllowAll) and api is None


def test_the_tower_api_wins_over_static_tokens(tokens: str) -> None:
    settings = load({"tower_url": "https://tower.example.com", "tokens_file": tokens}, environ={})
    metrics = Metrics()
    authenticator, authorizer, api = make_auth(settings, MemoryReactorClock(), metrics)
    assert isinstance(authenticator, TowerAuthenticator) and isinstance(authorizer, TowerAuthorizer)
    assert isinstance(api, TowerAPI) and api.base_url == "https://tower.example.com"


def test_the_tower_api_client_is_a_child_of_the_node() -> None:
    svc, _ = node(tower_url="https://tower.example.com")
    assert any(isinstance(child, TowerAPI) for child in svc)
    assert isinstance(svc.factory.authenticator, TowerAuthenticator)


# -- freeze_heap --------------------------------------------------------------------------------------------------


def test_freeze_heap_is_idempotent() -> None:
    before = gc.get_freeze_count()
    try:
        freeze_heap()
        once = gc.get_freeze_count()
        assert once >= before and once > 0
        freeze_heap()  # again: harmless, nothing frozen is lost
        assert gc.get_freeze_count() >= once
    finally:
        if before == 0:
            gc.unfreeze()


def test_the_node_freezes_only_when_told() -> None:
    assert TowerService.freeze_heap is False  # the plugin sets it for twistd's own process


# -- the graceful shutdown --------------------------------------------------------------------------------------


class Step(Service):
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.log.append(self.name)
        return succeed(None)


def test_shutdown_order_listener_drain_bus_then_the_rest(tokens: str) -> None:
    svc, reactor = node(tokens)
    log: list[str] = []
    for child in list(svc):
        svc.removeService(child)
    svc.listener, svc.bus = Step("listener", log), Step("bus", log)
    for child in (svc.listener, Step("ops", log), Step("tower api", log), svc.bus):
        child.setServiceParent(svc)
        Service.startService(child)
    drained: Deferred[None] = Deferred()
    asked: list[float] = []
    svc.factory.drain = lambda timeout, clock: asked.append(timeout) or log.append("drain") or drained
    Service.startService(svc)

    done = svc.stopService()
    assert not svc.running  # not ready from the first step on
    assert log == ["listener", "drain"] and asked == [svc.settings.drain_timeout]
    assert not done.called  # the broker connection stays while clients drain
    drained.callback(None)
    assert log == ["listener", "drain", "bus", "tower api", "ops"]  # the rest in reverse order
    assert fired(done) is None
