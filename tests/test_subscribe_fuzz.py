"""Property: whatever a client sends, the subscribe handler never raises, never joins a group
outside the allowlist or the API's permissions, and keeps serving another client.

Hypothesis drives a real towerws (Tower mode, against the fake API) through a
real ``websockets`` client and raw TCP connections; each example is one
message or one run of malformed frame bytes.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_twisted
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.logger import globalLogPublisher

from conftest import TIMEOUT, Client, Server, aio, aio_test, ws_frame as frame
from faketower import ALICE, BOB, FakeTower, eventually, fake_tower  # noqa: F401 (fixture)

# Ids the fake API lets ALICE see: the even ones.
def even_ids_only(user_id: int, path: str) -> bool:
    return user_id == ALICE.id and int(path.rstrip("/").rsplit("/", 1)[1]) % 2 == 0


def legitimate(server: Server, group: str, user_id: int) -> bool:
    """Whether ``group`` may hold ``user_id``: allowlisted, normalised, and (for objects) permitted."""
    settings_ = server.service.settings
    key, _, item = group.partition("-")
    if settings_.groups.group(key, item, user_id) != group:
        return False
    return key not in settings_.groups.id_keys or int(item) % 2 == 0


# -- what a client can send -------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
keys = st.sampled_from([
    "jobs", "schedules", "inventories", "control", "job_events", "ad_hoc_command_events", "workflow_events",
    "project_update_events", "inventory_update_events", "system_job_events", "broadcast", "jobs-status_changed",
    "", "#", "*", "job_events.#",
]) | st.text(max_size=12)
items = st.integers(-3, 40) | st.sampled_from([
    "status_changed", "summary", "changed", "limit_reached_7", "limit_reached_8", "0042", "#", "*", "42.5", " 4",
]) | json_values
groups_messages = st.fixed_dictionaries(
    {"groups": st.dictionaries(keys, st.lists(items, max_size=6) | json_values, max_size=5)},
    optional={"xrftoken": json_values, "extra": json_values},
).map(json.dumps)
texts = groups_messages | json_values.map(json.dumps) | st.text(max_size=100)


frames = st.builds(
    frame, st.booleans(), st.integers(0, 7), st.integers(0, 15), st.booleans(),
    st.binary(max_size=40) | st.sampled_from([b"\xff\xfe", b'{"groups": {"jobs": ["summary"]}}', "é".encode()[:1]]),
    st.sampled_from([0, 0, 0, 1, -1, 200, 70000]),
)
examples = (
    texts.map(lambda t: ("text", t))
    | st.binary(max_size=40).map(lambda b: ("binary", b))
    | st.lists(frames, min_size=1, max_size=4).map(lambda fs: ("raw", b"".join(fs)))
    | st.binary(min_size=1, max_size=60).map(lambda b: ("raw", b))
)

# -- driving the server ----------------------------------------------------------------------------------------

WHOLE_MESSAGE_ERRORS = {"access denied to channel", "too many groups", "superseded"}


def ends_the_answer(msg: Any) -> bool:
    """The last reply to one message: the groups reply, or an error that refuses the whole message."""
    if not isinstance(msg, dict):
        return True
    if "groups_current" in msg:
        return True
    error = msg.get("error", "")
    assert error != "internal error", msg
    return error in WHOLE_MESSAGE_ERRORS or error.startswith("invalid message: ")


@dataclass
class Rig:
    server: Server
    publisher: Any
    ws: Client | None = None
    bystander: Client | None = None
    failures: list[dict] = field(default_factory=list)
    sent: int = 0

    def observe(self, event: dict) -> None:
        if event.get("log_failure") is not None or event.get("log_level") is not None and event["log_level"].name in (
            "error", "critical"
        ):
            self.failures.append(event)

    async def fuzz_client(self) -> Client:
        if self.ws is None or self.ws.ws.state is not websockets.protocol.State.OPEN:
            self.ws = await self.server.connect(ALICE.token)
        return self.ws

    async def send_text(self, text: str) -> None:
        ws = await self.fuzz_client()
        await ws.subscribe({})  # each example starts from no groups, so a failure replays alike
        await ws.ws.send(text)
        while not ends_the_answer(await ws.recv_json()):
            pass

    async def send_binary(self, data: bytes) -> None:
        ws = await self.fuzz_client()
        await ws.ws.send(data)
        code, _ = await ws.closed()
        assert code == 1003

    async def send_raw(self, data: bytes) -> None:
        """A fresh connection that completes the handshake, then sends ``data`` and EOF."""
        factory = self.server.service.factory
        before = len(factory.connections)
        reader, writer = await asyncio.open_connection("127.0.0.1", self.server.port)
        key = os.urandom(16).hex()[:22] + "=="
        writer.write(
            f"GET /websocket/?token={ALICE.token} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        seen = b""
        while b'"accept": true' not in seen:
            chunk = await asyncio.wait_for(reader.read(4096), TIMEOUT)
            assert chunk, seen
            seen += chunk
        await eventually(lambda: len(factory.connections) == before + 1)
        writer.write(data)
        writer.write_eof()
        # Done once the server has read everything and let the connection go.
        await eventually(lambda: len(factory.connections) == before)
        writer.close()

    async def bystander_served(self) -> None:
        """The other client, subscribed before any of this, still gets its messages."""
        self.sent += 1
        await self.publisher.publish("jobs-status_changed", {"seq": self.sent})
        assert await self.bystander.recv_json() == {"seq": self.sent}

    def check_memberships(self) -> None:
        hub = self.server.service.hub
        for conn in self.server.service.factory.connections:
            for group in hub.groups_of(conn):
                assert legitimate(self.server, group, conn.user.id), (conn.user, group)


@pytest.fixture
def rig(server_factory: Any, fake_tower: FakeTower, publisher: Any) -> Any:
    fake_tower.rule = even_ids_only

    async def start() -> Rig:
        server = await server_factory(tower_url=fake_tower.url, max_groups_messages_per_second=100000)
        rig = Rig(server, publisher)
        rig.bystander = await server.connect(BOB.token)
        await rig.bystander.subscribe({"jobs": ["status_changed"]})
        return rig

    rig = pytest_twisted.blockon(aio(start()))
    globalLogPublisher.addObserver(rig.observe)
    yield rig
    globalLogPublisher.removeObserver(rig.observe)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(example=examples)
@aio_test
async def test_subscribe_handler_survives_anything(rig: Rig, example: tuple[str, Any]) -> None:
    await run(rig, *example)


async def run(rig: Rig, kind: str, data: Any) -> None:
    await asyncio.wait_for({"text": rig.send_text, "binary": rig.send_binary, "raw": rig.send_raw}[kind](data), 30)
    await rig.bystander_served()
    rig.check_memberships()
    assert rig.failures == []


@pytest.mark.parametrize("kind,data", [
    ("text", '{"groups": {"job_events": [2, 3, "0004"], "broadcast": ["x"], "control": ["limit_reached_8"]}}'),
    ("text", '{"groups": {"job_events": [' + "[" * 5000 + ']}}'),
    ("binary", b"\x00"),
    ("raw", frame(True, 0, 1, False, b"{}", 0)),  # unmasked client frame
    ("raw", frame(True, 0, 1, True, b"\xff\xfe", 0)),  # invalid UTF-8 text
    ("raw", frame(False, 0, 9, True, b"", 0)),  # fragmented ping
    ("raw", frame(True, 4, 1, True, b"{}", 0)),  # reserved bit
    ("raw", frame(True, 0, 1, True, b"{}", 70000)),  # longer than max_message_size
])
@aio_test
async def test_known_malformed_input(rig: Rig, kind: str, data: Any) -> None:
    await run(rig, kind, data)
