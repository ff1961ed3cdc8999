"""The ceiling: the leanest websocket fan-out server plain Twisted can run.

No broker, no Autobahn, no JSON validation: a hand-written websocket handshake,
a trivial reading of the client's groups message (answered like towerws, so the
same load generator drives both), and messages made in-process at the requested
rate, each framed once; the frames of one tick are joined once and the same
bytes written to every subscriber, straight to its socket while Twisted holds
nothing for it (the technique towerws uses, without its per-client outbox).
What this process delivers per second is what one CPython core can push through
Twisted; towerws's fan-out results are stated as a fraction of it.

Run: ``python -m bench.ceiling --port P``.  It prints ``{"ready": true, ...}``
on stdout once listening, then takes the publisher's ``publish`` command
(:mod:`bench.publisher`) on stdin, so the runner drives both alike.  Message
send times are the *scheduled* times (start + k / rate): a server too busy to
generate on time shows it as latency, never as a silently lower rate.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
import time
from typing import Any

from twisted.internet import reactor, stdio
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.protocols.basic import LineReceiver

from bench.payload import DEFAULT_SIZE, make_body, messages_per_group
from bench.publisher import Stream

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MAX_REQUEST = 16384
TICK = 0.001


def text_frame(payload: bytes) -> bytes:
    """An unmasked, final text frame (server to client), as towerws frames its deliveries."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return bytes((0x81, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x81, 127)) + n.to_bytes(8, "big") + payload


def _unmask(mask: bytes, data: bytes) -> bytes:
    n = len(data)
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def send(transport: Any, data: bytes) -> None:
    """To the socket directly when Twisted holds nothing for it, else (and the rest) through the transport.

    Reads the transport's private buffer fields: fine for a benchmark, not for a product.
    """
    if not transport._tempDataLen and len(transport.dataBuffer) == transport.offset:
        try:
            sent = transport.socket.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            sent = 0  # broken: the transport's write below finds out and closes it
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


class CeilingProtocol(Protocol):
    factory: CeilingFactory

    def connectionMade(self) -> None:
        self.buf = b""
        self.open = False
        self.groups: list[str] = []

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        if not self.open:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > _MAX_REQUEST:
                    self.transport.abortConnection()
                return
            self._handshake(self.buf[:end])
            self.buf = self.buf[end + 4 :]
        self._frames()

    def _handshake(self, request: bytes) -> None:
        key = b""
        for line in request.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"sec-websocket-key":
                key = value.strip()
        accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n" + text_frame(b'{"accept": true, "user": 1}')
        )
        self.open = True

    def _frames(self) -> None:
        buf = self.buf
        while len(buf) >= 6:
            opcode, length = buf[0] & 0x0F, buf[1] & 0x7F
            pos = 2
            if length == 126:
                length, pos = int.from_bytes(buf[2:4], "big"), 4
            elif length == 127:
                length, pos = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < pos + 4 + length:
                break
            payload = _unmask(buf[pos : pos + 4], buf[pos + 4 : pos + 4 + length])
            buf = buf[pos + 4 + length :]
            if opcode == 0x1:
                self._groups_message(payload)
            elif opcode == 0x8:
                self.transport.write(bytes((0x88, len(payload[:2]))) + payload[:2])
                self.transport.loseConnection()
            elif opcode == 0x9:
                self.transport.write(bytes((0x8A, len(payload))) + payload)
        self.buf = buf

    def _groups_message(self, payload: bytes) -> None:
        request = json.loads(payload)["groups"]
        groups = sorted({f"{key}-{item}" for key, items in request.items() for item in items})
        self.factory.set_groups(self, groups)
        reply = {"groups_current": groups, "groups_left": [], "groups_joined": groups}
        self.transport.write(text_frame(json.dumps(reply).encode()))

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.set_groups(self, [])


class CeilingFactory(Factory):
    protocol = CeilingProtocol

    def __init__(self) -> None:
        self.members: dict[str, list[Any]] = {}

    def set_groups(self, proto: CeilingProtocol, groups: list[str]) -> None:
        for g in proto.groups:
            members = self.members.get(g, [])
            if proto.transport in members:
                members.remove(proto.transport)
        proto.groups = groups
        for g in groups:
            self.members.setdefault(g, []).append(proto.transport)


class Generator:
    """Runs one ``publish`` command: paced streams, framed once, fanned out in-process."""

    def __init__(self, factory: CeilingFactory, seqs: dict[str, int], cmd: dict[str, Any], done: Any):
        self.factory = factory
        self.seqs = seqs
        self.done = done
        duration = float(cmd["duration"])
        self.streams = []
        for spec in cmd["streams"]:
            s = Stream(list(spec["groups"]), float(spec["rate"]), int(spec.get("size", DEFAULT_SIZE)))
            s.total = messages_per_group(s.rate, duration, len(s.groups)) * len(s.groups)
            s.start = seqs.get(s.groups[0], 0)
            self.streams.append(s)
        self.t0 = time.monotonic()
        self.wall0_us = time.time_ns() // 1000
        self.cpu0 = time.process_time()
        self.loop = LoopingCall(self.tick)
        self.loop.start(TICK)

    def tick(self) -> None:
        elapsed = time.monotonic() - self.t0
        members = self.factory.members
        pending = False
        tick_frames: dict[str, list[bytes]] = {}
        for s in self.streams:
            groups, rate = s.groups, s.rate
            due = min(s.total, int(rate * elapsed) + 1)
            sent = s.sent
            while sent < due:
                group = groups[sent % len(groups)]
                body = make_body(s.start + sent // len(groups), self.wall0_us + int(sent * 1e6 / rate), s.size)
                tick_frames.setdefault(group, []).append(text_frame(body))
                sent += 1
            s.sent = sent
            pending = pending or sent < s.total
        for group, frames in tick_frames.items():
            data = frames[0] if len(frames) == 1 else b"".join(frames)
            for transport in members.get(group, ()):
                send(transport, data)
        if not pending:
            self.loop.stop()
            self.finish(time.monotonic() - self.t0)

    def finish(self, elapsed: float) -> None:
        replies = []
        for s in self.streams:
            per_group = s.total // len(s.groups)
            for g in s.groups:
                self.seqs[g] = s.start + per_group
            replies.append({"seq_start": s.start, "seq_end": s.start + per_group,
                            "published": s.total, "rate": s.total / elapsed})
        cpu = (time.process_time() - self.cpu0) / elapsed
        self.done({"ok": True, "start": self.wall0_us / 1e6, "elapsed": elapsed, "cpu": cpu, "streams": replies})


class Control(LineReceiver):
    """The runner's commands on stdin, one JSON object per line."""

    delimiter = b"\n"

    def __init__(self, factory: CeilingFactory):
        self.factory = factory
        self.seqs: dict[str, int] = {}

    def lineReceived(self, line: bytes) -> None:
        cmd = json.loads(line)
        if cmd["cmd"] == "publish":
            Generator(self.factory, self.seqs, cmd, self.reply)
        elif cmd["cmd"] == "quit":
            reactor.stop()
        else:
            self.reply({"ok": False, "error": f"unknown command {cmd['cmd']!r}"})

    def reply(self, obj: dict[str, Any]) -> None:
        self.transport.write(json.dumps(obj).encode() + b"\n")

    def connectionLost(self, reason: Any = None) -> None:
        if reactor.running:
            reactor.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Lean plain-Twisted websocket fan-out server (the ceiling).")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--interface", default="127.0.0.1")
    parser.add_argument("--backlog", type=int, default=1024)
    args = parser.parse_args(argv)
    factory = CeilingFactory()
    reactor.listenTCP(args.port, factory, backlog=args.backlog, interface=args.interface)
    control = Control(factory)
    stdio.StandardIO(control)
    control.reply({"ready": True, "pid": os.getpid(), "reactor": type(reactor).__name__})
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
