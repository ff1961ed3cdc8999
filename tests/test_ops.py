"""Operating a node in-process: /healthz, /readyz, /metrics, --metrics-listen, graceful stop."""

from __future__ import annotations

import asyncio
import json
import re

import pika
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from conftest import AMQP_URL, ROOT, Server, aio_test, connect, http_get, raw_websocket, read_to_eof, server_options, wait

# -- health and readiness ---------------------------------------------------------------


@aio_test
async def test_healthz_and_readyz_when_consuming(server: Server) -> None:
    status, headers, body = await http_get(server.http + "/healthz")
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    status, headers, body = await http_get(server.http + "/readyz")
    assert status == 200 and headers["content-type"] == "application/json"
    ready = json.loads(body)
    assert ready["amqp"] == "consuming" and ready["status"] == "ready"
    assert ready["node_id"] == server.service.settings.node_id
    assert ready["version"] and ready["uptime_s"] >= 0
    ws = await server.connect()
    await ws.subscribe({"jobs": ["summary"], "job_events": [3]})
    ready = json.loads((await http_get(server.http + "/readyz"))[2])
    assert (ready["connections"], ready["groups"]) == (1, 2)
    await ws.close()


@aio_test
async def test_readyz_is_503_while_the_broker_is_unreachable(exchange: str, tokens_file: str) -> None:
    from twisted.plugins.towerws_plugin import serviceMaker

    opts = serviceMaker.options()
    args = []
    # Port 1 on loopback: nothing listens, the node keeps retrying.
    options = server_options(exchange, tokens_file, amqp_url="amqp://guest:guest@127.0.0.1:1/%2F")
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", value]
    opts.parseOptions(args)
    service = serviceMaker.makeService(opts)
    service.startService()
    try:
        port = (await wait(service.listening())).getHost().port
        status, _, body = await http_get(f"http://127.0.0.1:{port}/readyz")
        assert status == 503
        assert json.loads(body)["amqp"] == "connecting"
        assert (await http_get(f"http://127.0.0.1:{port}/healthz"))[0] == 200
        metrics = (await http_get(f"http://127.0.0.1:{port}/metrics"))[2].decode()
        assert "\ntowerws_amqp_consuming 0.0\n" in metrics
    finally:
        await wait(service.stopService())


# -- metrics -----------------------------------------------------------------------------


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse the exposition (with prometheus_client's own parser): {(name, labels): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def scrape(url: str) -> dict:
    status, headers, body = await http_get(url + "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    return samples(body.decode())


def value(metrics: dict, name: str, **labels: str) -> float:
    return metrics[(name, tuple(sorted(labels.items())))]


@aio_test
async def test_metrics_move_with_clients_and_messages(server: Server, publisher) -> None:
    before = await scrape(server.http)
    assert value(before, "towerws_connections") == 0
    assert value(before, "towerws_amqp_consuming") == 1
    assert value(before, "towerws_handshakes_total", outcome="accepted") == 0

    a = await server.connect("token-alice")
    b = await server.connect("token-bob")
    refused = await connect(server.url, "wrong", accept=False)
    assert (await refused.closed())[0] == 4401
    await a.subscribe({"job_events": [1], "jobs": ["summary"]})
    await b.subscribe({"job_events": [1], "jobs": ["nope"]})  # one item denied
    await a.ws.send("not json")
    assert "error" in await a.recv_json()
    bodies = [json.dumps({"seq": i}).encode() for i in range(3)]
    # The invalid body first: once the valid ones arrive, it has been consumed (in order) and dropped.
    await publisher.publish_many([("job_events-1", b"{bad", None)] + [("job_events-1", body, None) for body in bodies])
    for ws in (a, b):
        assert [await ws.recv_json() for _ in bodies] == [{"seq": i} for i in range(3)]

    m = await scrape(server.http)
    assert value(m, "towerws_connections") == 2
    assert value(m, "towerws_groups_active") == 2
    assert value(m, "towerws_amqp_bindings") == 2
    assert value(m, "towerws_handshakes_total", outcome="accepted") == 2
    assert value(m, "towerws_handshakes_total", outcome="unauthenticated") == 1
    assert value(m, "towerws_subscribe_requests_total", outcome="ok") == 1
    assert value(m, "towerws_subscribe_requests_total", outcome="partly_denied") == 1
    assert value(m, "towerws_subscribe_requests_total", outcome="invalid") == 1
    assert value(m, "towerws_amqp_messages_consumed_total") == 4
    assert value(m, "towerws_amqp_messages_dropped_total") == 1
    assert value(m, "towerws_frames_delivered_total") == 6
    # A frame is a 2-byte header (payload < 126 bytes) plus the body, to each of 2 clients.
    assert value(m, "towerws_bytes_delivered_total") == sum(2 * (2 + len(body)) for body in bodies)
    # One latency observation per delivered message (not per client, not for the invalid one).
    assert value(m, "towerws_delivery_latency_seconds_count") == 3
    assert 0 < value(m, "towerws_delivery_latency_seconds_sum") < 10
    assert value(m, "towerws_info", node_id=server.service.settings.node_id, version="0.1.0") == 1

    await a.close()
    await b.close()
    for _ in range(100):  # onClose runs once the close handshake is through
        if not server.service.factory.connections:
            break
        await asyncio.sleep(0.02)
    assert value(await scrape(server.http), "towerws_connections") == 0


@aio_test
async def test_metric_labels_stay_bounded(server: Server, publisher) -> None:
    ws = await server.connect("token-alice")  # user 7
    await ws.subscribe({"job_events": [424242], "control": ["limit_reached_7"]})
    await publisher.publish("job_events-424242", {"x": 1})
    await ws.recv_json()
    await http_get(f"http://127.0.0.1:{server.port}/websocket/elsewhere")
    _, _, body = await http_get(server.http + "/metrics")
    text = body.decode()
    assert "424242" not in text and "limit_reached" not in text
    allowed = {"outcome", "le", "node_id", "version", "broker"}
    configured = {address.node for address in server.service.settings.amqp_url}
    for (name, labels), _ in samples(text).items():
        assert {key for key, _ in labels} <= allowed, name
        assert dict(labels).get("broker", "127.0.0.1:5672") in configured, name
    await ws.close()


@aio_test
async def test_counters_for_other_parts_are_exposed(server: Server) -> None:
    metrics = server.service.metrics
    metrics.slow_client_disconnects.inc()
    metrics.auth_requests.labels("ok").inc(2)
    metrics.auth_cache_hits.inc(5)
    m = await scrape(server.http)
    assert value(m, "towerws_slow_client_disconnects_total") == 1
    assert value(m, "towerws_auth_requests_total", outcome="ok") == 2
    assert value(m, "towerws_auth_requests_total", outcome="timeout") == 0
    assert value(m, "towerws_auth_cache_hits_total") == 5


class AuthDown:
    def authenticate(self, credentials):
        from twisted.internet.defer import fail

        from towerws.auth import AuthUnavailable

        return fail(AuthUnavailable())


@aio_test
async def test_refusals_and_reconnects_are_counted(server: Server) -> None:
    with pytest.raises(websockets.InvalidStatus):
        await connect(f"ws://127.0.0.1:{server.port}/websocket/elsewhere")
    factory = server.service.factory
    real, factory.authenticator = factory.authenticator, AuthDown()
    ws = await connect(server.url, "token-alice", accept=False)
    assert (await ws.closed())[0] == 1013
    factory.authenticator = real
    bus = server.service.bus
    # The broker connection drops; the node reconnects and consumes again.
    back = bus.client.lost.addCallback(lambda _: bus.when_ready())
    bus.client.transport.abortConnection()
    await wait(back, 30)
    m = await scrape(server.http)
    assert value(m, "towerws_handshakes_total", outcome="not_found") == 1
    assert value(m, "towerws_handshakes_total", outcome="auth_unavailable") == 1
    assert value(m, "towerws_amqp_reconnects_total") == 1
    assert value(m, "towerws_amqp_consuming") == 1


@aio_test
async def test_two_servers_in_one_process_keep_separate_metrics(server_factory) -> None:
    one = await server_factory()
    two = await server_factory()
    ws = await one.connect()
    assert value(await scrape(one.http), "towerws_handshakes_total", outcome="accepted") == 1
    assert value(await scrape(two.http), "towerws_handshakes_total", outcome="accepted") == 0
    await ws.close()


@aio_test
async def test_openmetrics_when_asked(server: Server) -> None:
    status, headers, body = await http_get(server.http + "/metrics", Accept="application/openmetrics-text")
    assert status == 200 and headers["content-type"].startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


# -- --metrics-listen -------------------------------------------------------------------


@aio_test
async def test_metrics_listen_moves_ops_endpoints_off_the_public_port(server_factory) -> None:
    server = await server_factory(metrics_listen="tcp:0:interface=127.0.0.1")
    ops_port = (await wait(server.service.ops_listening())).getHost().port
    ops = f"http://127.0.0.1:{ops_port}"
    for path in ("/healthz", "/readyz", "/metrics"):
        assert (await http_get(server.http + path))[0] == 404, path
        assert (await http_get(ops + path))[0] == 200, path
    assert (await http_get(ops + "/websocket/"))[0] == 404
    ws = await server.connect()
    assert value(await scrape(ops), "towerws_connections") == 1
    await ws.close()


# -- graceful stop --------------------------------------------------------------------------


@aio_test
async def test_stop_closes_clients_1001_and_reports_not_ready_while_draining(server_factory) -> None:
    server = await server_factory(metrics_listen="tcp:0:interface=127.0.0.1", drain_timeout=1.5)
    ops = f"http://127.0.0.1:{(await wait(server.service.ops_listening())).getHost().port}"
    polite = await server.connect()
    await polite.subscribe({"jobs": ["summary"]})
    reader, writer = await raw_websocket(server.port)
    late_reader, late_writer = await asyncio.open_connection("127.0.0.1", server.port)  # handshake comes later
    stopping = server.service.stopService()
    assert (await polite.closed())[0] == 1001
    status, _, body = await http_get(ops + "/readyz")  # the stubborn client holds the drain open
    assert status == 503 and json.loads(body)["amqp"] in ("consuming", "stopping")
    data = await read_to_eof(reader, 10)
    assert b"\x88" in data and b"\x03\xe9" in data  # a close frame with code 1001, then the drop
    writer.close()
    await wait(stopping)
    with pytest.raises(ConnectionRefusedError):
        await connect(server.url)
    # A handshake completed during the shutdown is answered with 1001 at once.
    late_writer.write(b"GET /websocket/?token=token-bob HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n"
                      b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                      b"Sec-WebSocket-Version: 13\r\n\r\n")
    late = await read_to_eof(late_reader, 10)
    assert b" 101 " in late and b"\x03\xe9server shutting down" in late and b"accept" not in late
    late_writer.close()
    assert server.service.metrics.registry.get_sample_value(
        "towerws_handshakes_total", {"outcome": "shutting_down"}) == 1
    assert not server.service.bus.ready


def queue_depth(queue: str) -> int:
    with pika.BlockingConnection(pika.URLParameters(AMQP_URL)) as conn:
        return conn.channel().queue_declare(queue, passive=True).method.message_count


@aio_test
async def test_unacknowledged_messages_return_to_the_queue_on_stop(server_factory, publisher) -> None:
    server = await server_factory(unbind_grace=60)  # the group stays bound after the client left
    queue = server.service.bus.queue
    ws = await server.connect()
    await ws.subscribe({"job_events": [77]})
    await ws.close()
    # Stop reading the broker: what it sends now is in flight, unacknowledged.
    bus = server.service.bus
    transport = bus.client.transport
    transport.pauseProducing()
    await publisher.publish_many([("job_events-77", json.dumps({"n": i}).encode(), None) for i in range(5)])
    # Read again when the stop cancels the consumer: the deliveries arrive during the stop.
    cancel = bus.channel.basic_cancel

    def cancel_and_resume(**kw):
        d = cancel(**kw)
        transport.resumeProducing()
        return d

    bus.channel.basic_cancel = cancel_and_resume
    await wait(server.service.stopService())
    assert bus.consumed == 0  # read, but neither handed on nor acknowledged
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, queue_depth, queue) == 5


def test_settings_reject_bad_ops_options() -> None:
    from towerws import config

    for key, bad in (("log_format", "xml"), ("drain_timeout", "-1"), ("metrics_listen", "bogus:1")):
        with pytest.raises(config.ConfigError, match=re.escape(f"--{config.cli_name(key)} ")):
            config.load({key: bad}, environ={})
    assert config.load({"metrics_listen": ""}, environ={}).metrics_listen is None


def test_latency_histogram_exposes_what_prometheus_client_would() -> None:
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from towerws.metrics import LATENCY_BUCKETS, LatencyHistogram

    ours, reference = CollectorRegistry(), CollectorRegistry()
    mine = LatencyHistogram("lat_seconds", "doc", LATENCY_BUCKETS)
    ours.register(mine)
    theirs = Histogram("lat_seconds", "doc", buckets=LATENCY_BUCKETS, registry=reference)
    for v in (0.0, 0.0001, 0.00011, 0.003, 0.003, 0.5, 2.5, 7.0, 1e-9):  # bounds themselves included
        mine.observe(v)
        theirs.observe(v)
    assert generate_latest(ours) == generate_latest(reference)


# -- the heap ---------------------------------------------------------------------------


def test_twistd_freezes_the_start_up_heap_and_tests_do_not() -> None:
    import gc

    from twisted.plugins.towerws_plugin import serviceMaker

    from towerws.app import freeze_heap

    opts = serviceMaker.options()
    opts.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--tokens-file", str(ROOT / "etc" / "tokens.dev.json")])
    assert serviceMaker.makeService(opts).freeze_heap is False  # no twistd around it: a test process
    opts.parent = object()  # twistd's own options, as under `twistd towerws`
    assert serviceMaker.makeService(opts).freeze_heap is True
    before = gc.get_freeze_count()
    freeze_heap()
    try:
        assert gc.get_freeze_count() > before
    finally:
        gc.unfreeze()
