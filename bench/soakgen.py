"""The soak's churn and feed: clients that come and go, and the messages they get, in one asyncio process.

Driven by JSON lines on stdin like :mod:`bench.loadgen` (one JSON reply per line).
Clients speak the towerws wire protocol (wait for ``accept``, send a groups
message, wait for ``groups_current``) with picows on uvloop.

**Churn.** New clients arrive at a steady ``connect_rate`` (one every
``1/connect_rate`` s, not in bursts), each lives a random time (uniform over
``lifetime``) and leaves: most close cleanly (close frame), ``abort`` of them
reset the connection (TCP RST, like a browser tab killed).  So the population
settles at about ``connect_rate x mean lifetime`` (Little's law).  Each client
subscribes to a random mix of

* ``jobs-status_changed`` (shared by most clients, as every AWX page is),
* one of ``job_events-1`` .. ``job_events-K`` (shared jobs, watched by many), and
* its own ``job_events-<unique id>`` (a job nobody else watches), so the server
  binds and unbinds a routing key for nearly every client that comes and goes;

and ``resubscribe`` of them send a second groups message half-way through their
life, swapping their own job for a new one (an AWX page switching jobs).

**Feed.** The same process publishes over one raw AMQP connection
(:class:`bench.publisher.RawPublisher`, no confirms) at steady rates: to the
status group, to every shared job, and to every *live* own job (from the moment
its client's subscription was answered, which towerws sends only once the binding
is in place, until the client leaves).  Each body is ``{"g": GROUP, "seq": N,
"t": SCHEDULED_SEND_US, "pad": ...}``; ``seq`` counts per group from 0.

**What the clients see.**  Per client and group, sequence numbers must follow on
without gaps (``lost``) or repeats (``dups``): for an own job from 0, for a shared
group from the first message received.  A frame of a group the client has just
left is ``stale`` (in flight when it changed groups), not an error.  Latency is
receipt time minus the scheduled send time (one clock), in 0.1 ms bins per
sampling interval.

Commands:

``start``  ``{"url", "amqp_url", "exchange", "connect_rate", "lifetime": [lo, hi], "shared_jobs": K,
           "mix": {"status": p, "shared": p, "own": p}, "status_rate", "shared_rate", "own_rate",
           "resubscribe": p, "abort": p, "size": bytes, "seed": n, "timeout": s, "max_connecting": n}``
    Connect the feed, start arrivals and publishing; answers at once.
``stats``  Cumulative counters, the live population, and this interval's latency percentiles.
``stop``   ``{"timeout": s}``: no more arrivals, every live client leaves cleanly, publishing stops.
``quit``
"""

from __future__ import annotations

import asyncio
import json
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from bench.loadgen import BIN_US, NBINS, command_loop, percentile, run_process
from bench.publisher import AMQPError, RawPublisher, scan_for_close

STATUS_GROUP = "jobs-status_changed"
MARKER = b'{"g":'
#: own job ids start here (shared jobs are 1..K), unique within a run: the exchange is the run's own
OWN_BASE = 1_000_000
#: the feed stops writing while this much is queued for the broker (it is flow-controlling us)
FEED_BACKLOG_LIMIT = 8 << 20
FEED_TICK = 0.02


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


@dataclass
class Counters:
    """What every client saw, summed; latency over the current sampling interval only."""

    frames: int = 0
    lost: int = 0
    dups: int = 0
    stale: int = 0
    hist: list[int] = field(default_factory=lambda: [0] * NBINS)
    max_latency_us: int = 0

    def interval(self) -> dict[str, float]:
        """p50, p99 and max latency (seconds) since the last call, then start a new interval."""
        total = sum(self.hist)
        out = {"p50": percentile(self.hist, total, 0.5), "p99": percentile(self.hist, total, 0.99),
               "max": self.max_latency_us / 1e6, "latency_samples": total}
        self.hist = [0] * NBINS
        self.max_latency_us = 0
        return out


class Client(WSListener):
    """One websocket client: checks the sequence numbers of each group it is in."""

    def __init__(self, counters: Counters, groups: dict[str, list[Any]]):
        self.counters = counters
        self.transport: WSTransport | None = None
        #: group -> next expected seq (None: a shared group, from its first message on)
        self.expect: dict[str, int | None] = {}
        #: the first groups message, sent on ``accept`` (which may come before ws_connect returns)
        self.pending = json.dumps({"groups": groups}).encode()
        self.reply: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.refusal: str | None = None
        self.close_code: int | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def subscribe(self, groups: dict[str, list[Any]]) -> None:
        """Send a groups message; :attr:`reply` resolves on the answer."""
        if self.reply.done():
            self.reply = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        self.transport.send(WSMsgType.TEXT, json.dumps({"groups": groups}).encode())

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        body = frame.get_payload_as_bytes()
        if body.startswith(MARKER):
            self._delivery(body)
            return
        if frame.msg_type == WSMsgType.TEXT:
            msg = json.loads(body)
            if msg.get("accept") is True:
                transport.send(WSMsgType.TEXT, self.pending)
            elif "groups_current" in msg:
                if not self.reply.done():
                    self.reply.set_result(None)
            elif "error" in msg or msg.get("accept") is False:
                self.refusal = str(msg.get("error"))
        elif frame.msg_type == WSMsgType.CLOSE:
            self.close_code = int.from_bytes(body[:2], "big") if len(body) >= 2 else 1005
            transport.send_close()
            transport.disconnect()

    def _delivery(self, body: bytes) -> None:
        c = self.counters
        msg = json.loads(body)
        group, seq = msg["g"], msg["seq"]
        latency = time.time_ns() // 1000 - msg["t"]
        c.frames += 1
        c.max_latency_us = max(c.max_latency_us, latency)
        c.hist[min(NBINS - 1, max(0, latency // BIN_US))] += 1
        if group not in self.expect:
            c.stale += 1  # a group this client has just left: in flight when it changed
            return
        expected = self.expect[group]
        if expected is None or seq == expected:
            self.expect[group] = seq + 1
        elif seq > expected:
            c.lost += seq - expected
            self.expect[group] = seq + 1
        else:
            c.dups += 1

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        reason = self.refusal or f"closed before the subscription was answered ({self.close_code})"
        if not self.reply.done():
            self.reply.set_exception(ConnectionError(reason))
        if not self.gone.done():
            self.gone.set_result(None)


class BrokerWatch(asyncio.Protocol):
    """The feed's AMQP socket once set up: notices the broker closing the channel or connection."""

    def __init__(self) -> None:
        self.buf = b""
        self.error: str | None = None

    def data_received(self, data: bytes) -> None:
        self.buf, reason = scan_for_close(self.buf + data)
        if reason is not None:
            self.error = reason

    def connection_lost(self, exc: Exception | None) -> None:
        self.error = self.error or f"the broker connection was lost ({exc!r})"


class Feed:
    """Steady publishing: fixed groups from the start, own jobs while their client lives.

    The broker is shared, and other engineers' tests restart it (``rabbitmqctl
    stop_app``/``start_app``): when the connection or channel goes, the feed
    reconnects every second (for up to ``MAX_OUTAGE`` s) and skips what fell due
    meanwhile (clients see those as gaps; the runner excuses losses around an outage).
    """

    #: the broker gone longer than this ends the soak
    MAX_OUTAGE = 180.0

    def __init__(self, amqp_url: str, exchange: str, size: int):
        self.amqp_url, self.exchange, self.size = amqp_url, exchange, size
        self.pub: RawPublisher | None = None
        self.transport: asyncio.Transport | None = None
        self.watch: BrokerWatch | None = None
        #: group -> [rate, start time (wall, s), messages sent or skipped]
        self.groups: dict[str, list[float]] = {}
        self.published = 0
        self.stalled_ticks = 0
        self.outages = 0
        self.skipped = 0  # messages that fell due while the broker was gone
        self.down_since: float | None = None
        self.up_since = 0.0
        self.last_error: str | None = None
        self.fatal: str | None = None
        self.running = True

    async def connect(self) -> None:
        """One connection with one channel (the handshake blocks briefly: the broker is local)."""
        pub = RawPublisher(self.amqp_url, self.exchange, timeout=5.0)
        pub.sock.setblocking(False)
        transport, watch = await asyncio.get_running_loop().create_connection(BrokerWatch, sock=pub.sock)
        assert isinstance(watch, BrokerWatch)
        self.pub, self.transport, self.watch = pub, transport, watch

    @property
    def up(self) -> bool:
        return self.watch is not None and self.watch.error is None

    def add(self, group: str, rate: float) -> None:
        self.groups[group] = [rate, time.time(), 0]

    def remove(self, group: str) -> None:
        self.groups.pop(group, None)

    async def run(self) -> None:
        """Every tick, send each group's messages that have fallen due (scheduled time in the body)."""
        while self.running:
            if not self.up and not await self._reconnect():
                continue
            assert self.transport is not None
            if self.transport.get_write_buffer_size() > FEED_BACKLOG_LIMIT:
                self.stalled_ticks += 1
            else:
                chunks = self._due()
                if chunks:
                    self.transport.write(b"".join(chunks))
                    self.published += len(chunks)
            await asyncio.sleep(FEED_TICK)

    def _due(self, skip: bool = False) -> list[bytes]:
        assert self.pub is not None
        now = time.time()
        chunks = []
        for group, state in self.groups.items():
            rate, start, sent = state
            due = int((now - start) * rate) + 1
            if skip:
                self.skipped += max(0, due - int(sent))
            else:
                for seq in range(int(sent), due):
                    chunks.append(self.pub.publish_frames(group, self._body(group, seq, int((start + seq / rate) * 1e6))))
            state[2] = max(sent, due)
        return chunks

    async def _reconnect(self) -> bool:
        """One attempt after a lost connection; False (after a 1 s pause) while the broker is not back."""
        now = time.monotonic()
        if self.down_since is None:
            self.down_since = now
            # Back for a few seconds only (e.g. the exchange not declared again yet): the same outage.
            if now - self.up_since > 10.0:
                self.outages += 1
            self.last_error = self.watch.error if self.watch else None
            if self.transport is not None:
                self.transport.abort()
        try:
            await self.connect()
        except (AMQPError, OSError) as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            if now - self.down_since > self.MAX_OUTAGE:
                self.fatal = f"no broker for {self.MAX_OUTAGE:.0f} s: {self.last_error}"
                self.running = False
            await asyncio.sleep(1.0)
            return False
        self.down_since = None
        self.up_since = time.monotonic()
        self._due(skip=True)
        return True

    def _body(self, group: str, seq: int, sent_us: int) -> bytes:
        head = b'{"g":"%s","seq":%d,"t":%d,"pad":"' % (group.encode(), seq, sent_us)
        return head + b"x" * max(0, self.size - len(head) - 2) + b'"}'

    def close(self) -> None:
        self.running = False
        if self.transport is not None:
            self.transport.close()


class Soak:
    """The churn: arrivals, client lives, and the counters the runner samples."""

    def __init__(self, cmd: dict[str, Any], feed: Feed):
        self.cfg = cmd
        self.feed = feed
        self.rng = random.Random(int(cmd.get("seed", 1)))
        self.counters = Counters()
        self.live: set[Client] = set()
        self.groups_of: dict[Client, set[str]] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = asyncio.Event()
        self.next_own = OWN_BASE
        self.connecting = 0
        self.n: dict[str, int] = {k: 0 for k in ("arrivals", "subscribed", "failed", "skipped", "left_clean",
                                                 "left_abort", "server_closed", "resubscribed")}
        self.failures: dict[str, int] = {}
        self.cpu_mark, self.wall_mark = _cpu(), time.monotonic()

    def _own(self) -> int:
        self.next_own += 1
        return self.next_own

    def _pick(self) -> tuple[dict[str, list[Any]], int | None]:
        """A random groups message (at least one group) and the client's own job id, if any."""
        mix = self.cfg["mix"]
        groups: dict[str, list[Any]] = {}
        while not groups:
            if self.rng.random() < mix["status"]:
                groups["jobs"] = ["status_changed"]
            if self.rng.random() < mix["shared"]:
                groups.setdefault("job_events", []).append(self.rng.randint(1, int(self.cfg["shared_jobs"])))
            own = self._own() if self.rng.random() < mix["own"] else None
            if own is not None:
                groups.setdefault("job_events", []).append(own)
        return groups, own

    @staticmethod
    def _names(groups: dict[str, list[Any]]) -> set[str]:
        return {f"{k}-{i}" for k, items in groups.items() for i in items}

    async def arrivals(self) -> None:
        """One new client every ``1/connect_rate`` s on a fixed schedule (so no bursts after a slow turn)."""
        loop = asyncio.get_running_loop()
        period = 1.0 / float(self.cfg["connect_rate"])
        due = loop.time()
        while not self.stopping.is_set():
            self.n["arrivals"] += 1
            if self.connecting >= int(self.cfg.get("max_connecting", 200)):
                self.n["skipped"] += 1  # the server is not keeping up; do not pile on
            else:
                task = asyncio.ensure_future(self.life())
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            due += period
            try:
                await asyncio.wait_for(self.stopping.wait(), max(0.0, due - loop.time()))
            except TimeoutError:
                pass  # the next arrival is due

    async def life(self) -> None:
        """Connect, subscribe, live, maybe switch jobs, leave."""
        lo, hi = self.cfg["lifetime"]
        lifetime = self.rng.uniform(lo, hi)
        switch = self.rng.random() < float(self.cfg["resubscribe"])
        abort = self.rng.random() < float(self.cfg["abort"])
        groups, own = self._pick()
        timeout = float(self.cfg.get("timeout", 10))
        self.connecting += 1
        try:
            client = await self._connect(groups, own, timeout)
        finally:
            self.connecting -= 1
        if client is None:
            return
        try:
            alive = True
            if switch:
                alive = await self._live(client, lifetime / 2)
                if alive and not self.stopping.is_set():
                    groups, own = await self._switch(client, groups, own, timeout)
                lifetime /= 2
            if alive and await self._live(client, lifetime) and client.transport is not None:
                if abort:
                    client.transport.underlying_transport.abort()
                    self.n["left_abort"] += 1
                else:
                    client.transport.send_close(WSCloseCode.OK)
                    self.n["left_clean"] += 1
                    try:
                        await asyncio.wait_for(asyncio.shield(client.gone), timeout)
                    except TimeoutError:
                        client.transport.disconnect(graceful=False)  # the server never closed its side
        finally:
            self.live.discard(client)
            self.groups_of.pop(client, None)
            if own is not None:
                self.feed.remove(f"job_events-{own}")

    async def _connect(self, groups: dict[str, list[Any]], own: int | None, timeout: float) -> Client | None:
        client: Client | None = None
        try:
            _, listener = await asyncio.wait_for(
                ws_connect(lambda: Client(self.counters, groups), self.cfg["url"], websocket_handshake_timeout=timeout),
                timeout)
            assert isinstance(listener, Client)
            client = listener
            await asyncio.wait_for(asyncio.shield(client.reply), timeout)
        except Exception as exc:
            # Refusals, timeouts, resets: counted by kind; the runner fails the soak past a threshold.
            key = f"{type(exc).__name__}: {exc}"[:120]
            self.failures[key] = self.failures.get(key, 0) + 1
            self.n["failed"] += 1
            if client is not None and client.transport is not None:
                client.transport.disconnect(graceful=False)
            return None
        self._track(client, groups, own)
        self.n["subscribed"] += 1
        self.live.add(client)
        return client

    def _track(self, client: Client, groups: dict[str, list[Any]], own: int | None) -> None:
        """The subscription is answered (so bound): expect an own job from 0, shared groups from now on."""
        names = self._names(groups)
        own_group = f"job_events-{own}" if own is not None else None
        client.expect = {g: (0 if g == own_group else client.expect.get(g)) for g in names}
        self.groups_of[client] = names
        if own_group is not None:
            self.feed.add(own_group, float(self.cfg["own_rate"]))

    async def _live(self, client: Client, seconds: float) -> bool:
        """Wait ``seconds``; False if the server closed the client first (counted) or the soak stops."""
        gone: asyncio.Future[Any] = asyncio.ensure_future(asyncio.shield(client.gone))
        stop: asyncio.Future[Any] = asyncio.ensure_future(self.stopping.wait())
        done, pending = await asyncio.wait([gone, stop], timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        for f in pending:
            f.cancel()
        if gone in done:
            self.n["server_closed"] += 1
            return False
        return True  # lived its time, or the soak stops: leave cleanly now

    async def _switch(self, client: Client, groups: dict[str, list[Any]], own: int | None,
                      timeout: float) -> tuple[dict[str, list[Any]], int | None]:
        """Swap the own job for a new one, keeping the shared groups (an AWX page moving to another job)."""
        if own is not None:
            self.feed.remove(f"job_events-{own}")
            client.expect.pop(f"job_events-{own}", None)  # its last messages may still arrive: stale
        new_own = self._own()
        kept = [i for i in groups.get("job_events", []) if i != own]
        new_groups = {**groups, "job_events": kept + [new_own]}
        client.subscribe(new_groups)
        try:
            await asyncio.wait_for(asyncio.shield(client.reply), timeout)
        except (TimeoutError, ConnectionError) as exc:
            key = f"resubscribe {type(exc).__name__}: {exc}"[:120]
            self.failures[key] = self.failures.get(key, 0) + 1
            return groups, None
        self._track(client, new_groups, new_own)
        self.n["resubscribed"] += 1
        return new_groups, new_own

    def stats(self) -> dict[str, Any]:
        c = self.counters
        wall = time.monotonic() - self.wall_mark
        cpu = (_cpu() - self.cpu_mark) / wall if wall > 0 else 0.0
        self.cpu_mark, self.wall_mark = _cpu(), time.monotonic()
        expected_groups = set().union(*self.groups_of.values()) if self.groups_of else set()
        return {
            "ok": True, **self.n, "failures": self.failures,
            "live": len(self.live), "connecting": self.connecting, "groups": len(expected_groups),
            "frames": c.frames, "lost": c.lost, "dups": c.dups, "stale": c.stale,
            "published": self.feed.published, "feed_groups": len(self.feed.groups),
            "feed_backlog": self.feed.transport.get_write_buffer_size() if self.feed.transport else 0,
            "feed_stalled_ticks": self.feed.stalled_ticks, "feed_up": self.feed.up, "feed_outages": self.feed.outages,
            "feed_skipped": self.feed.skipped, "feed_last_error": self.feed.last_error, "feed_error": self.feed.fatal,
            "cpu": cpu, **c.interval(),
        }

    async def stop(self, timeout: float) -> dict[str, Any]:
        """Stop arrivals; every live client leaves cleanly; then the feed stops."""
        self.stopping.set()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=timeout)
        left = len(self.tasks)
        for task in list(self.tasks):
            task.cancel()
        out = self.stats()
        self.feed.close()
        return {**out, "unfinished": left}


class Commands:
    """The command handlers; one soak per process."""

    def __init__(self) -> None:
        self.soak: Soak | None = None
        self.background: list[asyncio.Task[None]] = []

    async def start(self, cmd: dict[str, Any]) -> dict[str, Any]:
        if self.soak is not None:
            return {"ok": False, "error": "already started"}
        feed = Feed(cmd["amqp_url"], cmd["exchange"], int(cmd.get("size", 200)))
        await feed.connect()
        feed.add(STATUS_GROUP, float(cmd["status_rate"]))
        for k in range(1, int(cmd["shared_jobs"]) + 1):
            feed.add(f"job_events-{k}", float(cmd["shared_rate"]))
        self.soak = Soak(cmd, feed)
        self.background = [asyncio.ensure_future(feed.run()), asyncio.ensure_future(self.soak.arrivals())]
        return {"ok": True}

    async def stats(self, cmd: dict[str, Any]) -> dict[str, Any]:
        if self.soak is None:
            return {"ok": False, "error": "not started"}
        return self.soak.stats()

    async def stop(self, cmd: dict[str, Any]) -> dict[str, Any]:
        if self.soak is None:
            return {"ok": False, "error": "not started"}
        reply = await self.soak.stop(float(cmd.get("timeout", 30)))
        await asyncio.wait(self.background, timeout=5)
        return reply


async def serve() -> None:
    """Read commands from stdin until ``quit`` or end of input."""
    commands = Commands()
    await command_loop({"start": commands.start, "stats": commands.stats, "stop": commands.stop},
                       errors=(AMQPError, OSError, ValueError, KeyError))


def main() -> int:
    return run_process(serve)


if __name__ == "__main__":
    sys.exit(main())
