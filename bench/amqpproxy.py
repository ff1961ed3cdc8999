"""A TCP proxy between one towerws node and RabbitMQ that the runner can sever: the rebind scenario's switch.

The node connects to the proxy instead of the broker; each accepted connection
is piped to the broker.  Severing aborts both sides of every pipe (the broker
sees the connection drop, as when a network path fails, and keeps the node's
durable queue and its bindings), and *holds* the connections accepted after it:
they are piped only once the runner releases them.  So the runner can change
the broker (delete the node's queue) while the node cannot reach it, and time
the reconnect from the moment the broker is reachable again, not from the
node's backoff.  Times are ``time.time()``, one clock for all processes.

Driven by JSON lines on stdin, one JSON reply per line on stdout (like
:mod:`bench.loadgen`); the first line says ``{"ready": true, "port": P}``.

``sever``       abort every pipe, hold new connections; ``{"at": t, "severed": n}``.
``release``     pipe the held connections and every later one; ``{"at": t}``.
``wait_piped``  ``{"since": t, "timeout": s}``: wait for a connection piped to the broker at or
                after ``t``; ``{"at": t}`` (the moment the broker was reachable again to it).
``quit``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any


class _Side(asyncio.Protocol):
    """One of the two sockets of a pipe; what it reads goes to the other side."""

    def __init__(self, pipe: Pipe, upstream: bool):
        self.pipe = pipe
        self.upstream = upstream
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if not self.upstream:
            self.pipe.accepted(self)

    def data_received(self, data: bytes) -> None:
        self.pipe.forward(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.pipe.close()

    # Flow control: a side that cannot write fast enough stops the other from reading.
    def pause_writing(self) -> None:
        other = self.pipe.other(self)
        if other is not None and other.transport is not None:
            other.transport.pause_reading()

    def resume_writing(self) -> None:
        other = self.pipe.other(self)
        if other is not None and other.transport is not None:
            other.transport.resume_reading()


class Pipe:
    """An accepted connection and its twin towards the broker (opened once not held)."""

    def __init__(self, proxy: Proxy):
        self.proxy = proxy
        self.down = _Side(self, upstream=False)
        self.up: _Side | None = None
        self.pending: list[bytes] = []
        self.closed = False
        self.piped_at: float | None = None

    def other(self, side: _Side) -> _Side | None:
        return self.up if side is self.down else self.down

    def accepted(self, side: _Side) -> None:
        self.proxy.pipes.add(self)
        if self.proxy.holding:
            self.proxy.held.append(self)
        else:
            self.connect()

    def connect(self) -> None:
        loop = asyncio.get_running_loop()
        task = loop.create_task(loop.create_connection(lambda: _Side(self, upstream=True), *self.proxy.upstream))
        task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled() or task.exception() is not None:
            self.close()
            return
        _, up = task.result()
        self.up = up
        if self.closed:
            assert up.transport is not None
            up.transport.abort()
            return
        self.piped_at = time.time()
        self.proxy.piped.append(self.piped_at)
        assert up.transport is not None
        for chunk in self.pending:
            up.transport.write(chunk)
        self.pending = []

    def forward(self, side: _Side, data: bytes) -> None:
        other = self.other(side)
        if other is None or other.transport is None:
            self.pending.append(data)  # the node speaks first; the broker side is not open yet
        else:
            other.transport.write(data)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.proxy.pipes.discard(self)
        for side in (self.down, self.up):
            if side is not None and side.transport is not None:
                side.transport.abort()


class Proxy:
    """The listening socket, its pipes, and whether new connections are held."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.pipes: set[Pipe] = set()
        self.held: list[Pipe] = []
        self.holding = False
        #: when each connection was piped to the broker
        self.piped: list[float] = []

    def sever(self) -> dict[str, Any]:
        self.holding = True
        pipes = list(self.pipes)
        at = time.time()
        for pipe in pipes:
            pipe.close()
        return {"ok": True, "at": at, "severed": len(pipes)}

    def release(self) -> dict[str, Any]:
        self.holding = False
        held, self.held = self.held, []
        at = time.time()
        for pipe in held:
            if not pipe.closed:
                pipe.connect()
        return {"ok": True, "at": at, "held": len(held)}

    async def wait_piped(self, since: float, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            later = [t for t in self.piped if t >= since]
            if later:
                return {"ok": True, "at": min(later)}
            await asyncio.sleep(0.005)
        return {"ok": False, "error": f"no connection piped to the broker within {timeout:.0f} s"}


async def serve(upstream: tuple[str, int]) -> None:
    """Listen on a free loopback port, then answer commands until ``quit`` or end of input."""
    loop = asyncio.get_running_loop()
    proxy = Proxy(upstream)
    server = await loop.create_server(lambda: Pipe(proxy).down, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    _reply({"ready": True, "pid": os.getpid(), "port": port})
    while line := await reader.readline():
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        if cmd["cmd"] == "sever":
            _reply(proxy.sever())
        elif cmd["cmd"] == "release":
            _reply(proxy.release())
        elif cmd["cmd"] == "wait_piped":
            _reply(await proxy.wait_piped(float(cmd["since"]), float(cmd.get("timeout", 30))))
        else:
            _reply({"ok": False, "error": f"unknown command {cmd['cmd']!r}"})
    server.close()
    for pipe in list(proxy.pipes):
        pipe.close()


def _reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.amqpproxy", description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", default="127.0.0.1:5672", help="the broker, HOST:PORT")
    args = parser.parse_args(argv)
    host, _, port = args.upstream.rpartition(":")
    asyncio.run(serve((host, int(port))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
