"""The core pipeline end to end: real RabbitMQ, in-process service, ``websockets`` clients, pika publisher."""

from __future__ import annotations

import asyncio
import datetime
import decimal
import json
import subprocess

import pytest
import websockets

from conftest import Server, aio_test, connect, http_get, read_to_eof
from towerws.websocket.web import MAX_HEAD

pytestmark = pytest.mark.usefixtures("server")


# -- handshake and authentication ---------------------------------------------------


@aio_test
async def test_token_in_query_is_accepted_with_user_id(server: Server) -> None:
    ws = await connect(server.url, "token-alice", accept=False)
    assert await ws.recv_json() == {"accept": True, "user": 7}
    await ws.close()


@pytest.mark.parametrize("scheme", ["Token", "Bearer"])
@aio_test
async def test_token_in_authorization_header(server: Server, scheme: str) -> None:
    ws = await connect(server.url, None, accept=False, additional_headers={"Authorization": f"{scheme} token-bob"})
    assert await ws.recv_json() == {"accept": True, "user": 8}
    await ws.close()


@pytest.mark.parametrize("token", ["wrong", None])
@aio_test
async def test_bad_or_missing_token_gets_4401(server: Server, publisher, token) -> None:
    ws = await connect(server.url, token, accept=False)
    hello = await ws.recv_json()
    assert hello["accept"] is False and hello["user"] is None and hello["close"] is True
    assert hello["error"]
    code, _ = await ws.closed()
    assert code == 4401


@aio_test
async def test_refused_connection_can_never_subscribe(server: Server, publisher) -> None:
    # A client that ignores the refusal and sends a groups message at once.
    ws = await connect(server.url, "wrong", accept=False)
    try:
        await ws.send_json({"groups": {"jobs": ["status_changed"]}})
    except websockets.ConnectionClosed:
        pass  # the server may already have closed; either way nothing may be joined
    assert (await ws.recv_json())["accept"] is False
    code, _ = await ws.closed()
    assert code == 4401
    assert server.service.hub.active_groups == frozenset()


@pytest.mark.parametrize("path", ["/websocket", "/websocket/"])
@aio_test
async def test_both_paths_work(server: Server, path: str) -> None:
    ws = await connect(f"ws://127.0.0.1:{server.port}{path}", "token-alice")
    await ws.close()


@pytest.mark.parametrize("path", ["/", "/websocket/x", "/ws/", "/websocketx"])
@aio_test
async def test_other_paths_are_404(server: Server, path: str) -> None:
    with pytest.raises(websockets.InvalidStatus) as info:
        await connect(f"ws://127.0.0.1:{server.port}{path}", "token-alice")
    assert info.value.response.status_code == 404


@pytest.mark.parametrize("path", ["/websocket", "/websocket/"])
@aio_test
async def test_plain_http_on_the_websocket_path_is_426(server: Server, path: str) -> None:
    status, headers, body = await http_get(f"{server.http}{path}?token=token-alice")
    assert status == 426 and headers["upgrade"] == "websocket" and b"websocket only" in body


@aio_test
async def test_an_endless_request_head_is_left_to_twisted_web_which_refuses_it(server: Server) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /websocket/ HTTP/1.1\r\nX-Filler: " + b"a" * (MAX_HEAD + 1000))
    response = await read_to_eof(reader)  # Twisted Web closes it (an over-long header line)
    assert response == b"" or response.startswith(b"HTTP/1.1 4"), response[:100]
    writer.close()
    # The server is fine.
    ws = await server.connect()
    await ws.close()


# -- subscriptions ---------------------------------------------------------------------


@aio_test
async def test_subscribe_reply_then_delivery_byte_for_byte(server: Server, publisher) -> None:
    ws = await server.connect()
    reply = await ws.subscribe({"jobs": ["status_changed"], "job_events": [42]})
    assert reply == {
        "groups_current": ["job_events-42", "jobs-status_changed"],
        "groups_left": [],
        "groups_joined": ["job_events-42", "jobs-status_changed"],
        "errors": [],
    }
    # Published right after the reply: must arrive, exactly as sent.
    body = '{"status":"running",  "unit": "\u00e9\u4e2d",\n"id": 1}'.encode()
    await publisher.publish("job_events-42", body)
    assert (await ws.recv()).encode() == body
    await ws.close()


@aio_test
async def test_groups_message_replaces_subscriptions(server: Server, publisher) -> None:
    ws = await server.connect()
    await ws.subscribe({"jobs": ["status_changed", "summary"]})
    reply = await ws.subscribe({"jobs": ["summary"], "schedules": ["changed"]})
    assert reply["groups_current"] == ["jobs-summary", "schedules-changed"]
    assert reply["groups_joined"] == ["schedules-changed"]
    assert reply["groups_left"] == ["jobs-status_changed"]
    await publisher.publish("jobs-status_changed", {"n": 1})
    await publisher.publish("schedules-changed", {"n": 2})
    assert await ws.recv_json() == {"n": 2}
    reply = await ws.subscribe({})
    assert reply["groups_current"] == [] and reply["groups_left"] == ["jobs-summary", "schedules-changed"]
    await publisher.publish("schedules-changed", {"n": 3})
    await ws.no_message()
    await ws.close()


@aio_test
async def test_clients_get_only_their_own_groups(server: Server, publisher) -> None:
    a = await server.connect("token-alice")
    b = await server.connect("token-bob")
    await a.subscribe({"job_events": [1]})
    await b.subscribe({"job_events": [2], "jobs": ["summary"]})
    await publisher.publish("job_events-1", {"to": "a"})
    await publisher.publish("job_events-2", {"to": "b"})
    await publisher.publish("jobs-summary", {"to": "b2"})
    assert await a.recv_json() == {"to": "a"}
    assert await b.recv_json() == {"to": "b"}
    assert await b.recv_json() == {"to": "b2"}
    await a.no_message()
    await a.close()
    await b.close()


@aio_test
async def test_shared_group_reaches_every_subscriber_once(server: Server, publisher) -> None:
    clients = [await server.connect() for _ in range(5)]
    for c in clients:
        await c.subscribe({"jobs": ["status_changed"]})
    await publisher.publish("jobs-status_changed", {"status": "ok"})
    for c in clients:
        assert await c.recv_json() == {"status": "ok"}
    await publisher.publish("jobs-status_changed", {"status": "next"})
    for c in clients:
        assert await c.recv_json() == {"status": "next"}  # not a duplicate of the first
        await c.close()


@aio_test
async def test_thousand_messages_complete_and_in_order(server: Server, publisher) -> None:
    ws = await server.connect()
    await ws.subscribe({"job_events": [7]})
    await publisher.publish_many([("job_events-7", json.dumps({"seq": i}).encode(), None) for i in range(1000)])
    got = [(await ws.recv_json())["seq"] for _ in range(1000)]
    assert got == list(range(1000))
    await ws.close()


@aio_test
async def test_invalid_body_is_skipped_and_next_delivered(server: Server, publisher) -> None:
    ws = await server.connect()
    await ws.subscribe({"job_events": [9]})
    # The last three are JSON to Python's json module, but not to a browser's JSON.parse (RFC 8259).
    bad_bodies = (b"not json", b"\xff\xfe{}", b"{\"a\": ", b"", b'{"n": NaN}', b"[Infinity]", b"-Infinity")
    for bad in bad_bodies:
        await publisher.publish("job_events-9", bad)
    await publisher.publish("job_events-9", {"ok": True})
    assert await ws.recv_json() == {"ok": True}
    assert server.service.bus.dropped == len(bad_bodies)
    await ws.close()


@aio_test
async def test_messages_with_every_header_type_are_consumed(server: Server, publisher) -> None:
    ws = await server.connect()
    await ws.subscribe({"job_events": [5]})
    headers = {
        "x-long": 2**40,
        "x-negative": -5,
        "x-stamp": datetime.datetime(2026, 1, 2, 3, 4, 5),
        "x-array": [1, "two", [3], {"four": 4}],
        "x-table": {"nested": {"deep": True}},
        "x-bool": False,
        "x-decimal": decimal.Decimal("12.50"),
        "x-bytes": b"\x00\x01binary",
        "x-none": None,
        "x-death": [{"count": 1, "reason": "expired", "queue": "q", "time": datetime.datetime(2026, 1, 1)}],
    }
    await publisher.publish("job_events-5", {"with": "headers"}, headers=headers)
    await publisher.publish("job_events-5", {"after": "headers"})
    assert await ws.recv_json() == {"with": "headers"}
    assert await ws.recv_json() == {"after": "headers"}
    await ws.close()


@aio_test
async def test_control_group_only_for_own_user(server: Server, publisher) -> None:
    ws = await server.connect("token-alice")  # user 7
    reply = await ws.subscribe({"control": ["limit_reached_7", "limit_reached_8"]})
    assert reply["groups_current"] == ["control-limit_reached_7"]
    assert reply["errors"] == [{"error": "access denied to channel control for resource id limit_reached_8"}]
    await ws.close()


# -- errors leave the connection and its subscriptions alone -------------------------


@aio_test
async def test_error_replies_keep_connection_and_subscriptions(server: Server, publisher) -> None:
    ws = await server.connect()
    await ws.subscribe({"job_events": [3]})
    await ws.ws.send("this is not json")
    assert (await ws.recv_json())["error"].startswith("invalid message: ")
    await ws.ws.send("[1, 2]")
    assert (await ws.recv_json())["error"].startswith("invalid message: ")
    await ws.send_json({"groups": {"jobs": ["summary"], "job_events": 4}})
    assert await ws.recv_json() == {"error": "access denied to channel"}
    await publisher.publish("job_events-3", {"still": "subscribed"})
    assert await ws.recv_json() == {"still": "subscribed"}
    await ws.close()


@aio_test
async def test_unknown_items_denied_valid_ones_apply(server: Server, publisher) -> None:
    ws = await server.connect()
    reply = await ws.subscribe({"jobs": ["status_changed", "bogus"], "nope": [1], "job_events": ["x", 12]})
    assert reply["groups_current"] == ["job_events-12", "jobs-status_changed"]
    assert sorted(e["error"] for e in reply["errors"]) == [
        "access denied to channel job_events for resource id x",
        "access denied to channel jobs for resource id bogus",
        "access denied to channel nope for resource id 1",
    ]
    await ws.close()


@aio_test
async def test_binary_frame_closes_1003(server: Server) -> None:
    ws = await server.connect()
    await ws.ws.send(b"\x00\x01")
    code, _ = await ws.closed()
    assert code == 1003


@aio_test
async def test_oversized_message_closes_1009(server_factory) -> None:
    server = await server_factory(max_message_size=1024)
    ws = await server.connect()
    await ws.ws.send(json.dumps({"groups": {"jobs": ["x" * 2000]}}))
    code, _ = await ws.closed()
    assert code == 1009


@aio_test
async def test_bad_clients_do_not_disturb_others(server: Server, publisher) -> None:
    good = await server.connect()
    await good.subscribe({"job_events": [1]})
    bad = await server.connect()
    for junk in ("{", "\x00", '{"groups": {"job_events": [' + "[" * 5000 + "]}}", "null", '{"groups": "x"}'):
        await bad.ws.send(junk)
        assert "error" in await bad.recv_json()
    await bad.ws.send(b"binary")
    assert (await bad.closed())[0] == 1003
    await publisher.publish("job_events-1", {"fine": True})
    assert await good.recv_json() == {"fine": True}
    await good.close()


# -- liveness ------------------------------------------------------------------------------


@aio_test
async def test_server_drops_clients_that_do_not_answer_pings(server_factory) -> None:
    server = await server_factory(ping_interval=0.2, ping_timeout=0.3)
    # A raw TCP client completes the handshake and then never reads or answers.
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(
        b"GET /websocket/?token=token-alice HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    status = await asyncio.wait_for(reader.readline(), 5)
    assert b" 101 " in status
    # Read until EOF: the server must end the connection on its own.
    started = loop.time()
    try:
        while await asyncio.wait_for(reader.read(65536), 5):
            pass
    except ConnectionResetError:
        pass  # an abort is as good as a close here
    assert loop.time() - started < 5
    writer.close()


# -- bindings follow local subscribers -------------------------------------------------


def _bindings(queue: str) -> set[str]:
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_bindings", "destination_name", "routing_key"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout
    return {line.split("\t")[1] for line in out.splitlines() if line.split("\t")[0] == queue}


@aio_test
async def test_queue_bound_only_to_groups_with_subscribers(server: Server) -> None:
    queue = server.service.bus.queue
    a = await server.connect()
    b = await server.connect()
    await a.subscribe({"job_events": [1, 2]})
    await b.subscribe({"job_events": [2], "jobs": ["summary"]})
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, _bindings, queue) == {queue, "job_events-1", "job_events-2", "jobs-summary"}
    await a.subscribe({})
    await b.close()
    bus = server.service.bus
    # Unbinds are confirmed asynchronously: wait (bounded) until the last is (a group leaves
    # bound_count only once the broker confirmed its unbind; nobody is left to bind anything).
    for _ in range(100):
        if bus.bound_count == 0:
            break
        await asyncio.sleep(0.05)
    assert await loop.run_in_executor(None, _bindings, queue) == {queue}  # only the default binding
    await a.close()


@aio_test
async def test_amqp_heartbeat_is_negotiated(server_factory) -> None:
    server = await server_factory(amqp_heartbeat=7)
    port = server.service.bus.client.transport.getHost().port

    def heartbeat_of_our_connection() -> str:
        out = subprocess.run(["rabbitmqctl", "-q", "list_connections", "peer_port", "timeout"],
                             check=True, capture_output=True, text=True, timeout=60).stdout
        return dict(line.split("\t") for line in out.splitlines() if "\t" in line)[str(port)]

    assert await asyncio.get_running_loop().run_in_executor(None, heartbeat_of_our_connection) == "7"
