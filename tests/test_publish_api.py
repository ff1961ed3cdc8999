"""POST /api/publish against the real broker, its error cases, and the resource's contract
that 202 is sent only once every message is confirmed."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import pika
import pytest
import pytest_twisted
import treq
from twisted.internet.defer import Deferred
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from conftest import AMQP_URL, Bound, Server, aio, aio_test, free_port, wait
from towerws.config import DEFAULT_GROUPS, SecretFile
from towerws.websocket.publish_api import PublishResource
from towerws.subscribe import Allowlist

SECRET = "s3cret-publish-token-0123456789"


@pytest.fixture
def secret_file(tmp_path: Path) -> str:
    path = tmp_path / "publish.secret"
    path.write_text(SECRET + "\n")
    return str(path)


async def post(server: Server, body: Any, secret: str | None = SECRET, raw: bytes | None = None,
               headers: dict | None = None) -> tuple[int, Any, Any]:
    hdrs = {"Content-Type": ["application/json"], **(headers or {})}
    if secret is not None:
        hdrs["Authorization"] = [f"Bearer {secret}"]
    data = raw if raw is not None else json.dumps(body).encode()
    response = await wait(treq.post(f"{server.http}/api/publish", data=data, headers=hdrs))
    content = await wait(treq.content(response))
    try:
        parsed = json.loads(content)
    except ValueError:
        parsed = content
    return response.code, parsed, response.headers


@pytest.fixture
def api_server(server_factory: Any, secret_file: str) -> Server:
    return pytest_twisted.blockon(aio(server_factory(publish_secret_file=secret_file)))


@aio_test
async def test_publish_one_reaches_subscribers_and_is_queued_when_202(api_server: Server, exchange: str) -> None:
    ws = await api_server.connect()
    await ws.subscribe({"jobs": ["status_changed"]})
    bound = await asyncio.to_thread(Bound, exchange, ("jobs-status_changed",))
    try:
        code, body, _ = await post(api_server, {"group": "jobs-status_changed", "payload": {"status": "running", "id": 42}})
        assert (code, body) == (202, {"published": 1})
        # Confirmed means queued: the message is already in a queue bound to the exchange.
        msg = await asyncio.to_thread(bound.get_now)
        assert msg is not None and msg.routing_key == "jobs-status_changed"
    finally:
        await asyncio.to_thread(bound.close)
    assert await ws.recv_json() == {"status": "running", "id": 42}
    await ws.close()


@aio_test
async def test_publish_list_in_order(api_server: Server) -> None:
    ws = await api_server.connect("token-alice")  # user 7
    await ws.subscribe({"job_events": [5], "control": ["limit_reached_7"]})
    items = [{"group": "job_events-5", "payload": {"seq": n}} for n in range(20)]
    items.append({"group": "control-limit_reached_7", "payload": "limit"})
    code, body, _ = await post(api_server, items)
    assert (code, body) == (202, {"published": 21})
    assert [(await ws.recv_json()) for _ in range(21)] == [{"seq": n} for n in range(20)] + ["limit"]
    await ws.close()


@pytest.mark.parametrize("secret,headers", [
    (None, {}),
    ("wrong-secret-wrong-secret-000000", {}),
    (SECRET + "x", {}),
    (None, {"Authorization": [f"Token {SECRET}"]}),
    (None, {"Authorization": [SECRET]}),
])
@aio_test
async def test_missing_or_wrong_secret_is_401_and_publishes_nothing(api_server: Server, secret: str | None,
                                                                    headers: dict) -> None:
    ws = await api_server.connect()
    await ws.subscribe({"jobs": ["summary"]})
    code, body, hdrs = await post(api_server, {"group": "jobs-summary", "payload": "sneaky"}, secret=secret,
                                  headers=headers)
    assert code == 401 and body == {"error": "missing or wrong bearer secret"}
    assert hdrs.getRawHeaders("www-authenticate") == ['Bearer realm="towerws"']
    assert (await post(api_server, {"group": "jobs-summary", "payload": "sentinel"}))[0] == 202
    assert await ws.recv_json() == "sentinel"
    await ws.no_message()
    await ws.close()


@pytest.mark.parametrize("raw,error,item", [
    (b"{not json", "request body is not valid JSON", None),
    (b'{"group": "jobs-summary", "payload": NaN}', "request body is not valid JSON: NaN is not valid JSON", None),
    (b"\xff\xfe", "request body is not UTF-8", None),
    (b"[]", "expected at least one item", None),
    (b'[{"group": "jobs-summary", "payload": 1}, 7]', "item 1: expected an object", 1),
    (b'{"group": "jobs-summary"}', 'item 0: missing "payload"', 0),
    (b'{"group": 5, "payload": 1}', 'item 0: "group" must be a string', 0),
    (b'{"group": "jobs-summary", "payload": 1, "extra": 2}', "item 0: unknown field 'extra'", 0),
    (b'[{"group": "jobs-summary", "payload": 1}, {"group": "jobs-bogus", "payload": 2}]',
     "item 1: group 'jobs-bogus' is not allowed", 1),
    (b'[{"group": "jobs-summary", "payload": 1}, {"group": "nope-1", "payload": 2}]',
     "item 1: group 'nope-1' is not allowed", 1),
    (b'[{"group": "jobs-summary", "payload": 1}, {"group": "job_events-042", "payload": 2}]',
     "item 1: group 'job_events-042' is not allowed", 1),
    (b'[{"group": "jobs-summary", "payload": 1}, {"group": "jobs-#", "payload": 2}]',
     "item 1: group 'jobs-#' is not allowed", 1),
])
@aio_test
async def test_bad_request_is_400_naming_the_item_and_publishes_nothing(api_server: Server, raw: bytes, error: str,
                                                                       item: int | None) -> None:
    ws = await api_server.connect()
    await ws.subscribe({"jobs": ["summary"]})
    code, body, _ = await post(api_server, None, raw=raw)
    assert code == 400
    assert body["error"].startswith(error), body
    assert body.get("item") == item
    assert (await post(api_server, {"group": "jobs-summary", "payload": "sentinel"}))[0] == 202
    assert await ws.recv_json() == "sentinel"  # the valid items of the bad request were not published
    await ws.no_message()
    await ws.close()


@aio_test
async def test_oversize_item_is_400_and_nothing_published(server_factory: Any, secret_file: str) -> None:
    server = await server_factory(publish_secret_file=secret_file, publish_max_payload=100)
    ws = await server.connect()
    await ws.subscribe({"jobs": ["summary"]})
    items = [{"group": "jobs-summary", "payload": "x" * 98}, {"group": "jobs-summary", "payload": "x" * 99}]
    code, body, _ = await post(server, items)
    assert code == 400 and body["item"] == 1
    assert body["error"] == "item 1: payload is 101 bytes of JSON, over the limit of 100"
    assert (await post(server, items[0]))[0] == 202  # exactly at the limit
    assert await ws.recv_json() == "x" * 98
    await ws.no_message()
    await ws.close()


@aio_test
async def test_other_methods_are_405(api_server: Server) -> None:
    response = await wait(treq.get(f"{api_server.http}/api/publish"))
    assert response.code == 405
    assert response.headers.getRawHeaders("allow") == ["POST"]
    await wait(treq.content(response))


@aio_test
async def test_without_the_option_the_endpoint_is_404(server: Server) -> None:
    code, _, _ = await post(server, {"group": "jobs-summary", "payload": 1})
    assert code == 404
    response = await wait(treq.get(f"{server.http}/api/"))
    assert response.code == 404
    await wait(treq.content(response))


@aio_test
async def test_broker_down_is_503(server_factory: Any, secret_file: str) -> None:
    # The publish waits (for a broker node to come back) up to --publish-timeout, then says why.
    server = await server_factory(ready=False, publish_secret_file=secret_file, publish_timeout="1",
                                  amqp_url=f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F")
    assert server.service.bus.state == "connecting"
    code, body, _ = await post(server, [{"group": "jobs-summary", "payload": 1}])
    assert code == 503
    assert body["error"] == ("broker unavailable: no broker node confirmed the message within 1 s "
                             "(not connected to a broker)") and body["confirmed"] == 0
    assert "guest:guest" not in json.dumps(body)


def test_secret_file_errors_do_not_show_the_secret(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_text("tooshort\n")
    with pytest.raises(ValueError, match="at least 16 characters") as info:
        SecretFile.load(str(short))
    assert "tooshort" not in str(info.value)
    with pytest.raises(ValueError, match="cannot read"):
        SecretFile.load(str(tmp_path / "missing"))
    good = tmp_path / "good"
    good.write_text(f"  {SECRET}  \n")
    loaded = SecretFile.load(str(good))
    assert loaded.secret == SECRET.encode() and SECRET not in repr(loaded)


@pytest.mark.parametrize("group,ok", [
    ("jobs-status_changed", True), ("jobs-summary", True), ("job_events-42", True),
    ("control-limit_reached_7", True), ("control-limit_reached_123456", True),
    ("control-limit_reached_0", False), ("control-limit_reached_007", False), ("control-limit_reached_", False),
    ("control-limit_reached_-1", False), ("control-limit_reached_x", False),
    ("job_events-0", False), ("job_events-042", False), ("job_events-1" + "0" * 18, False),
    ("job_events-4\u0662", False), ("jobs-status_changed-1", False), ("jobs", False), ("jobs-", False),
    ("-summary", False), ("jobs-*", False), ("jobs-#", False),
])
def test_publishable_groups(group: str, ok: bool) -> None:
    assert Allowlist.parse(DEFAULT_GROUPS).publishable(group) is ok


class PendingBus:
    """A bus whose confirms the test fires: shows when the resource answers."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes, Deferred]] = []

    def publish(self, group: str, body: bytes) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.calls.append((group, body, d))
        return d


def test_202_only_once_every_message_is_confirmed(tmp_path: Path) -> None:
    secret = tmp_path / "s"
    secret.write_text(SECRET)
    bus = PendingBus()
    resource = PublishResource(bus, SecretFile.load(str(secret)), Allowlist.parse(DEFAULT_GROUPS), 1000)
    request = DummyRequest([b""])
    request.method = b"POST"
    request.requestHeaders.setRawHeaders(b"authorization", [f"Bearer {SECRET}".encode()])
    request.content = io.BytesIO(json.dumps([{"group": "jobs-summary", "payload": n} for n in range(2)]).encode())
    assert resource.render(request) == NOT_DONE_YET
    assert [(g, b) for g, b, _ in bus.calls] == [("jobs-summary", b"0"), ("jobs-summary", b"1")]
    bus.calls[1][2].callback(None)
    assert request.finished == 0  # one of two confirmed: no answer yet
    bus.calls[0][2].callback(None)
    assert request.finished == 1 and request.responseCode == 202
    assert json.loads(b"".join(request.written)) == {"published": 2}


@aio_test
async def test_publishing_channel_lost_costs_a_reconnect_and_the_publish_goes_through(api_server: Server, exchange: str) -> None:
    bus = api_server.service.bus
    ws = await api_server.connect()
    await ws.subscribe({"jobs": ["summary"]})

    def delete_exchange() -> None:
        with pika.BlockingConnection(pika.URLParameters(AMQP_URL)) as conn:
            conn.channel().exchange_delete(exchange)

    await asyncio.to_thread(delete_exchange)
    client = bus.client
    # The broker closes the publishing channel (404 no exchange); that costs the connection, the
    # node reconnects, declares the exchange again, and the publish is sent again and confirmed.
    code, body, _ = await post(api_server, {"group": "jobs-summary", "payload": 1})
    assert code == 202, body
    assert client.lost.called and bus.client is not client
    await wait(bus.when_bound(["jobs-summary"]))
    assert (await post(api_server, {"group": "jobs-summary", "payload": 3}))[0] == 202
    # The new exchange has no bindings until the node re-binds: payload 1 is lost to the client
    # when its retry got there first (confirmed, and routed nowhere).
    first = await ws.recv_json()
    assert first == 3 or (first == 1 and await ws.recv_json() == 3)
    await ws.close()
