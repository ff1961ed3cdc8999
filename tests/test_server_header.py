"""No HTTP answer names a library or its version: ``Server: towerws`` on every one.

Websocket answers come from Autobahn (101, 403, 404), everything else from
Twisted Web (426, the ops endpoints, the console, 404). Broker-less servers.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import pytest_twisted

from conftest import TIMEOUT, aio, aio_test, http_get, wait

UPGRADE = ("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n")


async def response_head(port: int, request: str) -> tuple[int, dict[str, str], str]:
    """Send a raw request; (status, lower-cased headers, the head as text)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)
    try:
        writer.write(request.encode())
        head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)).decode("latin-1")
    finally:
        writer.close()
    lines = head.split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:] if line)}
    return int(lines[0].split()[1]), headers, head


def assert_anonymous(headers: dict[str, str], head: str) -> None:
    assert headers.get("server", "towerws") == "towerws", head
    for library in ("autobahn", "twisted", "python"):
        assert library not in head.lower(), head


@pytest.fixture
def server(server_factory: Any) -> Any:
    return pytest_twisted.blockon(aio(server_factory(amqp_url="none", console="true")))


@aio_test
async def test_websocket_answers(server: Any) -> None:
    cases = [
        ("/websocket/?token=token-alice", "", 101),
        ("/websocket/?token=nobody", "", 101),  # refused after the handshake: 4401 on the websocket
        ("/websocket/", "Origin: http://elsewhere.example\r\n", 403),
        ("/websocket/elsewhere", "", 404),
    ]
    for path, extra, status in cases:
        code, headers, head = await response_head(server.port, UPGRADE.format(path=path, port=server.port, extra=extra))
        assert code == status, head
        assert_anonymous(headers, head)
    # A malformed upgrade: 400 with the reason, no websocket (docs/protocol.md#handshake).
    code, headers, head = await response_head(server.port, "GET /websocket/ HTTP/1.1\r\nHost: h\r\n"
                                              "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                                              "Sec-WebSocket-Version: 13\r\n\r\n")
    assert head.startswith("HTTP/1.1 400 HTTP Sec-WebSocket-Key header missing"), head
    assert_anonymous(headers, head)


@aio_test
async def test_plain_http_answers(server: Any) -> None:
    for path, status in [("/websocket/", 426), ("/healthz", 200), ("/readyz", 200), ("/metrics", 200),
                         ("/console/", 200), ("/nowhere", 404)]:
        code, headers, body = await http_get(server.http + path)
        assert code == status, path
        assert headers.get("server") == "towerws", (path, headers)
        assert b"TwistedWeb" not in body and b"Autobahn" not in body


@aio_test
async def test_ops_site_answers(server_factory: Any) -> None:
    server = await server_factory(amqp_url="none", metrics_listen="tcp:0:interface=127.0.0.1")
    ops = f"http://127.0.0.1:{(await wait(server.service.ops_listening())).getHost().port}"
    for path, status in [("/healthz", 200), ("/metrics", 200), ("/nowhere", 404)]:
        code, headers, _ = await http_get(ops + path)
        assert (code, headers.get("server")) == (status, "towerws"), path


@aio_test
async def test_plain_request_to_the_websocket_path_is_426_upgrade_required(server: Any) -> None:
    for request in ("GET /websocket/ HTTP/1.1\r\nHost: h\r\n\r\n",
                    "POST /websocket/ HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nContent-Length: 0\r\n\r\n"):
        code, headers, head = await response_head(server.port, request)
        assert head.startswith("HTTP/1.1 426 Upgrade Required\r\n"), head
        assert headers["upgrade"] == "websocket"
