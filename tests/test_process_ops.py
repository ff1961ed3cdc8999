"""A real ``twistd towerws`` process: graceful SIGTERM, JSON logs, and no secrets in any log line."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import AMQP_URL, ROOT, aio_test, connect, delete_queue, http_get, raw_websocket, read_to_eof, unique
from test_twistd import TWISTD, free_port


class Twistd:
    """``twistd --nodaemon towerws ...`` with stdout and stderr captured line by line."""

    def __init__(self, proc: asyncio.subprocess.Process, node: str, port: int):
        self.proc, self.node, self.port = proc, node, port
        self.url = f"ws://127.0.0.1:{port}/websocket/"
        self.lines: list[str] = []

    @classmethod
    async def start(cls, *args: str, exchange: str, tokens_file: str, amqp_url: str = AMQP_URL) -> "Twistd":
        port, node = free_port(), unique("proc")
        proc = await asyncio.create_subprocess_exec(
            TWISTD, "--nodaemon", "--pidfile=", "towerws",
            "--listen", f"tcp:{port}:interface=127.0.0.1", "--exchange", exchange, "--node-id", node,
            "--tokens-file", tokens_file, "--queue-expires", "60", "--ping-interval", "0", *args,
            env={**os.environ, "TOWERWS_AMQP_URL": amqp_url}, cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc, node, port)

    async def wait_for(self, text: str, timeout: float = 20) -> str:
        """Read stdout until a line containing ``text`` (an event, not a sleep)."""
        while True:
            line = (await asyncio.wait_for(self.proc.stdout.readline(), timeout)).decode()
            assert line, "twistd exited early:\n" + "".join(self.lines)
            self.lines.append(line)
            if text in line:
                return line

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> tuple[int, str, str]:
        """Signal it, wait for the exit; (exit status, all of stdout, stderr)."""
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        out, err = await asyncio.wait_for(self.proc.communicate(), timeout)
        return self.proc.returncode, "".join(self.lines) + out.decode(), err.decode()

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


# -- graceful shutdown ----------------------------------------------------------------------


@aio_test
async def test_sigterm_closes_clients_1001_drains_and_exits_0(exchange: str, tokens_file: str, publisher) -> None:
    node = await Twistd.start("--drain-timeout", "2", exchange=exchange, tokens_file=tokens_file)
    try:
        await node.wait_for(f"consuming towerws.{node.node}")
        clients = [await connect(node.url, token) for token in ("token-alice", "token-bob")]
        for ws in clients:
            await ws.subscribe({"jobs": ["status_changed"]})
        stubborn, writer = await raw_websocket(node.port, "token-bob")
        await publisher.publish("jobs-status_changed", {"live": True})
        for ws in clients:
            assert await ws.recv_json() == {"live": True}

        node.proc.send_signal(signal.SIGTERM)
        for ws in clients:
            assert (await ws.closed(timeout=10))[0] == 1001
        # The one that never answers gets the close frame too, and is dropped at the drain timeout.
        data = await read_to_eof(stubborn, 15)
        assert b"\x88\x16\x03\xe9server shutting down" in data
        writer.close()
        status, out, err = await node.stop(timeout=30)
    finally:
        node.kill()
        delete_queue(f"towerws.{node.node}")
    assert status == 0, out + err
    assert "shutting down: closing 3 websocket(s) with 1001" in out
    assert "AMQP consumer cancelled, channel and connection closed" in out
    assert "did not leave in time; dropping it" in out
    assert "Server Shut Down." in out
    # The access log: one line per session, with who, how long, what and how it ended.
    access = [line for line in out.splitlines() if "closed: user" in line]
    assert len(access) == 3, out
    assert any("user 7 from tcp4:127.0.0.1:" in line and "1 groups, 3 frames sent, close code 1001" in line
               for line in access), access


# -- JSON logs without secrets ------------------------------------------------------------


def rabbitmqctl(*args: str) -> str:
    return subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True,
                          timeout=60).stdout


@pytest.fixture
def amqp_user() -> tuple[str, str]:
    """A real password-protected RabbitMQ user, deleted afterwards."""
    user, password = unique("towerws-test-user"), "amqp-Secret-" + unique("pw")
    rabbitmqctl("add_user", user, password)
    rabbitmqctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
    yield user, password
    rabbitmqctl("delete_user", user)


def close_connections_of(user: str) -> None:
    for line in rabbitmqctl("list_connections", "pid", "user").splitlines():
        pid, _, who = line.partition("\t")
        if who == user:
            rabbitmqctl("close_connection", pid, "test: password changed")


@aio_test
async def test_json_logs_one_object_per_line_and_no_secrets(
    exchange: str, tmp_path: Path, publisher, amqp_user: tuple[str, str]
) -> None:
    user, password = amqp_user
    query_token, header_token, wrong_token = (unique("qtok-Secret"), unique("htok-Secret"), unique("bad-Secret"))
    cookie = "sessionid=" + unique("cookie-Secret") + "; csrftoken=" + unique("csrf-Secret")
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({query_token: 7, header_token: 8}))
    amqp_url = f"amqp://{user}:{password}@127.0.0.1:5672/%2F"
    node = await Twistd.start("--log-format", "json", exchange=exchange, tokens_file=str(tokens), amqp_url=amqp_url)
    loop = asyncio.get_running_loop()
    try:
        await node.wait_for(f"consuming towerws.{node.node}")
        a = await connect(node.url + f"?token={query_token}", None, additional_headers={"Cookie": cookie})
        b = await connect(node.url, None, additional_headers={"Authorization": f"Bearer {header_token}",
                                                              "Cookie": cookie})
        refused = await connect(node.url + f"?token={wrong_token}", None, accept=False,
                                additional_headers={"Authorization": f"Token {wrong_token}", "Cookie": cookie})
        assert (await refused.closed())[0] == 4401
        await a.subscribe({"job_events": [5]})
        await b.ws.send("{not json " + header_token)
        assert "error" in await b.recv_json()
        await publisher.publish("job_events-5", {"n": 1})
        assert await a.recv_json() == {"n": 1}
        assert (await http_get(f"http://127.0.0.1:{node.port}/metrics"))[0] == 200
        # A plain HTTP request with the token in its URL (an HTTP access log would show it).
        assert (await http_get(f"http://127.0.0.1:{node.port}/websocketz?token={query_token}"))[0] == 404
        # The failure path: the broker now refuses the password towerws still holds.
        await loop.run_in_executor(None, rabbitmqctl, "change_password", user, unique("other"))
        await loop.run_in_executor(None, close_connections_of, user)
        await node.wait_for("cannot connect to the broker", timeout=30)
        await a.close()
        await b.close()
        status, out, err = await node.stop()
    finally:
        node.kill()
        delete_queue(f"towerws.{node.node}")
    assert status == 0, out + err
    records = [json.loads(line) for line in out.splitlines() if line.strip()]  # every line is one object
    assert all(isinstance(r, dict) and {"time", "level", "message", "namespace"} <= r.keys() for r in records)
    assert all(r["node_id"] == node.node for r in records)
    refusal = next(r for r in records if r["message"].startswith("refused websocket"))
    assert refusal["reason"] == "authentication failed"
    closed = [r for r in records if r["message"].startswith("websocket ") and "closed: user" in r["message"]]
    assert len(closed) == 3 and {r["code"] for r in closed} >= {1000, 4401}
    assert all({"duration_s", "groups", "frames", "peer"} <= r.keys() for r in closed)
    first = next(r for r in closed if r["conn"] == 1)
    assert first["user"] == 7 and first["groups"] == 1 and first["peer"].startswith("tcp4:127.0.0.1:")
    assert any(r["level"] == "warn" and r["message"].startswith(f"cannot connect to the broker amqp://{user}@") for r in records)
    for secret in (password, query_token, header_token, wrong_token, cookie.split("=", 1)[1].split(";")[0],
                   cookie.rsplit("=", 1)[1]):
        assert secret not in out and secret not in err, secret
    assert "Secret" not in out + err  # nothing that looks like one of them, either


def test_json_logs_refuse_syslog_with_one_line() -> None:
    result = subprocess.run([TWISTD, "--nodaemon", "--syslog", "--pidfile=", "towerws", "--log-format", "json"],
                            capture_output=True, text=True, timeout=30, cwd=ROOT)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1 and "syslog" in lines[0], result.stderr
