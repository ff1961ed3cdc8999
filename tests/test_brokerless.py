"""Broker-less mode (``--amqp-url none``): one node, an in-process bus, no RabbitMQ at all.

No fixture here touches the broker: the servers are started without an exchange,
and nothing is cleaned up in RabbitMQ.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq

from conftest import (ROOT, TIMEOUT, VENV_BIN, Server, aio, aio_test, connect, free_port, http_get, raw_websocket,
                      start_server, stop_server, unique, wait)
from towerws.bus import LocalBus

SECRET = "laptop-secret-0123456789abcdef"


@pytest.fixture
def secret_file(tmp_path: Path) -> str:
    path = tmp_path / "publish.secret"
    path.write_text(SECRET)
    return str(path)


@pytest.fixture
def local_server(tokens_file: str, secret_file: str) -> Any:
    options = {
        "listen": "tcp:0:interface=127.0.0.1",
        "amqp_url": "none",
        "tokens_file": tokens_file,
        "publish_secret_file": secret_file,
        "ping_interval": "0",
    }
    server = pytest_twisted.blockon(aio(start_server(options)))
    yield server
    pytest_twisted.blockon(aio(stop_server(server)))


async def http_publish(base: str, items: Any) -> tuple[int, Any]:
    response = await wait(treq.post(f"{base}/api/publish", data=json.dumps(items).encode(),
                                    headers={"Authorization": [f"Bearer {SECRET}"]}))
    return response.code, json.loads(await wait(treq.content(response)))


@aio_test
async def test_websocket_http_publish_and_in_process_publish(local_server: Server) -> None:
    service = local_server.service
    assert isinstance(service.bus, LocalBus) and service.bus.state == "disabled" and service.bus.ready
    a = await local_server.connect("token-alice")
    b = await local_server.connect("token-bob")
    assert (await a.subscribe({"jobs": ["status_changed"], "job_events": [42]}))["groups_joined"] == [
        "job_events-42", "jobs-status_changed"]
    await b.subscribe({"job_events": [43]})
    code, body = await http_publish(local_server.http, [
        {"group": "job_events-42", "payload": {"event": "runner_on_ok", "counter": 1}},
        {"group": "job_events-43", "payload": {"to": "b"}},
    ])
    assert (code, body) == (202, {"published": 2})
    assert await a.recv_json() == {"event": "runner_on_ok", "counter": 1}
    assert await b.recv_json() == {"to": "b"}
    # In-process Twisted code publishes through the same bus call as with RabbitMQ.
    await wait(service.bus.publish("jobs-status_changed", b'{"status": "successful"}'))
    assert await a.recv() == '{"status": "successful"}'
    await b.no_message()
    await a.close()
    await b.close()


@aio_test
async def test_in_process_publish_rejects_bad_input_and_others_still_receive(local_server: Server) -> None:
    bus = local_server.service.bus
    ws = await local_server.connect()
    await ws.subscribe({"jobs": ["summary"]})
    for group, body in [("jobs-summary", b"not json"), ("jobs summary", b"{}"), ("", b"{}")]:
        with pytest.raises(ValueError):
            await wait(bus.publish(group, body))
    code, body = await http_publish(local_server.http, {"group": "jobs-bogus", "payload": 1})
    assert code == 400 and body["item"] == 0
    await wait(bus.publish("jobs-summary", b'"ok"'))
    assert await ws.recv_json() == "ok"
    await ws.no_message()
    await ws.close()


@aio_test
async def test_twistd_process_without_rabbitmq(tokens_file: str, secret_file: str) -> None:
    """The laptop path from README: a real twistd process, websocket client, curl-style POST."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        str(VENV_BIN / "twistd"), "--nodaemon", "--pidfile=", "towerws", "--amqp-url", "none",
        "--listen", f"tcp:{port}:interface=127.0.0.1", "--tokens-file", tokens_file,
        "--publish-secret-file", secret_file, "--node-id", unique("laptop"),
        env={k: v for k, v in os.environ.items() if not k.startswith("TOWERWS_")}, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        lines = []
        while True:  # ready once started (the port is bound before this line)
            line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
            assert line, "twistd exited early:\n" + "".join(lines)
            lines.append(line)
            if "listening on" in line:
                break
        assert "broker none (single node, in-process bus)" in line, line
        ws = await connect(f"ws://127.0.0.1:{port}/websocket/", "token-alice")
        await ws.subscribe({"jobs": ["status_changed"]})
        code, body = await http_publish(f"http://127.0.0.1:{port}",
                                        {"group": "jobs-status_changed", "payload": {"status": "running"}})
        assert (code, body) == (202, {"published": 1})
        assert await ws.recv_json() == {"status": "running"}
        await ws.close()
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), TIMEOUT)
    rest = (await asyncio.wait_for(proc.stdout.read(), 5)).decode()
    assert "AMQP" not in "".join(lines) + rest  # no broker was ever tried


@pytest.mark.parametrize("text", ["none", "None", " NONE "])
def test_amqp_url_none_selects_the_local_bus(text: str) -> None:
    from towerws.config import load

    assert load({"amqp_url": text}, environ={}).amqp_url is None
    assert load({}, environ={"TOWERWS_AMQP_URL": text}).amqp_url is None


@aio_test
async def test_readyz_is_200_while_serving_and_503_while_shutting_down(tokens_file: str) -> None:
    """A broker-less node is ready as soon as it serves: nothing to wait for but itself."""
    server = await start_server({"listen": "tcp:0:interface=127.0.0.1", "amqp_url": "none",
                                 "tokens_file": tokens_file, "ping_interval": "0", "drain_timeout": "5",
                                 "metrics_listen": "tcp:0:interface=127.0.0.1"})
    service = server.service
    ops = f"http://127.0.0.1:{(await wait(service.ops_listening())).getHost().port}"
    status, headers, body = await http_get(ops + "/readyz")
    ready = json.loads(body)
    assert (status, ready["status"], ready["amqp"]) == (200, "ready", "disabled"), body
    # A client that never answers the close holds the drain open: the node is shutting down.
    reader, writer = await raw_websocket(server.port)
    stopping = service.stopService()
    status, _, body = await http_get(ops + "/readyz")
    assert (status, json.loads(body)["status"]) == (503, "not ready"), body
    writer.close()
    await wait(stopping)
