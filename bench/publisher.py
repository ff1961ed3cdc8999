"""A fast AMQP 0-9-1 publisher in its own process, driven by JSON lines on stdin.

pika's ``BlockingConnection`` tops out near 14,000 messages/s on one core here,
below what the many-groups scenario needs, so this module speaks the few AMQP
methods a publisher needs directly over a socket: connection handshake (PLAIN),
one channel, then ``basic.publish`` + content header + body frames built with
``struct`` and sent in batches.  No publisher confirms: the benchmark counts
what reaches the clients, and any message the broker dropped shows up as loss.

Commands (one JSON object per line on stdin, one JSON reply per line on stdout):

``{"cmd": "publish", "duration": D, "streams": [{"groups": [...], "rate": R, "size": S}, ...]}``
    Publish every stream concurrently for ``D`` seconds, ``R`` messages/s in
    total per stream, round-robin over its groups, in whole rounds (every group
    of a stream gets the same number of messages).  Each group has its own
    ``seq`` counter, kept across commands; the reply gives each stream's
    ``seq_start``/``seq_end`` (the same for all of its groups), the count, the
    elapsed time and the achieved rate.
``{"cmd": "probe", "groups": [...], "round": R}``
    Publish one probe body (:func:`bench.payload.make_probe`) to each group, as
    fast as the socket takes them; the reply gives the count, the wall-clock
    start and the elapsed time.
``{"cmd": "bind", "queue": Q, "durable": bool, "groups": [...], "channels": K}``
    What the broker alone does: declare queue ``Q``, bind it to the exchange once
    per group, pipelined (every ``queue.bind`` sent at once, round-robin over ``K``
    channels, then every ``bind-ok`` awaited), delete it; the reply gives the
    elapsed time of the binds and binds/s.
``{"cmd": "quit"}``
    Close the connection and exit.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import socket
import struct
import sys
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from bench.payload import DEFAULT_SIZE, make_body, make_probe, messages_per_group

FRAME_END = b"\xce"
_HEADER = struct.Struct("!BHI")
_METHOD = struct.Struct("!HH")


class AMQPError(Exception):
    """The broker refused something or closed the connection."""


def _shortstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!B", len(b)) + b


def _longstr(b: bytes) -> bytes:
    return struct.pack("!I", len(b)) + b


def _frame(ftype: int, channel: int, payload: bytes) -> bytes:
    return _HEADER.pack(ftype, channel, len(payload)) + payload + FRAME_END


def _method(channel: int, class_id: int, method_id: int, args: bytes = b"") -> bytes:
    return _frame(1, channel, _METHOD.pack(class_id, method_id) + args)


class RawPublisher:
    """One AMQP connection with one channel, publishing without confirms."""

    CHANNEL = 1

    def __init__(self, url: str, exchange: str, timeout: float = 10.0):
        parts = urlsplit(url)
        if parts.scheme != "amqp":
            raise ValueError("only amqp:// URLs are supported by the benchmark publisher")
        self.exchange = exchange
        self.sock = socket.create_connection((parts.hostname or "localhost", parts.port or 5672), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = b""
        self.frame_max = 131072
        vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        self._handshake(unquote(parts.username or "guest"), unquote(parts.password or "guest"), vhost)
        self.sock.settimeout(None)
        self._content_header_tail = struct.pack("!H", 0x8000) + _shortstr("application/json")

    # -- handshake -------------------------------------------------------------

    def _read_frame(self) -> tuple[int, int, bytes]:
        while True:
            if len(self._buf) >= 7:
                ftype, channel, size = _HEADER.unpack_from(self._buf)
                if len(self._buf) >= 8 + size:
                    payload = self._buf[7 : 7 + size]
                    self._buf = self._buf[8 + size :]
                    return ftype, channel, payload
            data = self.sock.recv(65536)
            if not data:
                raise AMQPError("the broker closed the connection")
            self._buf += data

    def _expect(self, class_id: int, method_id: int) -> bytes:
        while True:
            ftype, _, payload = self._read_frame()
            if ftype == 8:  # heartbeat
                continue
            if ftype != 1:
                raise AMQPError(f"unexpected frame type {ftype} during setup")
            cid, mid = _METHOD.unpack_from(payload)
            if (cid, mid) in ((10, 50), (20, 40)):
                raise AMQPError(self._close_reason(payload))
            if (cid, mid) != (class_id, method_id):
                raise AMQPError(f"expected method {class_id}.{method_id}, got {cid}.{mid}")
            return payload[4:]

    @staticmethod
    def _close_reason(payload: bytes) -> str:
        code, n = struct.unpack_from("!HB", payload, 4)
        return f"broker closed: {code} {payload[7 : 7 + n].decode(errors='replace')}"

    def _handshake(self, user: str, password: str, vhost: str) -> None:
        self.sock.sendall(b"AMQP\x00\x00\x09\x01")
        self._expect(10, 10)  # connection.start
        response = b"\x00" + user.encode() + b"\x00" + password.encode()
        self.sock.sendall(
            _method(0, 10, 11, _longstr(b"") + _shortstr("PLAIN") + _longstr(response) + _shortstr("en_US"))
        )
        tune = self._expect(10, 30)
        channel_max, frame_max, _heartbeat = struct.unpack_from("!HIH", tune)
        self.frame_max = frame_max or self.frame_max
        # Heartbeats off: this process may spend seconds in a publish loop.
        self.sock.sendall(_method(0, 10, 31, struct.pack("!HIH", channel_max, self.frame_max, 0)))
        self.sock.sendall(_method(0, 10, 40, _shortstr(vhost) + _shortstr("") + b"\x00"))
        self._expect(10, 41)
        self.sock.sendall(_method(self.CHANNEL, 20, 10, _shortstr("")))
        self._expect(20, 11)

    # -- the broker's side of binding (the rebind scenario's reference) ----------

    def open_channel(self, channel: int) -> None:
        self.sock.sendall(_method(channel, 20, 10, _shortstr("")))
        self._expect(20, 11)

    def queue_declare(self, queue: str, durable: bool) -> None:
        flags = 0x02 if durable else 0  # passive, durable, exclusive, auto-delete, no-wait
        # x-expires: a queue this process could not delete (it died) goes by itself.
        arguments = _longstr(_shortstr("x-expires") + b"I" + struct.pack("!i", 60_000))
        self.sock.sendall(_method(self.CHANNEL, 50, 10, b"\x00\x00" + _shortstr(queue) + bytes([flags]) + arguments))
        self._expect(50, 11)

    def queue_delete(self, queue: str) -> None:
        self.sock.sendall(_method(self.CHANNEL, 50, 40, b"\x00\x00" + _shortstr(queue) + b"\x00"))
        self._expect(50, 41)

    def bind_all(self, queue: str, groups: list[str], channels: list[int], timeout: float = 300.0) -> float:
        """Bind ``queue`` to every group, pipelined over ``channels``; seconds until the last bind-ok."""
        self.sock.settimeout(timeout)
        t0 = time.monotonic()
        frames = [
            _method(channels[i % len(channels)], 50, 20, b"\x00\x00" + _shortstr(queue) + _shortstr(self.exchange)
                    + _shortstr(g) + b"\x00" + _longstr(b""))
            for i, g in enumerate(groups)
        ]
        # At most ``window`` in flight: the replies must not fill our receive buffer
        # while the broker waits for us to take them (and we wait in sendall).
        window = 2048
        sent = done = 0
        while done < len(frames):
            if sent < len(frames) and sent - done <= window // 2:
                k = min(len(frames) - sent, window - (sent - done))
                self.sock.sendall(b"".join(frames[sent : sent + k]))
                sent += k
            self._expect(50, 21)
            done += 1
        elapsed = time.monotonic() - t0
        self.sock.settimeout(None)
        return elapsed

    # -- publishing ------------------------------------------------------------

    def publish_frames(self, routing_key: str, body: bytes) -> bytes:
        """The three (or more) frames of one ``basic.publish``, ready to send."""
        ch = self.CHANNEL
        out = [
            _method(ch, 60, 40, b"\x00\x00" + _shortstr(self.exchange) + _shortstr(routing_key) + b"\x00"),
            _frame(2, ch, struct.pack("!HHQ", 60, 0, len(body)) + self._content_header_tail),
        ]
        step = self.frame_max - 8
        for i in range(0, len(body), step):
            out.append(_frame(3, ch, body[i : i + step]))
        return b"".join(out)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def check(self) -> None:
        """Raise :class:`AMQPError` if the broker has closed the channel or connection."""
        readable, _, _ = select.select([self.sock], [], [], 0)
        if not readable:
            return
        data = self.sock.recv(65536)
        if not data:
            raise AMQPError("the broker closed the connection")
        self._buf, reason = scan_for_close(self._buf + data)
        if reason is not None:
            raise AMQPError(reason)

    def close(self) -> None:
        try:
            self.sock.sendall(_method(0, 10, 50, struct.pack("!H", 200) + _shortstr("bye") + b"\x00\x00\x00\x00"))
        except OSError:
            pass  # already gone; nothing left to close cleanly
        self.sock.close()


def scan_for_close(buf: bytes) -> tuple[bytes, str | None]:
    """Consume the whole frames in ``buf`` (what the broker sent a publisher).

    Returns the incomplete rest and, if one of them is ``connection.close`` or
    ``channel.close``, the broker's reason; other frames (heartbeats, flow) are dropped.
    """
    while len(buf) >= 8:
        ftype, _, size = _HEADER.unpack_from(buf)
        if len(buf) < 8 + size:
            break
        payload = buf[7 : 7 + size]
        buf = buf[8 + size :]
        if ftype == 1 and _METHOD.unpack_from(payload) in ((10, 50), (20, 40)):
            return buf, RawPublisher._close_reason(payload)
    return buf, None


@dataclass
class Stream:
    """One paced message stream: ``rate`` messages/s round-robin over ``groups``."""

    groups: list[str]
    rate: float
    size: int = DEFAULT_SIZE
    sent: int = 0
    total: int = 0
    start: int = 0


def run_publish(pub: RawPublisher, seqs: dict[str, int], duration: float, specs: list[dict[str, Any]]) -> dict:
    """Publish the streams in ``specs`` for ``duration`` seconds; the reply of a ``publish`` command."""
    streams = [Stream(list(s["groups"]), float(s["rate"]), int(s.get("size", DEFAULT_SIZE))) for s in specs]
    for s in streams:
        s.total = messages_per_group(s.rate, duration, len(s.groups)) * len(s.groups)
        base = {seqs.get(g, 0) for g in s.groups}
        if len(base) != 1:
            raise ValueError("the groups of one stream must share their seq counter")
        s.start = base.pop()
    cpu0 = time.process_time()
    t0 = time.monotonic()
    wall0_us = time.time_ns() // 1000
    batch_cap = 512
    while True:
        now = time.monotonic()
        elapsed = now - t0
        pending = False
        chunks: list[bytes] = []
        for s in streams:
            due = min(s.total, int(s.rate * elapsed) + 1)
            n = min(due - s.sent, batch_cap)
            for _ in range(max(0, n)):
                group = s.groups[s.sent % len(s.groups)]
                seq = s.start + s.sent // len(s.groups)
                # The scheduled send time: a publisher held back (broker flow control,
                # a busy CPU) shows as latency, not as a silently lower rate.
                sent_us = wall0_us + int(s.sent * 1e6 / s.rate)
                chunks.append(pub.publish_frames(group, make_body(seq, sent_us, s.size)))
                s.sent += 1
            if s.sent < s.total:
                pending = True
        if chunks:
            pub.send(b"".join(chunks))
        if not pending:
            break
        if not chunks:
            # Sleep until the next message of the busiest stream is due.
            next_due = min((s.sent / s.rate) for s in streams if s.sent < s.total)
            time.sleep(max(0.0, min(0.001, next_due - (time.monotonic() - t0))))
            pub.check()
    elapsed = time.monotonic() - t0
    pub.check()
    replies = []
    for s in streams:
        per_group = s.total // len(s.groups)
        for g in s.groups:
            seqs[g] = s.start + per_group
        replies.append(
            {"seq_start": s.start, "seq_end": s.start + per_group, "published": s.total, "rate": s.total / elapsed}
        )
    cpu = (time.process_time() - cpu0) / elapsed
    return {"ok": True, "start": wall0_us / 1e6, "elapsed": elapsed, "cpu": cpu, "streams": replies}


def run_probe(pub: RawPublisher, groups: list[str], round_: int, batch: int = 512) -> dict[str, Any]:
    """One probe to each of ``groups``, unpaced (a probe round should take as little time as it can)."""
    start = time.time()
    t0 = time.monotonic()
    for i in range(0, len(groups), batch):
        sent_us = time.time_ns() // 1000
        pub.send(b"".join(pub.publish_frames(g, make_probe(round_, g, sent_us)) for g in groups[i : i + batch]))
    pub.check()
    return {"ok": True, "published": len(groups), "start": start, "elapsed": time.monotonic() - t0}


def run_bind(pub: RawPublisher, opened: set[int], cmd: dict[str, Any]) -> dict[str, Any]:
    """The ``bind`` command: the broker's own pace of binding one queue to many groups."""
    channels = [pub.CHANNEL + 1 + k for k in range(int(cmd["channels"]))]
    for ch in channels:
        if ch not in opened:
            pub.open_channel(ch)
            opened.add(ch)
    groups = list(cmd["groups"])
    pub.queue_declare(cmd["queue"], bool(cmd["durable"]))
    try:
        elapsed = pub.bind_all(cmd["queue"], groups, channels)
    finally:
        pub.queue_delete(cmd["queue"])
    return {"ok": True, "binds": len(groups), "elapsed": elapsed, "binds_per_s": len(groups) / elapsed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--amqp-url", required=True)
    parser.add_argument("--exchange", required=True)
    args = parser.parse_args(argv)
    pub = RawPublisher(args.amqp_url, args.exchange)
    seqs: dict[str, int] = {}
    opened: set[int] = set()
    out = sys.stdout
    out.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")
    out.flush()
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["cmd"] == "publish":
                reply = run_publish(pub, seqs, float(cmd["duration"]), cmd["streams"])
            elif cmd["cmd"] == "bind":
                reply = run_bind(pub, opened, cmd)
            elif cmd["cmd"] == "probe":
                reply = run_probe(pub, list(cmd["groups"]), int(cmd["round"]))
            elif cmd["cmd"] == "quit":
                break
            else:
                reply = {"ok": False, "error": f"unknown command {cmd['cmd']!r}"}
        except (AMQPError, OSError, ValueError, KeyError) as exc:
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()
    pub.close()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    sys.stderr.write(f"publisher exiting: cpu {ru.ru_utime + ru.ru_stime:.1f}s\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
