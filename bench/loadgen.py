"""The load generator: many websocket clients in one asyncio process (picows, uvloop).

Driven by JSON lines on stdin, answering one JSON line per command on stdout, so
the runner can keep its clients connected across the trials of a scenario.
Clients carry a *tag* (``normal``, ``slow``, ...); commands and statistics are
per tag.

Every client speaks the towerws wire protocol: wait for ``{"accept": true}``,
send one groups message, wait for the reply carrying ``groups_current``; from
then on each text frame is a delivery whose body (:mod:`bench.payload`) gives a
sequence number and the send time.  A *tracked* client (one group) checks the
sequence numbers of the current trial window ``[start, end)``: a gap counts as
lost messages, a number seen again as a duplicate, an older one as stale.
Latency is ``time.time()`` at receipt minus the send time, kept in a histogram
of 0.1 ms bins per tag (bounded memory, no sort).

Commands:

``connect``  ``{"tag", "n", "url", "groups": {KEY: [ITEM]}, "own_key": KEY|null, "own_base": B,
             "own_count": K, "track": bool, "concurrency": N, "rcvbuf": bytes|null, "timeout": s}``
    Open ``n`` clients, each subscribing to ``groups`` plus, with ``own_key``,
    its own group ``own_key-(own_base + i)`` (with ``own_count`` K > 1: its own K
    groups ``own_key-(own_base + i*K)`` ... ``own_key-(own_base + i*K + K-1)``).
    Replies with the count subscribed,
    failures and the elapsed time (handshake + subscribe reply of all clients).
``expect``   ``{"tags", "start", "end"}``: start a trial window: reset counters and histograms.
``stats``    ``{"tags", "wait": s}``: wait up to ``wait`` s until every tracked client of the
             tags has received ``end - 1`` (or is gone), then report per tag.
``stall``    ``{"tag"}``: stop reading on those clients' sockets (the server's send buffer fills).
``probe``    ``{"tag"}``: the TCP state of each stalled client (did the server close or reset it?).
``resume``   ``{"tag", "timeout"}``: read again, to collect close frames; reports each client's
             close code, or ``open`` (still connected) or ``dropped`` (gone without a close frame).
``close``    ``{"tags", "timeout"}``: abort those connections, wait for them to be gone.
``mark_probes`` ``{"tags"}``: from now on each client waits for one probe body
             (:func:`bench.payload.make_probe`) on every group it holds.
``wait_probes`` ``{"tags", "wait": s}``: wait up to ``wait`` s until every client got them all
             (or is gone); reports how many arrived, the receipt time of the last one and
             the groups still missing (to probe again).
``quit``
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import socket
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from bench.payload import MARKER, PROBE_MARKER, SENT_US, SEQ, read_probe

#: latency histogram: 0.1 ms bins up to 10 s (the last bin collects everything slower)
BIN_US = 100
NBINS = 100_001
_time_ns = time.time_ns
_TCP_STATES = {1: "established", 4: "fin_wait1", 5: "fin_wait2", 7: "closed", 8: "close_wait", 9: "last_ack"}


class Tag:
    """Counters of one group of clients for the current trial window."""

    def __init__(self, name: str, track: bool):
        self.name = name
        self.track = track
        self.clients: list[Client] = []
        self.start = 0
        self.end = 0
        #: probes: (client, group) pairs still waiting for theirs, extra ones, the last receipt
        self.probes_outstanding = 0
        self.probes_extra = 0
        self.probe_last_ns = 0
        self.reset()

    def reset(self) -> None:
        self.hist = [0] * NBINS
        self.max_latency_us = 0
        self.last_rx_ns = 0
        for c in self.clients:
            c.frames = 0


class Client(WSListener):
    """One websocket client; the hot path is :meth:`on_ws_frame` after subscription."""

    def __init__(self, tag: Tag, subscribe: bytes, groups: list[str]):
        self.tag = tag
        self.subscribe_msg = subscribe
        self.groups = groups
        self.probes_missing: set[str] = set()
        self.transport: WSTransport | None = None
        self.subscribed = False
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.close_code: int | None = None
        self.refusal: str | None = None
        self.stalled_at = 0.0
        self.frames = 0
        self.next_seq = 0
        self.missing = 0
        self.dups = 0
        self.stale = 0

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        body = frame.get_payload_as_bytes()
        if self.subscribed and body.startswith(MARKER):
            # The hot path: one call per delivered frame, integers only.
            now_ns = _time_ns()
            seq = int(body[SEQ])
            latency = now_ns // 1000 - int(body[SENT_US])
            self.frames += 1
            tag = self.tag
            tag.last_rx_ns = now_ns
            if latency > tag.max_latency_us:
                tag.max_latency_us = latency
            i = latency // BIN_US
            if i >= NBINS:
                i = NBINS - 1
            elif i < 0:
                i = 0
            tag.hist[i] += 1
            expected = self.next_seq
            if seq == expected:
                self.next_seq = seq + 1
            elif seq > expected:
                self.missing += seq - expected
                self.next_seq = seq + 1
            elif seq < tag.start:
                self.stale += 1
            else:
                self.dups += 1
            return
        msg_type = frame.msg_type
        if msg_type == WSMsgType.TEXT:
            if self.subscribed and body.startswith(PROBE_MARKER):
                self._probe(body)
            elif self.subscribed:
                self.frames += 1  # a message that is not a benchmark delivery
            else:
                self._control(transport, body)
        elif msg_type == WSMsgType.CLOSE:
            self.close_code = int.from_bytes(body[:2], "big") if len(body) >= 2 else 1005
            transport.send_close()
            transport.disconnect()

    def _probe(self, body: bytes) -> None:
        # Not the hot path: one JSON parse per probe is fine (a round is one per group).
        _, group, _ = read_probe(body)
        tag = self.tag
        if group in self.probes_missing:
            self.probes_missing.discard(group)
            tag.probes_outstanding -= 1
            tag.probe_last_ns = _time_ns()
        else:
            tag.probes_extra += 1  # a repeat of a probed group, or a probe before mark_probes

    def _control(self, transport: WSTransport, body: bytes) -> None:
        msg = json.loads(body)
        if "accept" in msg:
            if msg["accept"]:
                transport.send(WSMsgType.TEXT, self.subscribe_msg)
            else:
                self.refusal = str(msg.get("error"))
        elif "groups_current" in msg:
            self.subscribed = True
            if not self.ready.done():
                self.ready.set_result(None)
        elif "error" in msg:
            self.refusal = str(msg["error"])

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.probes_missing:
            # A client that is gone waits for nothing more; wait_probes counts it as gone.
            self.tag.probes_outstanding -= len(self.probes_missing)
            self.probes_missing = set()
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(self.refusal or f"closed before subscribing ({self.close_code})"))
        if not self.gone.done():
            self.gone.set_result(None)

    def outcome(self) -> int | str:
        """The close code received, else ``"dropped"`` (gone without a close frame), else the kernel's TCP state.

        A paused uvloop transport whose peer reset the connection does not always
        report it once reading resumes; the socket's TCP state (``closed``: reset,
        ``close_wait``: closed by the server) still tells, ``open`` only while established.
        """
        if self.close_code is not None:
            return self.close_code
        if self.gone.done():
            return "dropped"
        state = self.tcp_state()
        return "open" if state == "established" else state

    def tcp_state(self) -> str:
        """The kernel's TCP state of this client's socket (``close_wait``: the server closed)."""
        if self.transport is None or self.gone.done():
            return "gone"
        sock = self.transport.underlying_transport.get_extra_info("socket")
        if sock is None:
            return "gone"
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
        return _TCP_STATES.get(info[0], f"state{info[0]}")


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def percentile(hist: list[int], total: int, q: float) -> float:
    """The ``q`` quantile (0..1) in seconds of a histogram of 0.1 ms bins, as the bin's upper edge."""
    if total == 0:
        return 0.0
    rank = q * total
    seen = 0
    for i, n in enumerate(hist):
        seen += n
        if n and seen >= rank:
            return (i + 1) * BIN_US / 1e6
    return NBINS * BIN_US / 1e6


class LoadGen:
    """All clients of this process, by tag, and the command handlers."""

    def __init__(self) -> None:
        self.tags: dict[str, Tag] = {}
        self.cpu_mark = _cpu()
        self.wall_mark = time.monotonic()

    def _tags(self, cmd: dict[str, Any]) -> list[Tag]:
        names = cmd.get("tags") or list(self.tags)
        return [self.tags[n] for n in names if n in self.tags]

    async def connect(self, cmd: dict[str, Any]) -> dict[str, Any]:
        tag = self.tags.get(cmd["tag"]) or self.tags.setdefault(cmd["tag"], Tag(cmd["tag"], cmd.get("track", True)))
        n, url = int(cmd["n"]), cmd["url"]
        groups: dict[str, list] = cmd.get("groups") or {}
        own_key, own_base, own_count = cmd.get("own_key"), int(cmd.get("own_base", 1)), int(cmd.get("own_count", 1))
        rcvbuf = cmd.get("rcvbuf")
        timeout = float(cmd.get("timeout", 30))
        sem = asyncio.Semaphore(int(cmd.get("concurrency", 200)))
        offset = len(tag.clients)
        failures: dict[str, int] = {}

        def socket_factory(parsed: Any) -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, int(rcvbuf or 0))
            return s

        async def one(i: int) -> None:
            subs = {k: list(v) for k, v in groups.items()}
            if own_key:
                first = own_base + (offset + i) * own_count
                subs.setdefault(own_key, []).extend(range(first, first + own_count))
            client_msg = json.dumps({"groups": subs}).encode()
            names = [f"{key}-{item}" for key, items in subs.items() for item in items]
            async with sem:
                try:
                    _, listener = await asyncio.wait_for(
                        ws_connect(
                            lambda: Client(tag, client_msg, names),
                            url,
                            websocket_handshake_timeout=timeout,
                            read_buffer_init_size=4096,
                            socket_factory=socket_factory if rcvbuf else None,
                        ),
                        timeout,
                    )
                    assert isinstance(listener, Client)
                    client = listener
                    await asyncio.wait_for(client.ready, timeout)
                except Exception as exc:
                    # Refusals, timeouts, resets, handshake errors: each counted by kind and
                    # reported to the runner, which decides whether the run is valid.
                    key = f"{type(exc).__name__}: {exc}"[:120]
                    failures[key] = failures.get(key, 0) + 1
                    return
                tag.clients.append(client)

        t0 = time.monotonic()
        cpu0 = _cpu()
        await asyncio.gather(*(one(i) for i in range(n)))
        elapsed = time.monotonic() - t0
        ok = len(tag.clients) - offset
        return {
            "ok": not failures,
            "subscribed": ok,
            "failed": sum(failures.values()),
            "failures": failures,
            "elapsed": elapsed,
            "rate": ok / elapsed if elapsed > 0 else 0.0,
            "loadgen_cpu": (_cpu() - cpu0) / elapsed if elapsed > 0 else 0.0,
        }

    def expect(self, cmd: dict[str, Any]) -> dict[str, Any]:
        start, end = int(cmd.get("start", 0)), int(cmd.get("end", 0))
        for tag in self._tags(cmd):
            tag.start, tag.end = start, end
            tag.reset()
            for c in tag.clients:
                c.next_seq, c.missing, c.dups, c.stale = start, 0, 0, 0
        self.cpu_mark, self.wall_mark = _cpu(), time.monotonic()
        return {"ok": True}

    async def stats(self, cmd: dict[str, Any]) -> dict[str, Any]:
        tags = self._tags(cmd)
        deadline = time.monotonic() + float(cmd.get("wait", 0))
        while time.monotonic() < deadline:
            if all(c.next_seq >= t.end or c.gone.done() for t in tags if t.track for c in t.clients):
                break
            await asyncio.sleep(0.02)
        wall = time.monotonic() - self.wall_mark
        out: dict[str, Any] = {"ok": True, "loadgen_cpu": (_cpu() - self.cpu_mark) / wall if wall > 0 else 0.0}
        for t in tags:
            total = sum(t.hist)
            row: dict[str, Any] = {
                "clients": len(t.clients),
                "open": sum(1 for c in t.clients if not c.gone.done()),
                "frames": sum(c.frames for c in t.clients),
                "last_rx": t.last_rx_ns / 1e9,
                "p50": percentile(t.hist, total, 0.50),
                "p99": percentile(t.hist, total, 0.99),
                "max": t.max_latency_us / 1e6,
            }
            if t.track:
                expected = (t.end - t.start) * len(t.clients)
                missing = sum(c.missing + max(0, t.end - c.next_seq) for c in t.clients)
                row.update(
                    expected=expected,
                    lost=missing,
                    dups=sum(c.dups for c in t.clients),
                    stale=sum(c.stale for c in t.clients),
                    complete=sum(1 for c in t.clients if c.next_seq >= t.end),
                )
            out[t.name] = row
        return out

    def stall(self, cmd: dict[str, Any]) -> dict[str, Any]:
        now = time.monotonic()
        for c in self.tags[cmd["tag"]].clients:
            if c.transport is not None:
                c.transport.underlying_transport.pause_reading()
                c.stalled_at = now
        return {"ok": True}

    def probe(self, cmd: dict[str, Any]) -> dict[str, Any]:
        states = [c.tcp_state() for c in self.tags[cmd["tag"]].clients]
        return {"ok": True, "states": states, "closed": sum(1 for s in states if s != "established")}

    async def resume(self, cmd: dict[str, Any]) -> dict[str, Any]:
        clients = self.tags[cmd["tag"]].clients
        for c in clients:
            if c.transport is not None and not c.gone.done():
                c.transport.underlying_transport.resume_reading()
        await asyncio.wait([asyncio.ensure_future(c.gone) for c in clients], timeout=float(cmd.get("timeout", 5)))
        return {"ok": True, "close_codes": [c.outcome() for c in clients]}

    def mark_probes(self, cmd: dict[str, Any]) -> dict[str, Any]:
        expected = 0
        for tag in self._tags(cmd):
            tag.probes_outstanding, tag.probes_extra, tag.probe_last_ns = 0, 0, 0
            for c in tag.clients:
                c.probes_missing = set(c.groups) if not c.gone.done() else set()
                tag.probes_outstanding += len(c.probes_missing)
            expected += tag.probes_outstanding
        return {"ok": True, "expected": expected}

    async def wait_probes(self, cmd: dict[str, Any]) -> dict[str, Any]:
        tags = self._tags(cmd)
        deadline = time.monotonic() + float(cmd.get("wait", 0))
        # A counter per tag, so the wait does not walk 10,000 sets every 10 ms.
        while any(t.probes_outstanding for t in tags) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        missing = sorted({g for t in tags for c in t.clients if not c.gone.done() for g in c.probes_missing})
        return {
            "ok": True,
            "outstanding": sum(t.probes_outstanding for t in tags),
            "missing_groups": missing,
            "extra": sum(t.probes_extra for t in tags),
            "last_rx": max(t.probe_last_ns for t in tags) / 1e9 if tags else 0.0,
            "gone": sum(1 for t in tags for c in t.clients if c.gone.done()),
        }

    async def close(self, cmd: dict[str, Any]) -> dict[str, Any]:
        tags = self._tags(cmd)
        clients = [c for t in tags for c in t.clients]
        for c in clients:
            if c.transport is not None and not c.gone.done():
                c.transport.underlying_transport.abort()
        if clients:
            await asyncio.wait([asyncio.ensure_future(c.gone) for c in clients], timeout=float(cmd.get("timeout", 10)))
        for t in tags:
            del self.tags[t.name]
        return {"ok": True, "closed": len(clients)}


async def serve() -> None:
    """Read commands from stdin until ``quit`` or end of input."""
    gen = LoadGen()
    await command_loop({
        "connect": gen.connect,
        "expect": gen.expect,
        "stats": gen.stats,
        "stall": gen.stall,
        "probe": gen.probe,
        "resume": gen.resume,
        "close": gen.close,
        "mark_probes": gen.mark_probes,
        "wait_probes": gen.wait_probes,
    })


async def command_loop(handlers: dict[str, Callable[[dict[str, Any]], Any]],
                       errors: tuple[type[Exception], ...] = ()) -> None:
    """Say ready, then answer each JSON-line command on stdin with its handler's reply until ``quit``.

    A handler may be a coroutine function; ``errors`` it raises become ``{"ok": false}`` replies.
    """
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    _reply({"ready": True, "pid": os.getpid(), "loop": type(loop).__module__})
    while line := await reader.readline():
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        handler = handlers.get(cmd["cmd"])
        if handler is None:
            _reply({"ok": False, "error": f"unknown command {cmd['cmd']!r}"})
            continue
        try:
            result = handler(cmd)
            _reply(await result if asyncio.iscoroutine(result) else result)
        except errors as exc:
            _reply({"ok": False, "error": f"{type(exc).__name__}: {exc}"})


def _reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def raise_nofile() -> None:
    """Raise the open-files soft limit to the hard limit (10,000 clients need 10,000 sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run_process(serve_forever: Callable[[], Coroutine[Any, Any, None]]) -> int:
    """The main of a client process: open-files limit raised, ``serve_forever()`` on uvloop if installed."""
    raise_nofile()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve_forever())
    else:
        uvloop.run(serve_forever())
    return 0


def main() -> int:
    return run_process(serve)


if __name__ == "__main__":
    sys.exit(main())
