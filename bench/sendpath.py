"""What one broadcast costs per client, in memory: Autobahn's send path against towerws's.

``python -m bench.sendpath [--clients 2000] [--messages 200]``

2,000 open server connections on null transports (no sockets, no reactor),
one 200-byte message broadcast to all of them, three ways:

* ``sendMessage``: Autobahn frames the payload again for every client;
* ``sendPreparedMessage``: framed once (``prepareMessage``), but each send still
  goes through Autobahn's ``sendData``, which formats a debug-log call's
  arguments on every send even with debug logging off;
* ``towerws deliver``: framed once, queued in each connection's outbox and written
  at the end of the turn (here: ``flush()``), the path towerws takes.

Prints microseconds per client per message for each, and the cost of the write
itself (a bare ``transport.write``) for reference.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import txaio
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock

from towerws.auth import AllowAll, StaticTokenAuthenticator
from towerws.bus import LocalBus
from towerws.config import load
from towerws.hub import Hub
from towerws.websocket.protocol import TowerFactory, text_frame


class NullTransport:
    """Accepts writes and forgets them: the cost measured is the server's, not the network's."""

    connected = True
    disconnecting = False

    def write(self, data: bytes) -> None:
        pass

    def registerProducer(self, producer: object, streaming: bool) -> None:
        pass

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 50000)

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 8051)


def open_connections(factory: WebSocketServerFactory, n: int) -> list[WebSocketServerProtocol]:
    protocols = []
    for i in range(n):
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 10000 + i))
        protocol.makeConnection(NullTransport())
        protocol.state = protocol.STATE_OPEN
        protocols.append(protocol)
    return protocols


def per_client_us(broadcast: Callable[[], None], clients: int, messages: int) -> float:
    broadcast()  # warm up
    start = time.perf_counter()
    for _ in range(messages):
        broadcast()
    return (time.perf_counter() - start) / (clients * messages) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--messages", type=int, default=200)
    args = parser.parse_args()
    txaio.use_twisted()
    txaio.set_global_log_level("info")  # as towerws runs: debug calls are no-ops

    payload = json.dumps({"seq": 1, "t": 0, "pad": "x" * 170}).encode()
    plain = WebSocketServerFactory()
    plain.protocol = WebSocketServerProtocol
    autobahn = open_connections(plain, args.clients)
    prepared = plain.prepareMessage(payload)

    settings = load({}, environ={})
    hub = Hub(text_frame)
    tower_factory = TowerFactory(settings, hub, LocalBus(hub), StaticTokenAuthenticator({}), AllowAll(), Clock())
    tower = open_connections(tower_factory, args.clients)
    frame = text_frame(payload)
    write_only = [p.transport for p in tower]

    def deliver_and_flush() -> None:
        for protocol in tower:
            protocol.deliver(frame)
        for protocol in tower:
            protocol.flush()

    results = {
        "sendMessage": per_client_us(lambda: [p.sendMessage(payload) for p in autobahn], args.clients, args.messages),
        "sendPreparedMessage": per_client_us(
            lambda: [p.sendPreparedMessage(prepared) for p in autobahn], args.clients, args.messages),
        "towerws deliver": per_client_us(deliver_and_flush, args.clients, args.messages),
        "transport.write alone": per_client_us(
            lambda: [t.write(frame) for t in write_only], args.clients, args.messages),
    }
    print(json.dumps({"scenario": "sendpath", "clients": args.clients, "messages": args.messages,
                      "us_per_client": {k: round(v, 3) for k, v in results.items()}}))
    base = results["transport.write alone"]
    print(f"{'send path':<22} {'us/client':>10} {'x write':>8}")
    for name, us in results.items():
        print(f"{name:<22} {us:>10.3f} {us / base:>8.1f}")


if __name__ == "__main__":
    main()
