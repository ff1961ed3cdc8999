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
from towerws.auth import Authenticator, DenyAll, StaticTokenAuthenticator
from towerws.bus import LocalBus, NodeBus
from towerws.config import Settings
from towerws.hub import Hub
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
        self.factory = TowerFactory(settings, self.hub, self.bus, make_authenticator(settings))
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


def make_authenticator(settings: Settings) -> Authenticator:
    if settings.tokens_file is not None:
        return StaticTokenAuthenticator(settings.tokens_file.users)
    Logger().warn("no authentication configured (--tokens-file): every websocket will be refused")
    return DenyAll()


def make_service(settings: Settings) -> TowerService:
    return TowerService(settings)
