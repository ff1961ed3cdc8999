"""The access log's close code is the one on the wire, whichever side started the close.

Each session ends with one line ``websocket N closed: ... close code C``. The
clients here are raw sockets that read the server's close frame and then drop
the connection without answering it (the case that used to log 1006), or a
``websockets`` client that closes or answers properly. Broker-less servers:
nothing here needs RabbitMQ.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

from conftest import TIMEOUT, aio_test, connect, raw_websocket, ws_frame
from logcapture import LogCapture

CLOSED = "closed: user"
MAX_MESSAGE = 1024


async def local_server(server_factory: Any) -> Any:
    return await server_factory(amqp_url="none", max_message_size=MAX_MESSAGE, max_connections_per_user=1)


async def read_close_frame(reader: asyncio.StreamReader) -> int:
    """Read frames up to the server's close frame; its code."""
    while True:
        head = await asyncio.wait_for(reader.readexactly(2), TIMEOUT)
        length = head[1] & 0x7F
        if length == 126:
            length = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), TIMEOUT))[0]
        elif length == 127:
            length = struct.unpack("!Q", await asyncio.wait_for(reader.readexactly(8), TIMEOUT))[0]
        payload = await asyncio.wait_for(reader.readexactly(length), TIMEOUT)
        if head[0] & 0x0F == 8:
            return struct.unpack("!H", payload[:2])[0]


async def logged_code(log: LogCapture, sessions: int) -> int:
    """The close code of the ``sessions``-th access line (waiting for it, bounded)."""
    await log.wait_for(CLOSED, sessions)
    return [event for event in log.events if CLOSED in event.get("log_format", "")][sessions - 1]["code"]


@aio_test
async def test_server_initiated_closes_log_the_code_sent(server_factory: Any) -> None:
    server = await local_server(server_factory)
    frames = {
        1003: ws_frame(True, 0, 2, True, b"\x00binary"),
        1007: ws_frame(True, 0, 1, True, b"\xff\xfe not UTF-8"),
        1009: ws_frame(True, 0, 1, True, b"x" * (MAX_MESSAGE + 1)),
        1002: ws_frame(True, 0, 1, False, b"a client frame must be masked"),
    }
    with LogCapture() as log:
        sessions = 0
        for code, frame in frames.items():
            reader, writer = await raw_websocket(server.port)
            writer.write(frame)
            assert await read_close_frame(reader) == code
            writer.close()  # drop the connection instead of answering the close frame
            sessions += 1
            assert await logged_code(log, sessions) == code
        # Refused at the handshake: not authenticated (4401), over the user's connection limit (1013).
        reader, writer = await raw_websocket(server.port, token="wrong")
        assert await read_close_frame(reader) == 4401
        writer.close()
        sessions += 1
        assert await logged_code(log, sessions) == 4401
        first = await connect(server.url, "token-bob")
        reader, writer = await raw_websocket(server.port, token="token-bob")
        assert await read_close_frame(reader) == 1013
        writer.close()
        sessions += 1
        assert await logged_code(log, sessions) == 1013
        await first.close()
        sessions += 1
        assert await logged_code(log, sessions) == 1000


@aio_test
async def test_a_client_that_answers_the_close_logs_the_code_sent(server_factory: Any) -> None:
    server = await local_server(server_factory)
    with LogCapture() as log:
        ws = await server.connect()
        await ws.ws.send(b"binary")
        assert (await ws.closed())[0] == 1003
        assert await logged_code(log, 1) == 1003


@aio_test
async def test_client_close_logs_its_code_and_a_drop_logs_1006(server_factory: Any) -> None:
    server = await local_server(server_factory)
    with LogCapture() as log:
        ws = await server.connect()
        await ws.ws.close(4000, "bye")  # Autobahn answers 1000; the client's 4000 is what ended it
        assert await logged_code(log, 1) == 4000
        reader, writer = await raw_websocket(server.port)
        writer.transport.abort()  # no close frame either way
        assert await logged_code(log, 2) == 1006
