"""Limits that keep one client from hurting others: unit tests on a Clock, then end to end."""

from __future__ import annotations

import asyncio

import pytest
from twisted.internet.task import Clock

from conftest import Server, aio_test
from faketower import ALICE, BOB, eventually, fake_tower  # noqa: F401 (fixture)
from towerws.limits import TOO_MANY_CONNECTIONS, TOO_MANY_USER_CONNECTIONS, ConnectionLimits, TokenBucket

# -- units ----------------------------------------------------------------------------------------------


def test_token_bucket_bursts_then_refills_at_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(2.0, clock)
    assert [bucket.take() for _ in range(3)] == [True, True, False]
    clock.advance(0.5)  # one token back
    assert [bucket.take() for _ in range(2)] == [True, False]
    clock.advance(100)  # never more than the burst
    assert [bucket.take() for _ in range(3)] == [True, True, False]


def test_token_bucket_below_one_per_second() -> None:
    clock = Clock()
    bucket = TokenBucket(0.5, clock)
    assert [bucket.take(), bucket.take()] == [True, False]
    clock.advance(1.9)
    assert not bucket.take()
    clock.advance(0.2)
    assert bucket.take()


def test_token_bucket_says_when_the_next_token_is_due() -> None:
    clock = Clock()
    bucket = TokenBucket(2.0, clock)
    assert bucket.next_token_due() == 0.0
    bucket.take(), bucket.take()
    assert bucket.next_token_due() == 0.5
    clock.advance(0.2)
    assert bucket.next_token_due() == pytest.approx(0.3)
    clock.advance(0.3)
    assert bucket.next_token_due() == 0.0 and bucket.take()
    slow = TokenBucket(0.25, clock)  # capacity 1: the next one in 4 s
    assert slow.take() and slow.next_token_due() == 4.0
    clock.advance(4)
    assert slow.take()


def test_connection_limits_total_and_per_user() -> None:
    limits = ConnectionLimits(max_total=3, max_per_user=2)
    assert limits.admit(7) is None and limits.admit(7) is None
    assert limits.admit(7) == TOO_MANY_USER_CONNECTIONS
    assert limits.admit(8) is None
    assert limits.full() and limits.admit(9) == TOO_MANY_CONNECTIONS
    limits.release(7)
    assert not limits.full() and limits.of_user(7) == 1
    assert limits.admit(7) is None
    for uid in (7, 7, 8):
        limits.release(uid)
    assert limits.total == 0 and limits.of_user(7) == 0


# -- end to end (static tokens: the limits do not depend on the auth mode) --------------------------------


@aio_test
async def test_too_many_groups_changes_nothing(server_factory, publisher) -> None:
    server = await server_factory(max_groups_per_connection=3)
    ws = await server.connect()
    await ws.subscribe({"job_events": [1, 2, 3]})
    await ws.send_json({"groups": {"job_events": [1, 2, 3, 4]}})
    assert await ws.recv_json() == {"error": "too many groups"}
    # Unknown items do not count; the allowed three still apply.
    reply = await ws.subscribe({"job_events": [4, 5, 6, "x"], "nope": [1]})
    assert reply["groups_left"] == ["job_events-1", "job_events-2", "job_events-3"]
    assert reply["groups_current"] == ["job_events-4", "job_events-5", "job_events-6"]
    await publisher.publish("job_events-6", {"ok": 1})
    assert await ws.recv_json() == {"ok": 1}
    await ws.close()


@aio_test
async def test_groups_messages_over_the_rate_wait_and_the_last_one_wins(server_factory, publisher) -> None:
    server = await server_factory(max_groups_messages_per_second=0.5)  # one now, the next in 2 s
    ws = await server.connect()
    loop = asyncio.get_running_loop()
    before = loop.time()  # the only token is spent after this, so the next is due 2 s after it at the earliest
    await ws.subscribe({"job_events": [1]})
    for i in range(2, 5):  # sent back to back, without waiting for replies
        await ws.send_json({"groups": {"job_events": [i]}})
    # 2 waits for the token; 3 supersedes it, 4 supersedes 3: one answer per message.
    assert [await ws.recv_json() for _ in range(2)] == [{"error": "superseded"}] * 2
    assert await ws.recv_json(timeout=5) == {
        "groups_current": ["job_events-4"], "groups_left": ["job_events-1"], "groups_joined": ["job_events-4"]}
    assert loop.time() - before > 1.9  # the rate still holds
    for i in (1, 2, 3, 4):
        await publisher.publish(f"job_events-{i}", {"n": i})
    assert await ws.recv_json() == {"n": 4}
    await ws.no_message()
    await ws.close()


async def refused_with_1013(client) -> str:
    hello = await client.recv_json()
    assert hello["accept"] is False and hello["user"] is None and hello["close"] is True
    code, _ = await client.closed()
    assert code == 1013
    return hello["error"]


def open_count(server: Server) -> int:
    return len(server.service.factory.connections)


@aio_test
async def test_connections_per_user(server_factory) -> None:
    server = await server_factory(max_connections_per_user=2)
    alice = [await server.connect("token-alice") for _ in range(2)]
    assert await refused_with_1013(await server.connect("token-alice", accept=False)) == TOO_MANY_USER_CONNECTIONS
    bob = await server.connect("token-bob")  # other users are not affected
    await alice[0].close()
    await eventually(lambda: open_count(server) == 2)
    alice[0] = await server.connect("token-alice")  # a freed slot can be used again
    for ws in alice + [bob]:
        await ws.close()


@aio_test
async def test_connections_in_total_refused_without_asking_the_api(server_factory, fake_tower) -> None:
    server = await server_factory(tower_url=fake_tower.url, max_connections=2)
    first = await server.connect(ALICE.token)
    second = await server.connect(BOB.token)
    asked = len(fake_tower.requests)
    assert await refused_with_1013(await server.connect("any-token", accept=False)) == TOO_MANY_CONNECTIONS
    assert len(fake_tower.requests) == asked
    await first.close()
    await eventually(lambda: open_count(server) == 1)
    third = await server.connect(ALICE.token)
    await second.close()
    await third.close()


async def held_open_until_dropped(server: Server, send: list[bytes], gap: float) -> float:
    """Open TCP, send ``send`` pieces ``gap`` seconds apart (never a complete request); seconds until dropped."""
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    started = loop.time()

    async def trickle() -> None:
        for piece in send:
            writer.write(piece)
            await asyncio.sleep(gap)

    feeder = asyncio.ensure_future(trickle())
    try:
        assert await asyncio.wait_for(reader.read(65536), 10) == b""  # EOF: the server ended it
    except ConnectionResetError:
        pass  # an abort is as good as a close here
    finally:
        feeder.cancel()
        writer.close()
    return loop.time() - started


@aio_test
async def test_client_that_never_completes_the_handshake_is_dropped(server_factory) -> None:
    server = await server_factory(open_handshake_timeout=0.5)
    assert await held_open_until_dropped(server, [], 0) < 5
    request = b"GET /websocket/?token=token-alice HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    # A partial request, then a byte every 0.1 s: an idle timeout would never fire.
    pieces = [request] + [b"X"] * 200
    elapsed = await held_open_until_dropped(server, pieces, 0.1)
    assert 0.4 < elapsed < 5
    # A client that completes it in time is served as usual.
    ws = await server.connect()
    await ws.close()
