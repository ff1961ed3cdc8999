"""Groups messages in a hurry, end to end: the last one always wins.

The AWX UIs send their groups the instant the socket opens, and the newer one
re-sends its whole groups object whenever a component subscribes, so several
full groups messages within a few milliseconds are normal.  Real towerws in
process, real RabbitMQ, real ``websockets`` clients (and raw sockets where the
test needs bytes on the wire before the handshake's answer).
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

from conftest import TIMEOUT, Client, aio_test, ws_frame
from faketower import ALICE, eventually, fake_tower  # noqa: F401 (fixture)


def reply_to(groups: list[str], msg: dict) -> bool:
    return msg.get("groups_current") == sorted(groups)


async def answers_until_final(ws: Client, sent: int) -> list[dict]:
    """The ``sent`` final answers of as many groups messages: replies and ``superseded`` notes."""
    answers = []
    while len(answers) < sent:
        msg = await ws.recv_json()
        assert "groups_current" in msg or msg == {"error": "superseded"}, msg
        answers.append(msg)
    return answers


@aio_test
async def test_a_burst_of_ten_ends_subscribed_to_the_last_set(server, publisher) -> None:
    ws = await server.connect()
    sets = [[f"job_events-{100 + i}", f"job_events-{200 + i}"] for i in range(10)]
    # Back to back, as one TCP write each, never waiting for an answer.
    for groups in sets:
        await ws.send_json({"groups": {"job_events": [int(g.split("-")[1]) for g in groups]}})
    answers = await answers_until_final(ws, len(sets))
    # Exactly one answer per message; the last is the reply to the last message.
    assert reply_to(sets[-1], answers[-1]) and answers[-1]["groups_joined"] == sorted(sets[-1])
    replies = [a for a in answers if "groups_current" in a]
    assert len(replies) + answers.count({"error": "superseded"}) == 10
    (conn,) = server.service.factory.connections
    assert server.service.hub.groups_of(conn) == frozenset(sets[-1])
    # Every group any message asked for gets a message: the earlier sets' first, in one queue,
    # so the first two deliveries prove nothing of theirs arrived.
    await publisher.publish_many([(g, json.dumps({"g": g}).encode(), None) for groups in sets for g in groups])
    assert sorted([(await ws.recv_json())["g"] for _ in range(2)]) == sorted(sets[-1])
    await ws.no_message()
    await ws.close()


@aio_test
async def test_twenty_subscribe_then_publish_cycles_all_deliver(server, publisher) -> None:
    ws = await server.connect()
    # Past the burst of 5, each subscribe waits for its token instead of being refused.
    for i in range(1, 21):
        group = f"job_events-{i}"
        reply = await ws.subscribe({"job_events": [i]})
        assert reply["groups_current"] == [group] and reply["errors"] == []
        await publisher.publish(group, {"cycle": i})
        assert await ws.recv_json() == {"cycle": i}
    await ws.no_message()
    await ws.close()


# -- the message sent the instant the socket opens ------------------------------------------------------


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await asyncio.wait_for(reader.readexactly(2), TIMEOUT)
    n = head[1] & 0x7F
    if n == 126:
        n = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), TIMEOUT))[0]
    elif n == 127:
        n = struct.unpack("!Q", await asyncio.wait_for(reader.readexactly(8), TIMEOUT))[0]
    return head[0] & 0x0F, await asyncio.wait_for(reader.readexactly(n), TIMEOUT)


async def open_with_groups(port: int, headers: str, *messages: dict) -> tuple[asyncio.StreamReader, Any]:
    """Send the upgrade request and ``messages`` in ONE write, before the server said anything."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)
    request = ("GET /websocket/ HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n")
    writer.write(request.encode() + b"".join(ws_frame(True, 0, 1, True, json.dumps(m).encode()) for m in messages))
    assert b" 101 " in await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    return reader, writer


async def read_json(reader: asyncio.StreamReader) -> Any:
    opcode, payload = await read_frame(reader)
    assert opcode == 1, (opcode, payload)
    return json.loads(payload)


@aio_test
async def test_groups_sent_with_the_handshake_are_handled(server, publisher) -> None:
    reader, writer = await open_with_groups(server.port, "Authorization: Token token-alice\r\n",
                                            {"groups": {"jobs": ["status_changed"]}})
    assert await read_json(reader) == {"accept": True, "user": 7}
    assert await read_json(reader) == {"groups_current": ["jobs-status_changed"], "groups_left": [],
                                       "groups_joined": ["jobs-status_changed"]}
    await publisher.publish("jobs-status_changed", {"ok": 1})
    assert await read_json(reader) == {"ok": 1}
    writer.close()


@aio_test
async def test_cookie_groups_sent_while_the_tower_api_authenticates(server_factory, fake_tower, publisher) -> None:
    # As the UIs do it: session cookies, the xrftoken, and two full groups messages at
    # once, while authentication (slowed down here) is still under way.
    fake_tower.delay = 0.2
    server = await server_factory(tower_url=fake_tower.url)
    first = {"groups": {"jobs": ["summary"]}, "xrftoken": ALICE.csrftoken}
    last = {"groups": {"jobs": ["status_changed"], "schedules": ["changed"]}, "xrftoken": ALICE.csrftoken}
    reader, writer = await open_with_groups(
        server.port, f"Origin: http://127.0.0.1\r\nCookie: sessionid={ALICE.session}; csrftoken={ALICE.csrftoken}\r\n",
        first, last)
    assert await read_json(reader) == {"accept": True, "user": ALICE.id}
    answer = await read_json(reader)
    assert reply_to(["jobs-summary"], answer) or answer == {"error": "superseded"}, answer
    assert reply_to(["jobs-status_changed", "schedules-changed"], await read_json(reader))
    await publisher.publish("jobs-summary", {"g": "jobs-summary"})
    await publisher.publish("schedules-changed", {"g": "schedules-changed"})
    assert await read_json(reader) == {"g": "schedules-changed"}
    writer.close()
    await eventually(lambda: not server.service.factory.connections)
