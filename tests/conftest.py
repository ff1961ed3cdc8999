"""Shared fixtures: a real RabbitMQ, an in-process towerws, websocket clients, a pika publisher.

Tests run under pytest-twisted with the asyncio reactor, so the Twisted server
and the asyncio clients (``websockets``) share one event loop.  Test bodies are
asyncio coroutines marked with :func:`aio_test`; blocking pika calls run in a
one-thread executor so they never block that loop.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika
import pytest
import pytest_twisted
import websockets
from twisted.internet.defer import Deferred

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
BROKER = ("127.0.0.1", 5672)
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
TIMEOUT = 10.0
EXCHANGE_TYPE = "direct"  # towerws's default exchange_type

TOKENS = {
    "token-admin": {"id": 1, "username": "admin", "is_superuser": True},
    "token-alice": {"id": 7, "username": "alice"},
    "token-bob": 8,
}


# -- the broker ----------------------------------------------------------------


def _broker_listening() -> bool:
    try:
        with socket.create_connection(BROKER, timeout=1):
            return True
    except OSError:
        return False


#: test modules that never touch the broker: run alone, they do not need RabbitMQ
BROKER_FREE = {"test_bench_soak.py"}


def _broker_free(args: list[str]) -> bool:
    """True when every path on the command line is a module of :data:`BROKER_FREE`."""
    return bool(args) and all(Path(a.split("::")[0]).name in BROKER_FREE for a in args)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Make sure RabbitMQ is there: start the local one if needed, else stop with one line."""
    if _broker_free(session.config.args) or _broker_listening():
        return
    if shutil.which("rabbitmq-server") is None:
        pytest.exit("towerws tests need RabbitMQ on 127.0.0.1:5672 (guest/guest): nothing listens there "
                    "and rabbitmq-server is not installed", returncode=1)
    subprocess.run(["rabbitmq-server", "-detached"], check=False, capture_output=True, timeout=60)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if _broker_listening():
            return
        time.sleep(0.5)
    pytest.exit("towerws tests need RabbitMQ on 127.0.0.1:5672: started rabbitmq-server -detached "
                "but nothing listened within 90 s", returncode=1)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def free_port() -> int:
    """A local TCP port nothing listens on (just now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- running asyncio code in tests ---------------------------------------------


def aio(awaitable: Awaitable[Any]) -> Deferred:
    return Deferred.fromFuture(asyncio.ensure_future(awaitable))


async def wait(d: Deferred, timeout: float = TIMEOUT) -> Any:
    """Await a Twisted Deferred from asyncio code, bounded."""
    return await asyncio.wait_for(d.asFuture(asyncio.get_running_loop()), timeout)


def aio_test(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Deferred]:
    """Run an asyncio test coroutine on the reactor's loop (fixtures are passed through)."""

    @pytest_twisted.ensureDeferred
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        return await aio(asyncio.wait_for(fn(*args, **kwargs), 60))

    return wrapper


# -- plain HTTP -------------------------------------------------------------------


def _http_get(url: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


async def http_get(url: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    """GET ``url`` (urllib in a worker thread): (status, lower-cased headers, body), whatever the status."""
    loop = asyncio.get_running_loop()
    return await asyncio.wait_for(loop.run_in_executor(None, _http_get, url, headers), TIMEOUT + 1)


# -- the publisher ---------------------------------------------------------------


class Publisher:
    """A pika publisher, as the API tier would use; blocking calls run in one worker thread."""

    def __init__(self, exchange: str, exchange_type: str = EXCHANGE_TYPE):
        self.exchange = exchange
        self.exchange_type = exchange_type
        self._executor = ThreadPoolExecutor(max_workers=1)
        self._conn: pika.BlockingConnection | None = None

    def _channel(self) -> Any:
        if self._conn is None or self._conn.is_closed:
            self._conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
            self._ch = self._conn.channel()
            # As towerws declares it (a different type would be refused by the broker).
            self._ch.exchange_declare(self.exchange, self.exchange_type, durable=True)
            self._ch.confirm_delivery()
        return self._ch

    def _publish_many(self, items: list[tuple[str, bytes, dict | None]]) -> None:
        ch = self._channel()
        for group, body, headers in items:
            props = pika.BasicProperties(content_type="application/json", headers=headers)
            ch.basic_publish(self.exchange, group, body, props)

    async def publish(self, group: str, payload: Any, headers: dict | None = None) -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        await self.publish_many([(group, body, headers)])

    async def publish_many(self, items: list[tuple[str, bytes, dict | None]]) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.run_in_executor(self._executor, self._publish_many, items), TIMEOUT)

    def run(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(channel)`` in the worker thread (blocking; for teardown)."""
        return self._executor.submit(lambda: fn(self._channel())).result(TIMEOUT)

    def close(self) -> None:
        def _close() -> None:
            if self._conn is not None and self._conn.is_open:
                self._conn.close()

        self._executor.submit(_close).result(TIMEOUT)
        self._executor.shutdown()


# -- a queue of the test's own, read with pika -------------------------------------------


def _params() -> pika.URLParameters:
    params = pika.URLParameters(AMQP_URL)
    params.socket_timeout = params.stack_timeout = params.blocked_connection_timeout = TIMEOUT
    return params


@dataclass
class Message:
    routing_key: str
    properties: pika.BasicProperties
    body: bytes


class Bound:
    """An exclusive queue bound to a topic exchange of the test's own with ``#``, or to towerws's ``exchange`` with ``keys``."""

    def __init__(self, exchange: str | None = None, keys: tuple[str, ...] = ("#",)) -> None:
        self.owned = exchange is None
        self.exchange = exchange or unique("towerws-emit-test")
        self.conn = pika.BlockingConnection(_params())
        self.channel = self.conn.channel()
        self.channel.exchange_declare(self.exchange, "topic" if self.owned else EXCHANGE_TYPE, durable=True)
        self.channel.basic_qos(prefetch_count=1)  # keeps requeued leftovers in order
        self.queue = self.channel.queue_declare("", exclusive=True).method.queue
        for key in keys:
            self.channel.queue_bind(self.queue, self.exchange, key)

    def get(self, count: int, timeout: float = TIMEOUT) -> list[Message]:
        """Exactly ``count`` messages, waiting at most ``timeout`` seconds for them."""
        messages: list[Message] = []
        deadline = time.monotonic() + timeout
        while len(messages) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # Manual acks: cancel() requeues what pika prefetched but we did not take
            # (with auto_ack it would be lost to the next get()).
            for method, props, body in self.channel.consume(self.queue, inactivity_timeout=remaining):
                if method is None:  # inactivity timeout: the deadline passed
                    break
                self.channel.basic_ack(method.delivery_tag)
                messages.append(Message(method.routing_key, props, body))
                if len(messages) == count or time.monotonic() >= deadline:
                    break
            self.channel.cancel()
        assert len(messages) == count, f"expected {count} messages, got {len(messages)}: {messages[:5]}"
        return messages

    def get_now(self) -> Message | None:
        """The next queued message, without waiting."""
        method, props, body = self.channel.basic_get(self.queue, auto_ack=True)
        return None if method is None else Message(method.routing_key, props, body)

    def assert_empty(self) -> None:
        """Nothing more is queued (valid right after confirmed publishes: they are already queued)."""
        method, _, body = self.channel.basic_get(self.queue, auto_ack=True)
        assert method is None, f"unexpected message {body!r}"

    def close(self) -> None:
        if not self.owned:
            if self.conn.is_open:
                self.conn.close()
        elif self.conn.is_open:
            self.channel.exchange_delete(self.exchange)
            self.conn.close()
        else:  # the test broke the connection: clean up on a fresh one
            with pika.BlockingConnection(_params()) as conn:
                conn.channel().exchange_delete(self.exchange)


@pytest.fixture
def bound() -> Iterator[Bound]:
    b = Bound()
    yield b
    b.close()


@pytest.fixture
def exchange() -> Any:
    name = unique("towerws-test")
    yield name
    with pika.BlockingConnection(pika.URLParameters(AMQP_URL)) as conn:
        conn.channel().exchange_delete(name)


@pytest.fixture
def publisher(exchange: str) -> Any:
    pub = Publisher(exchange)
    yield pub
    pub.close()


@pytest.fixture
def tokens_file(tmp_path: Path) -> str:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps(TOKENS))
    return str(path)


# -- websocket clients -------------------------------------------------------------


class Client:
    """A ``websockets`` client speaking towerws's JSON protocol, every wait bounded."""

    def __init__(self, ws: Any):
        self.ws = ws

    async def recv(self, timeout: float = TIMEOUT) -> str:
        return await asyncio.wait_for(self.ws.recv(), timeout)

    async def recv_json(self, timeout: float = TIMEOUT) -> Any:
        return json.loads(await self.recv(timeout))

    async def send_json(self, obj: Any) -> None:
        await self.ws.send(json.dumps(obj))

    async def subscribe(self, groups: dict[str, list[Any]], **extra: Any) -> dict:
        """Send a groups message and return its reply (errors before it are collected in ``errors``)."""
        await self.send_json({"groups": groups, **extra})
        errors = []
        while True:
            msg = await self.recv_json()
            if "groups_current" in msg:
                msg["errors"] = errors
                return msg
            errors.append(msg)

    async def closed(self, timeout: float = TIMEOUT) -> tuple[int | None, str]:
        """Wait for the server to close; returns (code, reason)."""
        try:
            while True:
                await asyncio.wait_for(self.ws.recv(), timeout)
        except websockets.ConnectionClosed as exc:
            rcvd = exc.rcvd
            return (rcvd.code, rcvd.reason) if rcvd else (None, "")

    async def no_message(self, timeout: float = 0.3) -> None:
        """Assert nothing else arrives (after a positive delivery proved the path is live)."""
        with pytest.raises(asyncio.TimeoutError):
            msg = await asyncio.wait_for(self.ws.recv(), timeout)
            pytest.fail(f"unexpected message {msg!r}")

    async def close(self) -> None:
        await self.ws.close()


async def connect(url: str, token: str | None = "token-alice", accept: bool = True, **kw: Any) -> Client:
    if token is not None:
        url += ("&" if "?" in url else "?") + f"token={token}"
    ws = await asyncio.wait_for(websockets.connect(url, open_timeout=TIMEOUT, **kw), TIMEOUT)
    client = Client(ws)
    if accept:
        hello = await client.recv_json()
        assert hello["accept"] is True, hello
    return client


async def raw_websocket(
    port: int, token: str = "token-alice", rcvbuf: int | None = None, tls: ssl.SSLContext | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client that completes the handshake, then never answers anything (not even a close).

    ``rcvbuf``: the socket's receive buffer (small: the TCP window closes soon); ``tls``: wss to ``localhost``.
    """
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)), TIMEOUT)
    reader, writer = await asyncio.open_connection(sock=sock, ssl=tls, server_hostname="localhost" if tls else None)
    writer.write(
        f"GET /websocket/?token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        .encode()
    )
    assert b" 101 " in await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    return reader, writer


def ws_frame(fin: bool, rsv: int, opcode: int, masked: bool, payload: bytes, lie: int = 0) -> bytes:
    """A websocket frame with any header bits, optionally lying about its length."""
    length = max(0, len(payload) + lie)
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    mask_bit = 0x80 if masked else 0
    if length < 126:
        head += bytes([mask_bit | length])
    elif length < 65536:
        head += bytes([mask_bit | 126]) + struct.pack("!H", length)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", length)
    if masked:
        key = b"\x01\x02\x03\x04"
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        head += key
    return head + payload


async def read_to_eof(reader: asyncio.StreamReader, timeout: float = TIMEOUT) -> bytes:
    """Everything the server sends until it ends the connection (close or abort)."""
    data = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), timeout):
            data += chunk
    except ConnectionResetError:
        pass  # an abort ends the stream all the same
    return data


# -- the server under test -----------------------------------------------------------


class Server:
    def __init__(self, service: Any, port: int):
        self.service = service
        self.port = port
        self.url = f"ws://127.0.0.1:{port}/websocket/"
        self.http = f"http://127.0.0.1:{port}"

    async def connect(self, token: str | None = "token-alice", **kw: Any) -> Client:
        return await connect(self.url, token, **kw)


def server_options(exchange: str, tokens_file: str, **extra: Any) -> dict[str, str]:
    opts = {
        "listen": "tcp:0:interface=127.0.0.1",
        "amqp_url": AMQP_URL,
        "exchange": exchange,
        "tokens_file": tokens_file,
        "node_id": unique("test"),
        "unbind_grace": "0",
        "queue_expires": "60",
        "ping_interval": "0",
    }
    opts.update({k: str(v) for k, v in extra.items()})
    return opts


def delete_queue(name: str) -> None:
    with pika.BlockingConnection(pika.URLParameters(AMQP_URL)) as conn:
        conn.channel().queue_delete(name)


async def start_server(options: dict[str, str], ready: bool = True) -> Server:
    """Build the service through the twistd plugin's makeService and start it.

    A switch (``console``) is on when given as ``"true"``; ``ready=False`` does not wait for the broker.
    """
    from twisted.plugins.towerws_plugin import serviceMaker

    from towerws.config import OPTIONS

    switches = {f.name for f in OPTIONS if f.metadata.get("flag")}
    opts = serviceMaker.options()
    args = []
    for key, value in options.items():
        name = f"--{key.replace('_', '-')}"
        if key in switches:
            args += [name] if value == "true" else []
        else:
            args += [name, value]
    opts.parseOptions(args)
    service = serviceMaker.makeService(opts)
    service.startService()
    port = await wait(service.listening())
    if ready:
        await wait(service.bus.when_ready())
    return Server(service, port.getHost().port)


async def stop_server(server: Server) -> None:
    await wait(server.service.stopService())


@pytest.fixture
def server_factory(exchange: str, tokens_file: str) -> Any:
    """Start in-process servers with extra options; all are stopped and their queues deleted."""
    started: list[Server] = []

    async def make(ready: bool = True, **extra: Any) -> Server:
        server = await start_server(server_options(exchange, tokens_file, **extra), ready=ready)
        started.append(server)
        return server

    yield make
    for server in started:
        pytest_twisted.blockon(aio(stop_server(server)))
        if server.service.settings.amqp_url is not None:
            delete_queue(server.service.bus.queue)


@pytest.fixture
def server(server_factory: Any) -> Server:
    return pytest_twisted.blockon(aio(server_factory()))
