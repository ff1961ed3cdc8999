"""Several towerws nodes on one broker: two real ``twistd -n towerws`` processes."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from conftest import AMQP_URL, ROOT, Client, aio_test, connect, delete_queue, unique
from test_broker_faults import _rabbitmqctl
from test_twistd import TWISTD, free_port

GRACE = 3.0


class Node:
    """A ``twistd -n towerws`` subprocess whose output is drained (and kept) in the background."""

    def __init__(self, exchange: str, tokens_file: str):
        self.id = unique("node")
        self.queue = f"towerws.{self.id}"
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}/websocket/"
        self.args = [
            "--listen", f"tcp:{self.port}:interface=127.0.0.1", "--exchange", exchange, "--node-id", self.id,
            "--tokens-file", tokens_file, "--queue-expires", "60", "--unbind-grace", str(GRACE),
        ]
        self.lines: list[str] = []
        self.proc: Any = None
        self._consuming = asyncio.get_running_loop().create_future()

    async def start(self) -> "Node":
        self.proc = await asyncio.create_subprocess_exec(
            TWISTD, "--nodaemon", "--pidfile=", "towerws", *self.args,
            env={**os.environ, "TOWERWS_AMQP_URL": AMQP_URL}, cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        self._reader = asyncio.ensure_future(self._read())
        await asyncio.wait_for(asyncio.shield(self._consuming), 30)
        return self

    async def _read(self) -> None:
        while line := (await self.proc.stdout.readline()).decode():
            self.lines.append(line)
            if f"consuming {self.queue}" in line and not self._consuming.done():
                self._consuming.set_result(None)
        if not self._consuming.done():
            self._consuming.set_exception(AssertionError("twistd exited:\n" + "".join(self.lines)))

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await asyncio.wait_for(self.proc.wait(), 20)
            await asyncio.wait_for(self._reader, 5)
        delete_queue(self.queue)


async def bindings(exchange: str) -> dict[str, set[str]]:
    """queue -> routing keys bound from ``exchange`` (``rabbitmqctl list_bindings``)."""
    rows = await asyncio.get_running_loop().run_in_executor(
        None, _rabbitmqctl, "list_bindings", "source_name", "destination_name", "routing_key"
    )
    found: dict[str, set[str]] = {}
    for source, queue, key in rows:
        if source == exchange:
            found.setdefault(queue, set()).add(key)
    return found


async def read_until(ws: Client, marker: str) -> list[str]:
    got = []
    while (msg := (await ws.recv_json())["group"]) != marker:
        got.append(msg)
    return got


@aio_test
async def test_two_nodes_each_client_gets_exactly_its_groups_once(exchange: str, tokens_file: str, publisher) -> None:
    a, b = Node(exchange, tokens_file), Node(exchange, tokens_file)
    try:
        await asyncio.gather(a.start(), b.start())
        # (node, job_events ids, also jobs-status_changed): job_events-1 and
        # jobs-status_changed are shared across nodes, 2 and 3 are not; each
        # client also has its own marker group 100+i.
        plan = [(a, [1], True), (a, [2], False), (b, [3], True), (b, [1], False)]
        clients = []
        for i, (node, ids, status) in enumerate(plan):
            ws = await connect(node.url)
            groups: dict[str, list[Any]] = {"job_events": ids + [100 + i]}
            if status:
                groups["jobs"] = ["status_changed"]
            await ws.subscribe(groups)
            clients.append(ws)

        found = await bindings(exchange)
        assert found == {
            a.queue: {"job_events-1", "job_events-2", "job_events-100", "job_events-101", "jobs-status_changed"},
            b.queue: {"job_events-1", "job_events-3", "job_events-102", "job_events-103", "jobs-status_changed"},
        }

        for group in ("job_events-1", "job_events-2", "job_events-3", "job_events-4", "jobs-status_changed"):
            await publisher.publish(group, {"group": group})
        for i in range(len(clients)):
            await publisher.publish(f"job_events-{100 + i}", {"group": f"job_events-{100 + i}"})
        expected = [
            ["job_events-1", "jobs-status_changed"],
            ["job_events-2"],
            ["job_events-3", "jobs-status_changed"],
            ["job_events-1"],
        ]
        for i, ws in enumerate(clients):
            assert await read_until(ws, f"job_events-{100 + i}") == expected[i]  # its groups, once, in order

        for ws in clients:
            await ws.close()
        left = time.monotonic()
        first = await bindings(exchange)
        if time.monotonic() - left < GRACE:  # observed within the grace period: still bound
            assert first.get(a.queue) and first.get(b.queue), first
        # Bounded poll: rabbitmqctl is the outside observer of the unbinds.
        while (found := await bindings(exchange)) and time.monotonic() - left < GRACE + 30:
            await asyncio.sleep(0.5)
        assert found == {}, found
        gone_after = time.monotonic() - left
        assert gone_after >= GRACE
        print(f"\n[nodes] bindings gone {gone_after:.1f} s after the last client left (grace {GRACE} s)")
    finally:
        await asyncio.gather(a.stop(), b.stop())
    for node in (a, b):
        assert "Traceback" not in "".join(node.lines), "".join(node.lines)
