"""towerws.emit: the synchronous publisher (emit_channel_notification) and towerws-publish.

Every test runs against the real broker with its own uniquely named exchange and an
exclusive, server-named queue bound to it, both gone at teardown. Publisher confirms
mean a message is queued once the emit returns, so reads need no sleeps; every wait has
a deadline.
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import json
import logging
import os
import random
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from brokerproxy import BrokerProxy
from conftest import AMQP_URL, ROOT, VENV_BIN, Bound, aio_test, unique
from towerws import emit
from towerws.emit import EmitError, Emitter, configure, emit_channel_notification
from towerws.messages import InvalidBody

TIMEOUT = 10.0
UNREACHABLE = "amqp://guest:secretpw@127.0.0.1:1/%2F"


@pytest.fixture
def emitter(bound: Bound) -> Iterator[Emitter]:
    e = Emitter(AMQP_URL, bound.exchange, timeout=5)
    yield e
    e.close()


@pytest.fixture
def default_emitter(bound: Bound) -> Iterator[Emitter]:
    """The process-wide emitter behind emit_channel_notification, aimed at the test exchange."""
    configure(amqp_url=AMQP_URL, exchange=bound.exchange)
    yield emit._get_default()
    configure()  # closes it; later users read the environment again


# -- serialisation and what goes on the wire -------------------------------------------------


def test_emit_channel_notification_wire_format(bound: Bound, default_emitter: Emitter) -> None:
    payload = {
        "unified_job_id": 42,
        "status": "running",
        "created": datetime.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=datetime.timezone.utc),
        "naive": datetime.datetime(2024, 5, 6, 7, 8, 9),
        "offset": datetime.datetime(2024, 5, 6, 7, 8, 9, 500, tzinfo=datetime.timezone(datetime.timedelta(hours=2))),
        "day": datetime.date(2024, 5, 6),
        "at": datetime.time(7, 8, 9, 987654),
        "elapsed": datetime.timedelta(days=1, hours=2, minutes=3, seconds=4, microseconds=500000),
        "negative": datetime.timedelta(seconds=-90),
        "cost": decimal.Decimal("12.50"),
        "id": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "text": "café",
    }
    emit_channel_notification("jobs-status_changed", payload)
    (msg,) = bound.get(1)
    assert msg.routing_key == "jobs-status_changed"
    assert msg.properties.content_type == "application/json"
    assert msg.properties.delivery_mode == 1
    assert json.loads(msg.body) == {
        "unified_job_id": 42,
        "status": "running",
        "created": "2024-05-06T07:08:09.123Z",
        "naive": "2024-05-06T07:08:09",
        "offset": "2024-05-06T07:08:09.000+02:00",
        "day": "2024-05-06",
        "at": "07:08:09.987",
        "elapsed": "P1DT02H03M04.500000S",
        "negative": "-P0DT00H01M30S",
        "cost": "12.50",
        "id": "12345678-1234-5678-1234-567812345678",
        "text": "café",
    }
    bound.assert_empty()


def test_non_serialisable_payload_raises_type_error_before_io() -> None:
    # An unreachable broker: a TypeError rather than EmitError proves nothing was attempted.
    e = Emitter(UNREACHABLE, "towerws", timeout=1)
    with pytest.raises(TypeError):
        e.emit("jobs-status_changed", {"x": object()})
    with pytest.raises(TypeError):
        e.emit("jobs-status_changed", {"x": float("nan")})
    with pytest.raises(TypeError):
        e.emit("jobs-status_changed", {"at": datetime.time(1, 2, tzinfo=datetime.timezone.utc)})
    assert e._connection is None


@pytest.mark.parametrize("body", [b'{"n": NaN}', b"[Infinity]", b"-Infinity", b"{", b"\xff"])
def test_emit_raw_refuses_what_a_browser_cannot_parse_before_io(body: bytes) -> None:
    e = Emitter(UNREACHABLE, "towerws", timeout=1)
    with pytest.raises(InvalidBody):  # not EmitError: nothing was attempted
        e.emit_raw("jobs-status_changed", body)


@pytest.mark.parametrize("group", ["", "job events", "tab\tgroup", "line\n", "x" * 256, "é" * 128])
def test_bad_group_raises_value_error(group: str) -> None:
    e = Emitter(UNREACHABLE, "towerws", timeout=1)
    with pytest.raises(ValueError):
        e.emit(group, {})
    with pytest.raises(ValueError):
        emit_channel_notification(group, {})
    assert e._connection is None


# -- connection handling ---------------------------------------------------------------------------


def test_one_connection_reused(bound: Bound, default_emitter: Emitter) -> None:
    emit_channel_notification("job_events-1", {"n": 0})
    conn = default_emitter._connection
    assert conn is not None and conn.is_open
    assert default_emitter.connection_name.startswith(f"towerws-emit-{os.getpid()}-")
    for n in range(1, 5):
        emit_channel_notification("job_events-1", {"n": n})
        assert default_emitter._connection is conn
    assert emit._get_default() is default_emitter
    assert [json.loads(m.body)["n"] for m in bound.get(5)] == [0, 1, 2, 3, 4]


def test_threads_share_one_connection(bound: Bound, emitter: Emitter) -> None:
    threads_count, per_thread = 8, 50
    errors: list[BaseException] = []
    emitter.emit("warmup", {})
    conn = emitter._connection

    def work(t: int) -> None:
        try:
            for i in range(per_thread):
                emitter.emit(f"job_events-{t}", {"t": t, "i": i})
        except BaseException as exc:  # reported to the main thread, which fails the test
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * 3)
        assert not thread.is_alive(), "emitting thread hung"
    assert errors == []
    assert emitter._connection is conn
    bound.get(1)  # the warm-up
    messages = bound.get(threads_count * per_thread)
    bound.assert_empty()
    seen: dict[int, list[int]] = {t: [] for t in range(threads_count)}
    for msg in messages:
        body = json.loads(msg.body)
        assert msg.routing_key == f"job_events-{body['t']}"
        seen[body["t"]].append(body["i"])
    assert all(seen[t] == list(range(per_thread)) for t in seen)  # per thread: all, in order


def _wait_child(pid: int, timeout: float = TIMEOUT) -> int:
    """The child's exit status, waiting at most ``timeout`` seconds."""
    fd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("forked child did not exit in time")
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status)
    finally:
        os.close(fd)


def test_fork_child_opens_its_own_connection(bound: Bound, default_emitter: Emitter) -> None:
    emit_channel_notification("jobs-status_changed", {"from": "parent", "n": 1})
    parent_conn = default_emitter._connection
    pid = os.fork()
    if pid == 0:  # the child: report through the exit status only, never return into pytest
        status = 1
        try:
            emit_channel_notification("jobs-status_changed", {"from": "child"})
            own = (default_emitter._connection is not parent_conn
                   and default_emitter.connection_name.startswith(f"towerws-emit-{os.getpid()}-"))
            status = 0 if own else 3
        finally:
            os._exit(status)
    assert _wait_child(pid) == 0, "child failed to emit (1) or reused the parent's connection (3)"
    # The parent's connection is intact: the child neither wrote to nor closed it.
    emit_channel_notification("jobs-status_changed", {"from": "parent", "n": 2})
    assert default_emitter._connection is parent_conn
    bodies = [json.loads(m.body) for m in bound.get(3)]
    assert bodies[0] == {"from": "parent", "n": 1}
    assert sorted(map(json.dumps, bodies[1:])) == sorted(map(json.dumps, [{"from": "child"},
                                                                          {"from": "parent", "n": 2}]))


def _rabbitmqctl(*args: str) -> str:
    result = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl to close a connection")
def test_reconnects_after_broker_closes_connection(bound: Bound, emitter: Emitter,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="towerws.emit")
    emitter.emit("jobs-status_changed", {"n": 1})
    old = emitter._connection
    name = emitter.connection_name
    # close_connection wants the Erlang pid, which only the table format prints usably.
    listing = _rabbitmqctl("list_connections", "--no-table-headers", "pid", "client_properties")
    pids = [line.split("\t")[0] for line in listing.splitlines() if f'{{"connection_name","{name}"}}' in line]
    assert len(pids) == 1, listing
    _rabbitmqctl("close_connection", pids[0], "test")
    # Wait (bounded) until the broker's Connection.Close is on the socket, unread by pika:
    # the next emit then finds out mid-publish, the case the retry exists for.
    sock = old._impl._transport._sock
    ready, _, _ = select.select([sock], [], [], TIMEOUT)
    assert ready, "broker did not close the connection"
    emitter.emit("jobs-status_changed", {"n": 2})
    assert emitter._connection is not old and emitter._connection.is_open
    assert emitter.connection_name != name
    assert any("reconnecting" in r.getMessage() for r in caplog.records)  # the retry path, not a fresh open
    assert [json.loads(m.body) for m in bound.get(2)] == [{"n": 1}, {"n": 2}]


# -- refusals -------------------------------------------------------------------------------------------


def test_missing_exchange_raises_emit_error(bound: Bound) -> None:
    missing = unique("towerws-missing")
    e = Emitter(AMQP_URL, missing, timeout=5)
    try:
        with pytest.raises(EmitError, match=f"exchange '{missing}' does not exist"):
            e.emit("jobs-status_changed", {})
        conn = e._connection
        # Only the channel died: once the exchange exists, the same connection publishes.
        bound.channel.exchange_declare(missing, "topic", durable=True)
        try:
            bound.channel.queue_bind(bound.queue, missing, "#")
            e.emit("jobs-status_changed", {"ok": True})
            assert e._connection is conn
            assert json.loads(bound.get(1)[0].body) == {"ok": True}
        finally:
            bound.channel.exchange_delete(missing)
    finally:
        e.close()


def test_unreachable_broker_raises_emit_error_without_password() -> None:
    e = Emitter(UNREACHABLE, "towerws", timeout=1)
    start = time.monotonic()
    with pytest.raises(EmitError) as info:
        e.emit("jobs-status_changed", {})
    # Tried again (a refused port costs ~10 ms) until the timeout, not beyond.
    assert 0.9 < time.monotonic() - start < 4
    message = str(info.value)
    assert "127.0.0.1:1" in message and "within 1 s" in message
    assert "secretpw" not in message and "secretpw" not in repr(e)


class KeepOrder(random.Random):
    """An rng whose shuffle keeps the URLs in the order given: which node is tried first is the test's choice."""

    def shuffle(self, x: Any) -> None:  # type: ignore[override]
        pass


def test_refused_first_url_costs_milliseconds_and_the_next_is_used(bound: Bound,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="towerws.emit")
    e = Emitter(f"{UNREACHABLE},{AMQP_URL}", bound.exchange, timeout=5, rng=KeepOrder())
    try:
        start = time.monotonic()
        e.emit("jobs-status_changed", {"n": 1})
        assert time.monotonic() - start < 1
        assert e.node == "127.0.0.1:5672"
        assert json.loads(bound.get(1)[0].body) == {"n": 1}
        assert not any("secretpw" in r.getMessage() for r in caplog.records)
    finally:
        e.close()


def test_silent_first_node_costs_one_attempt_timeout(bound: Bound) -> None:
    # A listener that never accepts: the kernel completes the TCP handshake and then
    # nothing answers, like a hung node (a blackholed address costs the same: socket_timeout).
    with socket.create_server(("127.0.0.1", 0)) as silent:
        url = f"amqp://guest:guest@127.0.0.1:{silent.getsockname()[1]}/%2F"
        e = Emitter(f"{url},{AMQP_URL}", bound.exchange, timeout=5, rng=KeepOrder())
        try:
            start = time.monotonic()
            e.emit("jobs-status_changed", {"n": 1})
            elapsed = time.monotonic() - start
        finally:
            e.close()
    assert emit.ATTEMPT_TIMEOUT - 0.1 < elapsed < emit.ATTEMPT_TIMEOUT + 1.5, elapsed
    assert json.loads(bound.get(1)[0].body) == {"n": 1}


@aio_test
async def test_hung_node_mid_publish_costs_one_attempt_timeout(bound: Bound) -> None:
    # The proxy's node hangs after the first message: pika alone would wait for the
    # confirm until heartbeats notice (a minute); the watchdog gives up after one try.
    proxy = await BrokerProxy().start()
    e = Emitter(f"{proxy.url()},{AMQP_URL}", bound.exchange, timeout=5, rng=KeepOrder())
    try:
        await asyncio.to_thread(e.emit, "jobs-status_changed", {"n": 1})
        assert e.node == f"127.0.0.1:{proxy.port}"
        assert proxy.blackhole() == 1
        start = time.monotonic()
        await asyncio.to_thread(e.emit, "jobs-status_changed", {"n": 2})
        elapsed = time.monotonic() - start
        assert e.node == "127.0.0.1:5672"
    finally:
        await asyncio.to_thread(e.close)
        await proxy.stop()
    assert emit.ATTEMPT_TIMEOUT - 0.1 < elapsed < emit.ATTEMPT_TIMEOUT + 1.5, elapsed
    assert [json.loads(m.body) for m in await asyncio.to_thread(bound.get, 2)] == [{"n": 1}, {"n": 2}]


def test_nack_is_retried_until_the_timeout(bound: Bound, emitter: Emitter) -> None:
    # A queue that rejects every publish: RabbitMQ nacks messages routed to it.
    full = unique("towerws-full")
    bound.channel.queue_declare(full, exclusive=True, arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
    bound.channel.queue_bind(full, bound.exchange, "jobs-summary")
    e = Emitter(AMQP_URL, bound.exchange, timeout=1)
    try:
        start = time.monotonic()
        with pytest.raises(EmitError, match=r"within 1 s .*nacked"):
            e.emit("jobs-summary", {"n": 1})
        assert 0.9 < time.monotonic() - start < 3
        e.emit("jobs-status_changed", {"n": 2})
    finally:
        e.close()
    # The `#` queue took every try (a retried nack: duplicates elsewhere), then n=2.
    bodies = [json.loads(m.body) for m in bound.get(3)]
    while (msg := bound.get_now()) is not None:
        bodies.append(json.loads(msg.body))
    assert bodies[-1] == {"n": 2} and all(b == {"n": 1} for b in bodies[:-1]), bodies



def test_configure_none_reads_environment(bound: Bound, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOWERWS_AMQP_URL", AMQP_URL)
    monkeypatch.setenv("TOWERWS_EXCHANGE", bound.exchange)
    configure()
    try:
        emit_channel_notification("schedules-changed", {"env": True})
        assert emit._get_default().exchange == bound.exchange
    finally:
        configure()
    assert json.loads(bound.get(1)[0].body) == {"env": True}


# -- the towerws-publish command ---------------------------------------------------------------------


def _command() -> list[str]:
    script = shutil.which("towerws-publish", path=str(VENV_BIN))
    if script:
        return [script]
    return [sys.executable, "-c", "import sys; from towerws.emit import main; sys.exit(main())"]


def run_cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOWERWS_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([*_command(), *args], input=stdin, capture_output=True, env=env, timeout=30)


def test_cli_publishes_argument_byte_for_byte(bound: Bound) -> None:
    payload = '{"status":  "running", "name": "café",\t"ids": [1, 2.50]}'
    result = run_cli("--amqp-url", AMQP_URL, "--exchange", bound.exchange, "jobs-status_changed", payload)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"" and result.stderr == b""
    (msg,) = bound.get(1)
    assert msg.body == payload.encode("utf-8")
    assert msg.routing_key == "jobs-status_changed"
    assert msg.properties.content_type == "application/json"


def test_cli_publishes_stdin_stream_in_order(bound: Bound) -> None:
    lines = [b'{"n": 1}', b'{"n":2 , "x": "\xc3\xa9"}', b'[3]']
    stdin = lines[0] + b"\n\n" + lines[1] + b"\r\n" + lines[2]  # blank line skipped, CRLF stripped, no final newline
    result = run_cli("-v", "--amqp-url", AMQP_URL, "--exchange", bound.exchange, "job_events-7", "-", stdin=stdin)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 3 and result.stderr == b""
    assert [m.body for m in bound.get(3)] == lines
    bound.assert_empty()


def test_cli_invalid_json_publishes_nothing(bound: Bound) -> None:
    stdin = b'{"n": 1}\n{"n": 2,}\n{"n": 3}\n'
    result = run_cli("--amqp-url", AMQP_URL, "--exchange", bound.exchange, "job_events-7", stdin=stdin)
    assert result.returncode == 2
    assert result.stdout == b""
    err = result.stderr.decode().splitlines()
    assert len(err) == 1 and err[0].startswith("towerws-publish: invalid JSON on line 2: "), err
    result = run_cli("--amqp-url", AMQP_URL, "--exchange", bound.exchange, "job_events-7", "{nope")
    assert result.returncode == 2
    assert result.stderr.decode().startswith("towerws-publish: invalid JSON on line 1: ")
    # The path is live (a positive delivery) and that sentinel is the only message.
    assert run_cli("--amqp-url", AMQP_URL, "--exchange", bound.exchange, "job_events-7", '"sentinel"').returncode == 0
    assert [m.body for m in bound.get(1)] == [b'"sentinel"']
    bound.assert_empty()


def test_cli_unreachable_broker_one_line_no_password() -> None:
    result = run_cli("--amqp-url", UNREACHABLE, "--timeout", "1", "jobs-status_changed", "{}")
    assert result.returncode == 1
    err = result.stderr.decode()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("towerws-publish: ") and "127.0.0.1:1" in err
    assert "secretpw" not in err and "Traceback" not in err


def test_cli_missing_exchange(bound: Bound) -> None:
    missing = unique("towerws-missing")
    result = run_cli("--amqp-url", AMQP_URL, "--exchange", missing, "jobs-status_changed", "{}")
    assert result.returncode == 1
    err = result.stderr.decode()
    assert len(err.splitlines()) == 1 and f"exchange '{missing}' does not exist" in err, err
