"""A TCP proxy in front of the real RabbitMQ that a test can sever, refuse, or silence.

towerws connects to the proxy (``amqp://guest:guest@127.0.0.1:<proxy.port>``);
each accepted connection is piped to 127.0.0.1:5672.  With ``tls`` the proxy
terminates TLS (server certificate options from :mod:`tlsfiles`), so towerws
talks ``amqps://`` to it while the shared broker keeps its plain configuration.

* :meth:`sever` -- abort every piped connection (both sides: the broker requeues
  what was not acknowledged, towerws sees its connection drop).
* :meth:`refuse` / :meth:`accept` -- stop listening (connects are refused) / listen
  again on the same port.
* :meth:`blackhole` -- the broker side is dropped but towerws's side stays open and
  silent: a "silently dropped TCP connection" only heartbeats can notice.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import endpoints, reactor
from twisted.internet.defer import maybeDeferred
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from conftest import BROKER, wait


class _Upstream(Protocol):
    def __init__(self, pipe: "_Pipe"):
        self.pipe = pipe

    def dataReceived(self, data: bytes) -> None:
        if not self.pipe.silent:
            self.pipe.transport.write(data)

    def connectionLost(self, reason: Failure) -> None:
        if not self.pipe.silent:
            self.pipe.transport.loseConnection()


class _Pipe(Protocol):
    """One accepted connection and its twin towards the broker."""

    def __init__(self, proxy: "BrokerProxy"):
        self.proxy = proxy
        self.upstream: _Upstream | None = None
        self.pending: list[bytes] = []
        self.silent = False

    def connectionMade(self) -> None:
        self.proxy.accepted += 1
        self.proxy.pipes.add(self)
        ep = endpoints.TCP4ClientEndpoint(reactor, *BROKER)
        ep.connect(Factory.forProtocol(lambda: _Upstream(self))).addCallbacks(self._up, self._down)

    def _up(self, upstream: _Upstream) -> None:
        self.upstream = upstream
        if self.silent or not self.connected:
            upstream.transport.abortConnection()
            return
        for chunk in self.pending:
            upstream.transport.write(chunk)
        self.pending = []

    def _down(self, failure: Failure) -> None:
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.silent:
            return
        if self.upstream is None:
            self.pending.append(data)
        else:
            self.upstream.transport.write(data)

    def connectionLost(self, reason: Failure) -> None:
        self.proxy.pipes.discard(self)
        if self.upstream is not None:
            self.upstream.transport.loseConnection()

    def sever(self) -> None:
        self.transport.abortConnection()
        if self.upstream is not None:
            self.upstream.transport.abortConnection()

    def silence(self) -> None:
        self.silent = True
        if self.upstream is not None:
            self.upstream.transport.abortConnection()


class BrokerProxy:
    def __init__(self, tls: Any = None):
        self.tls = tls
        self.pipes: set[_Pipe] = set()
        self.accepted = 0
        self.port = 0
        self._listening: Any = None

    async def start(self) -> "BrokerProxy":
        factory = Factory.forProtocol(lambda: _Pipe(self))
        factory.noisy = False
        if self.tls is None:
            ep = endpoints.TCP4ServerEndpoint(reactor, self.port, interface="127.0.0.1")
        else:
            ep = endpoints.SSL4ServerEndpoint(reactor, self.port, self.tls, interface="127.0.0.1")
        self._listening = await wait(ep.listen(factory))
        self.port = self._listening.getHost().port
        return self

    def url(self, scheme: str = "amqp", host: str = "127.0.0.1", password: str = "guest") -> str:
        return f"{scheme}://guest:{password}@{host}:{self.port}/%2F"

    def sever(self) -> int:
        pipes = list(self.pipes)
        for pipe in pipes:
            pipe.sever()
        return len(pipes)

    async def refuse(self) -> None:
        await self._stop_listening()

    async def accept(self) -> None:
        await self.start()

    def blackhole(self) -> int:
        pipes = list(self.pipes)
        for pipe in pipes:
            pipe.silence()
        return len(pipes)

    async def stop(self) -> None:
        self.sever()
        await self._stop_listening()

    async def _stop_listening(self) -> None:
        if self._listening is not None:
            listening, self._listening = self._listening, None
            await wait(maybeDeferred(listening.stopListening))
