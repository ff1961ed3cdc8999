"""Slow consumers: a client that stops reading is closed past ``max_pending_bytes``; nobody else notices.

Real server, real broker, a real TCP client that stops reading (its asyncio
transport paused, a small receive buffer) beside a normal ``websockets`` client.
Nothing here is timed: each step waits for an event, bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import struct
from pathlib import Path

import pytest

from conftest import TIMEOUT, Client, Server, aio_test, connect, raw_websocket, read_to_eof, ws_frame
from logcapture import LogCapture
from tlsfiles import CA
from towerws.websocket.protocol import CLOSE_TRY_AGAIN_LATER

GROUP = "jobs-status_changed"
LIMIT = 256 * 1024
PAYLOAD = 2048  # bytes of padding per message
BATCH = 500  # about 1 MiB per batch


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One server -> client frame: (opcode, payload)."""
    b0, b1 = await asyncio.wait_for(reader.readexactly(2), TIMEOUT)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", await reader.readexactly(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", await reader.readexactly(8))
    return b0 & 0x0F, await asyncio.wait_for(reader.readexactly(n), TIMEOUT)


async def stalled_subscriber(
    port: int, tls: ssl.SSLContext | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Handshake, subscribe to GROUP, read the reply, then stop reading altogether."""
    reader, writer = await raw_websocket(port, "token-alice", rcvbuf=4096, tls=tls)  # the window closes soon
    assert json.loads((await read_frame(reader))[1])["accept"] is True
    writer.write(ws_frame(True, 0, 0x1, True, json.dumps({"groups": {"jobs": ["status_changed"]}}).encode()))
    assert json.loads((await read_frame(reader))[1])["groups_current"] == [GROUP]
    writer.transport.pause_reading()
    return reader, writer


def parse_stream(data: bytes) -> tuple[list[int], int | None]:
    """The ``seq`` of each complete text frame, and the close code if a close frame ends the stream."""
    seqs: list[int] = []
    pos = 0
    while len(data) - pos >= 2:
        opcode, n, start = data[pos] & 0x0F, data[pos + 1] & 0x7F, pos + 2
        if n == 126:
            (n,), start = struct.unpack_from("!H", data, start), start + 2
        elif n == 127:
            (n,), start = struct.unpack_from("!Q", data, start), start + 8
        if start + n > len(data):
            break  # cut by the abort
        payload = data[start:start + n]
        if opcode == 0x8:
            assert start + n == len(data), "frames after the close frame"
            return seqs, int.from_bytes(payload[:2], "big")
        seqs.append(json.loads(payload)["seq"])
        pos = start + n
    return seqs, None


def slow_disconnects(server: Server) -> float:
    return server.service.metrics.registry.get_sample_value("towerws_slow_client_disconnects_total") or 0.0


async def expect_sequence(client: Client, start: int, count: int) -> None:
    for seq in range(start, start + count):
        assert json.loads(await client.recv())["seq"] == seq


@pytest.fixture(params=["tcp", "tls"])
def scheme(request, tmp_path: Path) -> tuple[str, ssl.SSLContext | None]:
    """The listener: plain TCP, or TLS terminated by towerws itself (flow control sits on the TLS layer)."""
    if request.param == "tcp":
        return "tcp:0:interface=127.0.0.1", None
    ca = CA("towerws test CA")
    cert, key = ca.issue("localhost", dns=["localhost"]).write(tmp_path, "server")
    context = ssl.create_default_context(cadata=ca.issued.cert_pem.decode())
    return f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}", context


@aio_test
async def test_a_client_that_stops_reading_is_closed_and_the_others_get_everything(
    server_factory, publisher, scheme
) -> None:
    listen, tls = scheme
    server: Server = await server_factory(max_pending_bytes=LIMIT, listen=listen)
    url = server.url.replace("ws://127.0.0.1", "wss://localhost") if tls else server.url
    normal = await connect(url, "token-bob", ssl=tls)
    await normal.subscribe({"jobs": ["status_changed"]})
    reader, writer = await stalled_subscriber(server.port, tls)
    assert len(server.service.hub.subscribers(GROUP)) == 2

    pad = "x" * PAYLOAD
    seq = 0
    with LogCapture() as logs:
        # Publish until the server gives up on the stalled client.  The kernel's
        # socket buffers absorb a few MiB first, so the amount is not known in advance;
        # each batch is read in full by the normal client before the next one.
        for _ in range(64):
            await publisher.publish_many([(GROUP, json.dumps({"seq": seq + i, "pad": pad}).encode(), None)
                                          for i in range(BATCH)])
            await expect_sequence(normal, seq, BATCH)
            seq += BATCH
            if slow_disconnects(server):
                break
        assert slow_disconnects(server) == 1, f"still connected after {seq} messages"
        await logs.wait_for("is too slow")
    line = logs.matching("is too slow")[0]
    assert "user 7" in line and str(LIMIT) in line

    # Its connection ends: it never answers the close frame, so it is aborted.
    # What it can still read is an in-order prefix of the stream, then (if it read
    # that far before the abort) the 1013 close frame and nothing after it.
    writer.transport.resume_reading()
    seqs, close_code = parse_stream(await read_to_eof(reader, timeout=TIMEOUT))
    assert seqs == list(range(len(seqs)))
    assert close_code == CLOSE_TRY_AGAIN_LATER or (close_code is None and len(seqs) < seq)
    writer.close()
    assert server.service.hub.subscribers(GROUP) == {c for c in server.service.factory.connections}
    assert len(server.service.hub.subscribers(GROUP)) == 1

    # The normal client goes on as if nothing happened.
    await publisher.publish(GROUP, {"seq": seq})
    await expect_sequence(normal, seq, 1)
    await normal.close()


@aio_test
async def test_a_client_that_reads_slowly_but_keeps_up_is_not_closed(server_factory, publisher) -> None:
    # Far more bytes than the limit in total, but its send buffer keeps emptying.
    server: Server = await server_factory(max_pending_bytes=LIMIT)
    client = await server.connect()
    await client.subscribe({"jobs": ["status_changed"]})
    pad = "x" * PAYLOAD
    for start in range(0, 4 * BATCH, BATCH):
        await publisher.publish_many([(GROUP, json.dumps({"seq": start + i, "pad": pad}).encode(), None)
                                      for i in range(BATCH)])
        await expect_sequence(client, start, BATCH)
    assert slow_disconnects(server) == 0
    await client.close()


@aio_test
async def test_permessage_deflate_is_not_negotiated(server: Server, publisher) -> None:
    # Compression would cost one deflate per subscriber and defeat frame-once;
    # websockets offers it by default, towerws declines.
    client = await connect(server.url, "token-alice", compression="deflate")
    assert "Sec-WebSocket-Extensions" not in client.ws.response.headers
    await client.subscribe({"jobs": ["status_changed"]})
    await publisher.publish(GROUP, {"seq": 0})
    await expect_sequence(client, 0, 1)
    await client.close()

