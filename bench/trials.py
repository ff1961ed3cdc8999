"""Paced publish trials against connected clients, and the search for the highest sustained rate.

A :class:`Rig` is one server (towerws or the ceiling) with one tag of load-generator
clients subscribed; :meth:`Rig.trial` publishes at a given rate for a few seconds
and measures what the clients got.  A trial *passes* when

* every client received every message of the trial, once, within the drain time,
* the feed achieved at least 97% of the requested rate, and
* the p99 end-to-end latency stayed under the latency limit (the backlog stayed bounded).

:func:`find_max` searches the highest passing rate: a short overload probe
estimates the capacity (what the clients receive per second while the server
is saturated), then trials step up or down from 90% of it and bisect.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import psutil

from bench.payload import DEFAULT_SIZE, messages_per_group
from bench.procs import BenchError, Child, Monitor, Server, broker_process

MIN_ACHIEVED = 0.97


@dataclass
class Trial:
    """One paced publish and what the clients received."""

    rate: float  # requested messages/s (over all groups)
    achieved: float  # messages/s the feed really sent
    expected: int  # frames the clients should get
    frames: int  # frames they got (this trial's and stale ones)
    lost: int
    dups: int
    p50: float  # seconds, end to end (scheduled send time to receipt)
    p99: float
    max: float
    fps: float  # delivered frames/s: frames / (last receipt - first send)
    server_cpu: float  # cores, over the trial and its drain
    loadgen_cpu: float
    feed_cpu: float  # the publisher process (for the ceiling: the server itself)
    broker_cpu: float | None
    peak_rss_mib: float  # the server's peak RSS during the trial
    passed: bool
    why: str

    def brief(self) -> str:
        verdict = "pass" if self.passed else f"FAIL ({self.why})"
        return (
            f"rate {self.rate:8.1f}/s  fps {self.fps:9.0f}  p99 {self.p99 * 1e3:7.1f} ms  lost {self.lost:6d}  "
            f"cpu server {self.server_cpu:.2f} loadgen {self.loadgen_cpu:.2f} feed {self.feed_cpu:.2f}  {verdict}"
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Rig:
    """A server, its feed and one tag of subscribed load-generator clients."""

    def __init__(self, server: Server, lg: Child, tag: str, groups: list[str], clients: int,
                 latency_limit: float, drain: float, size: int = DEFAULT_SIZE, verbose: bool = True):
        self.server = server
        self.lg = lg
        self.tag = tag
        self.groups = groups
        self.clients = clients
        #: frames one message makes: every subscriber of its group
        self.fanout = max(1, clients // len(groups))
        self.latency_limit = latency_limit
        self.drain = drain
        self.size = size
        self.verbose = verbose
        self.seq = 0
        self.monitor = Monitor(server.pid)
        self.broker = broker_process() if server.name == "towerws" else None

    def _broker_cpu(self) -> float | None:
        if self.broker is None:
            return None
        try:
            t = self.broker.cpu_times()
        except psutil.Error:
            return None
        return t.user + t.system

    def trial(self, rate: float, duration: float) -> Trial:
        per_group = messages_per_group(rate, duration, len(self.groups))
        start, end = self.seq, self.seq + per_group
        self.lg.call({"cmd": "expect", "tags": [self.tag], "start": start, "end": end})
        self.monitor.reset_peak()
        self.monitor.mark()
        b0, t0 = self._broker_cpu(), time.monotonic()
        reply = self.server.feed.call(
            {"cmd": "publish", "duration": duration,
             "streams": [{"groups": self.groups, "rate": rate, "size": self.size}]},
            timeout=duration * 5 + 30,
        )
        stream = reply["streams"][0]
        if (stream["seq_start"], stream["seq_end"]) != (start, end):
            raise BenchError(f"feed published seq {stream['seq_start']}..{stream['seq_end']}, expected {start}..{end}")
        self.seq = end
        stats = self.lg.call({"cmd": "stats", "tags": [self.tag], "wait": self.drain}, timeout=self.drain + 30)
        server_cpu = self.monitor.cpu()
        peak = self.monitor.hwm()
        b1, t1 = self._broker_cpu(), time.monotonic()
        row = stats[self.tag]
        span = row["last_rx"] - reply["start"]
        fps = row["frames"] / span if row["frames"] and span > 0 else 0.0
        why = []
        if row["lost"]:
            why.append(f"{row['lost']} lost")
        if row["open"] < row["clients"]:
            why.append(f"{row['clients'] - row['open']} clients gone")
        if stream["rate"] < MIN_ACHIEVED * rate:
            why.append(f"feed reached only {stream['rate']:.0f}/s")
        if row["p99"] > self.latency_limit:
            why.append(f"p99 {row['p99'] * 1e3:.0f} ms over {self.latency_limit * 1e3:.0f} ms")
        result = Trial(
            rate=rate, achieved=stream["rate"], expected=row["expected"], frames=row["frames"],
            lost=row["lost"], dups=row["dups"], p50=row["p50"], p99=row["p99"], max=row["max"], fps=fps,
            server_cpu=server_cpu, loadgen_cpu=stats["loadgen_cpu"], feed_cpu=reply["cpu"],
            broker_cpu=(b1 - b0) / (t1 - t0) if b0 is not None and b1 is not None else None,
            peak_rss_mib=peak / (1 << 20),
            passed=not why, why=", ".join(why),
        )
        if self.verbose:
            print(f"    {result.brief()}", flush=True)
        if not result.passed:
            self.settle()
        return result

    def settle(self, quiet: float = 0.5, timeout: float = 30.0) -> None:
        """After an overloaded trial: wait until the backlog has drained (no frame for ``quiet`` s)."""
        deadline = time.monotonic() + timeout
        last = -1
        while time.monotonic() < deadline:
            frames = self.lg.call({"cmd": "stats", "tags": [self.tag]})[self.tag]["frames"]
            if frames == last:
                return
            last = frames
            time.sleep(quiet)


def find_max(rig: Rig, duration: float, probe_rate: float, guess: float | None = None,
             refine: int = 2) -> tuple[Trial | None, list[Trial]]:
    """The passing trial with the highest rate found, and every trial run.

    Without ``guess``, a one-second probe at ``probe_rate`` (meant to overload;
    doubled while it still passes) measures what the clients receive while the
    server is saturated; the search starts at 60% of that (throughput under
    overload, with many messages per write, is well above the rate the server
    sustains at bounded latency) and steps by 1.2x / 0.8x.  With ``guess`` (an earlier run's result) it starts
    there and steps by 1.1x / 0.9x.  Then ``refine`` bisection steps.
    """
    trials: list[Trial] = []

    def run(rate: float, seconds: float = duration) -> Trial:
        t = rig.trial(rate, seconds)
        trials.append(t)
        return t

    best: Trial | None = None
    if guess is None:
        probe = run(probe_rate, 1.0)
        for _ in range(3):
            if not probe.passed:
                break
            best = probe  # sustained even at the probe rate: probe higher
            probe = run(probe.rate * 2, 1.0)
        if probe.passed:
            return probe, trials
        guess = max(0.6 * probe.fps / rig.fanout, best.rate if best else 0.0)
        up, down, steps = 1.2, 0.8, 5
    else:
        up, down, steps = 1.1, 0.9, 3
    fail: float | None = None
    t = run(guess)
    if t.passed:
        best = t
        for _ in range(steps):
            t = run(best.rate * up)
            if not t.passed:
                fail = t.rate
                break
            best = t
    else:
        fail = guess
        for _ in range(steps + 2):
            t = run(fail * down)
            if t.passed:
                best = t
                break
            fail = t.rate
    if best is not None and fail is not None:
        for _ in range(refine):
            t = run(math.sqrt(best.rate * fail))
            if t.passed:
                best = t
            else:
                fail = t.rate
    return best, trials
