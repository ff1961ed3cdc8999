"""Wiring: settings in, one ``MultiService`` out (the twistd plugin calls :func:`make_service`)."""

from __future__ import annotations

from typing import Any

import txaio
from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from towerws import __version__
from towerws.amqp import AMQPService
from towerws.auth import AllowAll, Authenticator, Authorizer, DenyAll, StaticTokenAuthenticator
from towerws.bus import LocalBus, NodeBus
from towerws.config import Settings
from towerws.hub import Hub
from towerws.tower import TowerAPI, TowerAuthenticator, TowerAuthorizer
from towerws.web import make_site
from towerws.websocket import TowerFactory, text_frame


class TowerService(MultiService):
    """The whole node: websocket listener + bus (broker connection or in-process) around one hub."""

    log = Logger()

    def __init__(self, settings: Settings, reactor: Any = None):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.settings = settings
        # Autobahn logs through txaio at debug level on every frame; below "info"
        # those calls are no-ops instead of events twistd would format and write.
        txaio.use_twisted()
        txaio.set_global_log_level("info")
        self.hub = Hub(frame=text_frame)
        self.bus: NodeBus
        if settings.amqp_url is None:
            self.bus = LocalBus(self.hub)  # broker-less: one node, nothing to bind
        else:
            self.bus = AMQPService(settings, self.hub, reactor)
            self.hub.listener = self.bus.bindings
        authenticator, authorizer, api = make_auth(settings, reactor)
        if api is not None:
            api.setServiceParent(self)  # closes its connection pool on stop
        self.factory = TowerFactory(settings, self.hub, self.bus, authenticator, authorizer, reactor)
        self.site = make_site(self.factory)
        self.listener = strports.service(settings.listen, self.site)
        self.listener.setServiceParent(self)
        self.bus.setServiceParent(self)

    def startService(self) -> None:
        self.log.info(
            "towerws {version} node {node} listening on {listen}, broker {broker}, exchange {exchange}",
            version=__version__,
            node=self.settings.node_id,
            listen=self.settings.listen,
            broker=str(self.settings.amqp_url or "none (single node, in-process bus)"),
            exchange=self.settings.exchange,
        )
        super().startService()

    def listening(self) -> Deferred[IListeningPort]:
        """The listening port, once bound (useful with ``tcp:0``)."""
        return self.listener._waitingForPort


def make_auth(settings: Settings, reactor: Any) -> tuple[Authenticator, Authorizer, TowerAPI | None]:
    """``--tower-url``: the Tower API decides who and what; else the static tokens file, else nobody."""
    log = Logger()
    if settings.tower_url is not None:
        if settings.tokens_file is not None:
            log.warn("--tokens-file is ignored: --tower-url authenticates every websocket")
        api = TowerAPI(settings.tower_url, settings.tower_timeout, reactor, settings.tower_ca_file)
        ttls = (settings.auth_cache_ttl, settings.auth_negative_cache_ttl)
        return (
            TowerAuthenticator(api, reactor, *ttls),
            TowerAuthorizer(api, settings.object_paths, reactor, *ttls),
            api,
        )
    if settings.tokens_file is not None:
        return StaticTokenAuthenticator(settings.tokens_file.users), AllowAll(), None
    log.warn("no authentication configured (--tower-url, --tokens-file): every websocket will be refused")
    return DenyAll(), AllowAll(), None


def make_service(settings: Settings) -> TowerService:
    return TowerService(settings)
