"""Authentication and authorization against the (fake) Tower API, end to end.

Real towerws in process, real RabbitMQ, real ``websockets`` clients; the Tower
API is a real twisted.web server on loopback (``faketower``).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
import websockets
from twisted.logger import formatEvent, globalLogPublisher

from conftest import Client, Server, aio_test, connect
from faketower import (  # noqa: F401 (fake_tower is a fixture)
    ADMIN, ALICE, BOB, KINDS, FakeTower, FakeUser, eventually, fake_tower, make_tls_files, object_path,
)

UNAVAILABLE = {"accept": False, "user": None, "close": True, "error": "authentication service unavailable"}
ME = "/api/v2/me/"


def cookie(user: FakeUser, csrftoken: bool = True) -> str:
    text = f"sessionid={user.session}; other=1"
    return text + (f"; csrftoken={user.csrftoken}" if csrftoken else "")


async def by_cookie(server: Server, user: FakeUser = ALICE, **kw: Any) -> Client:
    return await server.connect(None, additional_headers={"Cookie": cookie(user)}, **kw)


async def tower_server(server_factory: Any, fake: FakeTower, **extra: Any) -> Server:
    return await server_factory(tower_url=fake.url, **extra)


async def refused(client: Client) -> tuple[dict, int | None]:
    hello = await client.recv_json()
    code, _ = await client.closed()
    return hello, code


# -- authentication ----------------------------------------------------------------------------


@aio_test
async def test_session_cookie_is_forwarded_and_authenticates(server_factory, fake_tower) -> None:
    server = await tower_server(server_factory, fake_tower)
    ws = await by_cookie(server, accept=False)
    assert await ws.recv_json() == {"accept": True, "user": ALICE.id}
    (seen,) = fake_tower.requests
    assert seen.path == ME
    assert seen.headers["cookie"] == cookie(ALICE)  # unchanged
    assert "authorization" not in seen.headers
    await ws.close()


@aio_test
async def test_cookie_connection_needs_matching_xrftoken(server_factory, fake_tower, publisher) -> None:
    fake_tower.objects[object_path("job_events", 42)] = {ALICE.id}
    server = await tower_server(server_factory, fake_tower)
    ws = await by_cookie(server)
    reply = await ws.subscribe({"jobs": ["status_changed"]}, xrftoken=ALICE.csrftoken)
    assert reply["groups_current"] == ["jobs-status_changed"] and reply["errors"] == []
    for extra in ({}, {"xrftoken": "wrong"}, {"xrftoken": BOB.csrftoken}, {"xrftoken": ""}):
        await ws.send_json({"groups": {"job_events": [42]}, **extra})
        assert await ws.recv_json() == {"error": "access denied to channel"}
    # Nothing changed: still in jobs-status_changed, never in job_events-42.
    assert fake_tower.count(object_path("job_events", 42)) == 0
    await publisher.publish("job_events-42", {"leak": True})
    await publisher.publish("jobs-status_changed", {"still": "subscribed"})
    assert await ws.recv_json() == {"still": "subscribed"}
    await ws.close()


@aio_test
async def test_cookie_without_csrftoken_can_never_subscribe(server_factory, fake_tower) -> None:
    server = await tower_server(server_factory, fake_tower)
    ws = await server.connect(None, additional_headers={"Cookie": cookie(ALICE, csrftoken=False)})
    await ws.send_json({"groups": {"jobs": ["summary"]}, "xrftoken": ALICE.csrftoken})
    assert await ws.recv_json() == {"error": "access denied to channel"}
    await ws.close()


@pytest.mark.parametrize(
    "how,forwarded",
    [("query", f"Bearer {BOB.token}"), ("bearer", f"Bearer {BOB.token}"), ("token", f"Token {BOB.token}")],
)
@aio_test
async def test_token_connections_forward_authorization_and_need_no_xrftoken(
    server_factory, fake_tower, how: str, forwarded: str
) -> None:
    server = await tower_server(server_factory, fake_tower)
    if how == "query":
        ws = await server.connect(BOB.token, accept=False)
    else:
        ws = await server.connect(None, accept=False, additional_headers={"Authorization": forwarded})
    assert await ws.recv_json() == {"accept": True, "user": BOB.id}
    (seen,) = fake_tower.requests
    assert seen.headers["authorization"] == forwarded and "cookie" not in seen.headers
    reply = await ws.subscribe({"jobs": ["summary"]})  # no xrftoken
    assert reply["groups_current"] == ["jobs-summary"] and reply["errors"] == []
    await ws.close()


@aio_test
async def test_token_wins_over_cookies_and_api_cookies_are_never_sent_on(server_factory, fake_tower) -> None:
    server = await tower_server(server_factory, fake_tower)
    # A page could add its own token to a browser's cookies: it then acts as the token's owner.
    ws = await server.connect(BOB.token, accept=False, additional_headers={"Cookie": cookie(ALICE)})
    assert await ws.recv_json() == {"accept": True, "user": BOB.id}
    other = await server.connect(ADMIN.token, accept=False)
    assert (await other.recv_json())["user"] == ADMIN.id
    # The fake sets a cookie on every answer; towerws keeps no cookie jar.
    assert [s.headers.get("cookie") for s in fake_tower.requests] == [None, None]
    await ws.close()
    await other.close()


@pytest.mark.parametrize(
    "token,headers",
    [("not-a-token", {}), (None, {"Cookie": "sessionid=forged; csrftoken=x"}), (None, {"Authorization": "Bearer nope"})],
)
@aio_test
async def test_rejected_credentials_get_4401(server_factory, fake_tower, token, headers) -> None:
    server = await tower_server(server_factory, fake_tower)
    ws = await server.connect(token, accept=False, additional_headers=headers)
    hello, code = await refused(ws)
    assert hello == {"accept": False, "user": None, "close": True, "error": "authentication failed"}
    assert code == 4401
    assert fake_tower.paths() == [ME]


@pytest.mark.parametrize("token", [None, "bad\x01token", "x" * 5000])
@aio_test
async def test_no_usable_credentials_get_4401_without_asking(server_factory, fake_tower, token) -> None:
    server = await tower_server(server_factory, fake_tower)
    ws = await connect(server.url + ("" if token is None else "?token=" + token.replace("\x01", "%01")), None,
                       accept=False)
    _, code = await refused(ws)
    assert code == 4401
    assert fake_tower.requests == []


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@aio_test
async def test_api_unreachable_gets_1013(server_factory) -> None:
    server = await server_factory(tower_url=f"http://127.0.0.1:{closed_port()}")
    ws = await server.connect(ALICE.token, accept=False)
    hello, code = await refused(ws)
    assert hello == UNAVAILABLE and code == 1013


@pytest.mark.parametrize("status", [500, 502, 503, 429, 302, 404])
@aio_test
async def test_api_errors_get_1013_not_4401(server_factory, fake_tower, status: int) -> None:
    fake_tower.force_status = status
    server = await tower_server(server_factory, fake_tower)
    ws = await server.connect(ALICE.token, accept=False)
    hello, code = await refused(ws)
    assert hello == UNAVAILABLE and code == 1013


@aio_test
async def test_api_too_slow_gets_1013(server_factory, fake_tower) -> None:
    fake_tower.delay = 3.0
    server = await tower_server(server_factory, fake_tower, tower_timeout=0.3)
    loop = asyncio.get_running_loop()
    started = loop.time()
    ws = await server.connect(ALICE.token, accept=False)
    hello, code = await refused(ws)
    assert hello == UNAVAILABLE and code == 1013
    assert loop.time() - started < 2.5  # the timeout, not the slow answer, decided


@aio_test
async def test_unavailable_answers_are_not_cached(server_factory, fake_tower) -> None:
    fake_tower.force_status = 500
    server = await tower_server(server_factory, fake_tower)
    _, code = await refused(await server.connect(ALICE.token, accept=False))
    assert code == 1013
    fake_tower.force_status = None
    ws = await server.connect(ALICE.token)  # asks again and gets in
    assert fake_tower.count(ME) == 2
    await ws.close()


@aio_test
async def test_me_answer_as_plain_object(server_factory, fake_tower) -> None:
    fake_tower.me_as_object = True
    server = await tower_server(server_factory, fake_tower)
    ws = await server.connect(ADMIN.token, accept=False)
    assert await ws.recv_json() == {"accept": True, "user": ADMIN.id}
    await ws.close()


@aio_test
async def test_answers_are_cached_per_credential(server_factory, fake_tower) -> None:
    server = await tower_server(server_factory, fake_tower)
    a1 = await server.connect(ALICE.token)
    a2 = await server.connect(ALICE.token)
    b = await by_cookie(server, BOB)
    assert fake_tower.count(ME) == 2  # alice's token once, bob's cookie once
    for _ in range(2):  # a negative answer is cached too
        _, code = await refused(await server.connect("wrong-token", accept=False))
        assert code == 4401
    assert fake_tower.count(ME) == 3
    for ws in (a1, a2, b):
        await ws.close()


@aio_test
async def test_cache_ttl_zero_asks_every_time(server_factory, fake_tower) -> None:
    server = await tower_server(server_factory, fake_tower, auth_cache_ttl=0)
    for _ in range(2):
        await (await server.connect(ALICE.token)).close()
    assert fake_tower.count(ME) == 2


@aio_test
async def test_concurrent_handshakes_share_one_api_request(server_factory, fake_tower) -> None:
    server = await tower_server(server_factory, fake_tower)
    fake_tower.hold()
    pending = [asyncio.ensure_future(by_cookie(server)) for _ in range(5)]
    cache = server.service.factory.authenticator.cache
    await fake_tower.until(lambda f: f.count(ME) >= 1)
    # Wait (bounded) until all five handshakes are waiting on that one request.
    await eventually(lambda: cache.waiting == 5)
    fake_tower.release()
    clients = await asyncio.gather(*pending)
    assert fake_tower.count(ME) == 1
    for ws in clients:
        await ws.close()


# Twisted's server-side TLS options (the fake's, not towerws's) still pass pyOpenSSL objects.
@pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")
@aio_test
async def test_tls_verification_on_by_default_and_private_ca(server_factory, tmp_path) -> None:
    tls = make_tls_files(tmp_path)
    fake = FakeTower().start(tls)
    try:
        untrusting = await server_factory(tower_url=fake.url)
        _, code = await refused(await untrusting.connect(ALICE.token, accept=False))
        assert code == 1013  # the certificate is not trusted: no request ever answered
        assert fake.requests == []
        trusting = await server_factory(tower_url=fake.url, tower_ca_file=tls.ca_file)
        ws = await trusting.connect(ALICE.token)
        await ws.close()
        assert fake.paths() == [ME]
    finally:
        await asyncio.wait_for(fake.stop().asFuture(asyncio.get_running_loop()), 10)


# -- cross-site websocket hijacking: Origin ------------------------------------------------------------


@aio_test
async def test_foreign_origin_refused_403_before_any_api_call(server_factory, fake_tower) -> None:
    server = await tower_server(server_factory, fake_tower)
    with pytest.raises(websockets.InvalidStatus) as info:
        await by_cookie(server, origin="https://evil.example")
    assert info.value.response.status_code == 403
    with pytest.raises(websockets.InvalidStatus) as info:
        await by_cookie(server, origin="null")
    assert info.value.response.status_code == 403
    assert fake_tower.requests == []
    # Same host (any port), or no Origin at all (not a browser): allowed.
    for origin in ("http://127.0.0.1:9999", "https://127.0.0.1", None):
        await (await by_cookie(server, origin=origin)).close()


@aio_test
async def test_allowed_origins_list(server_factory, fake_tower) -> None:
    server = await tower_server(server_factory, fake_tower, allowed_origins="https://ui.example.com, http://x.test:8080")
    for origin in ("https://ui.example.com", "HTTPS://UI.example.com:443", "http://x.test:8080", None):
        await (await by_cookie(server, origin=origin)).close()
    for origin in ("http://127.0.0.1", "https://ui.example.com:8443", "http://x.test", "https://evil.example"):
        with pytest.raises(websockets.InvalidStatus) as info:
            await by_cookie(server, origin=origin)
        assert info.value.response.status_code == 403


# -- authorization per object -----------------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(KINDS))
@aio_test
async def test_every_id_keyed_group_is_checked(server_factory, fake_tower, publisher, key: str) -> None:
    fake_tower.objects[object_path(key, 42)] = {ALICE.id}
    fake_tower.objects[object_path(key, 43)] = {BOB.id}  # exists, alice may not see it: 403
    server = await tower_server(server_factory, fake_tower)
    ws = await by_cookie(server)
    reply = await ws.subscribe({key: [42, "43", 44]}, xrftoken=ALICE.csrftoken)  # 44 does not exist: 404
    assert reply["groups_current"] == [f"{key}-42"]
    assert sorted(e["error"] for e in reply["errors"]) == [
        f"access denied to channel {key} for resource id 43",
        f"access denied to channel {key} for resource id 44",
    ]
    checks = [s for s in fake_tower.requests if s.path != ME]
    assert sorted(s.path for s in checks) == [object_path(key, i) for i in (42, 43, 44)]
    assert all(s.headers["cookie"] == cookie(ALICE) for s in checks)  # the user's own credentials
    await publisher.publish(f"{key}-43", {"for": "bob"})
    await publisher.publish(f"{key}-42", {"for": "alice"})
    assert await ws.recv_json() == {"for": "alice"}
    await ws.no_message()
    await ws.close()


@aio_test
async def test_checks_run_concurrently_and_reply_waits_for_them(server_factory, fake_tower, publisher) -> None:
    for key in KINDS:
        fake_tower.objects[object_path(key, 5)] = {BOB.id}
    server = await tower_server(server_factory, fake_tower)
    ws = await server.connect(BOB.token)
    fake_tower.hold()
    await ws.send_json({"groups": {key: [5] for key in KINDS}})
    # All six checks reach the API while none has been answered: they run at once.
    await fake_tower.until(lambda f: len(f.requests) == 1 + len(KINDS))
    await ws.no_message()  # no reply before the checks are done
    fake_tower.release()
    reply = await ws.recv_json()
    assert reply["groups_current"] == sorted(f"{key}-5" for key in KINDS)
    await publisher.publish("system_job_events-5", {"n": 1})
    assert await ws.recv_json() == {"n": 1}
    await ws.close()


@aio_test
async def test_checks_are_cached_per_user_and_object(server_factory, fake_tower) -> None:
    path = object_path("job_events", 9)
    fake_tower.objects[path] = {ALICE.id, BOB.id}
    server = await tower_server(server_factory, fake_tower)
    alice1, alice2, bob = [await server.connect(t) for t in (ALICE.token, ALICE.token, BOB.token)]
    for ws in (alice1, alice2, alice1, bob):
        assert (await ws.subscribe({"job_events": [9]}))["groups_current"] == ["job_events-9"]
    assert fake_tower.count(path) == 2  # once for alice, once for bob
    for ws in (alice1, alice2, bob):
        await ws.close()


@pytest.mark.parametrize("failure", ["500", "timeout"])
@aio_test
async def test_api_failure_denies_only_the_checked_items(server_factory, fake_tower, failure: str) -> None:
    fake_tower.objects[object_path("job_events", 1)] = {ALICE.id}
    server = await tower_server(server_factory, fake_tower, tower_timeout=1.0)
    ws = await server.connect(ALICE.token)
    if failure == "500":
        fake_tower.force_status = 500
    else:
        fake_tower.delay = 5.0
    reply = await ws.subscribe({"jobs": ["status_changed"], "job_events": [1], "control": ["limit_reached_7"]})
    assert reply["groups_current"] == ["control-limit_reached_7", "jobs-status_changed"]
    assert reply["errors"] == [{"error": "authorization service unavailable for job_events 1"}]
    fake_tower.force_status, fake_tower.delay = None, 0.0
    reply = await ws.subscribe({"job_events": [1]})  # failures are not cached: asked again
    assert reply["groups_current"] == ["job_events-1"] and reply["errors"] == []
    await ws.close()


@aio_test
async def test_foreign_control_and_internal_groups_never_joined(server_factory, fake_tower) -> None:
    server = await tower_server(server_factory, fake_tower)
    ws = await server.connect(ADMIN.token)  # even a superuser
    reply = await ws.subscribe({
        "control": ["limit_reached_1", "limit_reached_7"],
        "broadcast": ["all"], "broadcast-group_send": ["x"], "jobs": ["#", "*", "status_changed.#"],
        "job_events": ["*", "#", "1.2", -1],
    })
    assert reply["groups_current"] == ["control-limit_reached_1"]
    assert len(reply["errors"]) == 10
    assert fake_tower.paths() == [ME]  # nothing outside the allowlist is even asked about
    assert server.service.hub.active_groups == {"control-limit_reached_1"}
    await ws.close()


@aio_test
async def test_superuser_sees_objects_of_others(server_factory, fake_tower) -> None:
    fake_tower.objects[object_path("workflow_events", 3)] = {BOB.id}
    server = await tower_server(server_factory, fake_tower)
    ws = await server.connect(ADMIN.token)
    assert (await ws.subscribe({"workflow_events": [3]}))["groups_current"] == ["workflow_events-3"]
    await ws.close()


# -- no secrets in logs -------------------------------------------------------------------------------


@aio_test
async def test_no_credential_ever_reaches_the_log(server_factory, fake_tower) -> None:
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        fake_tower.objects[object_path("job_events", 1)] = {ALICE.id}
        server = await tower_server(server_factory, fake_tower)
        ws = await by_cookie(server)
        await ws.subscribe({"job_events": [1]}, xrftoken=ALICE.csrftoken)
        await ws.send_json({"groups": {}, "xrftoken": "wrong-" + ALICE.csrftoken})
        await ws.recv_json()
        await ws.close()
        await (await server.connect(BOB.token)).close()
        await refused(await server.connect("wrong-" + BOB.token, accept=False))
        fake_tower.force_status = 500
        await refused(await server.connect(ADMIN.token, accept=False))
        # Any other path is a plain 404 page (the HTTP access log is off: URLs carry tokens).
        with pytest.raises(websockets.InvalidStatus):
            await connect(f"ws://127.0.0.1:{server.port}/nope", ADMIN.token)
    finally:
        globalLogPublisher.removeObserver(events.append)
    text = "\n".join(f"{formatEvent(e)} {e!r}" for e in events)
    assert "unavailable" in text and "closed: user" in text  # the log did record these events
    for secret in (ALICE.session, ALICE.csrftoken, BOB.token, ADMIN.token, BOB.session):
        assert secret not in text
