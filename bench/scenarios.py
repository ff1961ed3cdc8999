"""The six scenarios of issue 7.  Each returns a JSON-able dict: parameters, every run, medians.

* ``fanout``      C clients on one group; highest rate with zero loss; latency at half of it.
* ``ceiling``     the same against :mod:`bench.ceiling` (no broker, no Autobahn).
* ``many-groups`` C clients each on its own ``job_events-N``; round-robin publishing.
* ``idle``        C idle subscribed connections: server RSS per connection.
* ``connect``     handshakes + subscribe replies per second.
* ``slow-client`` k clients that stop reading among normal clients under load.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from bench.payload import messages_per_group
from bench.procs import BenchError, CeilingServer, Child, Monitor, Server, TowerwsServer, loadgen, shown, towerws_options
from bench.trials import Rig, Trial, find_max

MiB = 1 << 20
KiB = 1 << 10


@dataclass
class Config:
    """Sizes and timings of one benchmark run (``--quick`` shrinks them)."""

    amqp_url: str
    logdir: Path
    quick: bool = False
    runs: int = 3
    trial_duration: float = 2.0
    drain: float = 8.0
    latency_limit: float = 0.25
    fanout_sizes: list[int] = field(default_factory=lambda: [100, 1000, 5000])
    many_groups_sizes: list[int] = field(default_factory=lambda: [100, 1000, 5000])
    idle_size: int = 10_000
    connect_size: int = 5000
    connect_concurrency: int = 256
    slow_normal: int = 1000
    slow_stalled: int = 10
    slow_rate: float = 20.0
    slow_flood_rate: float = 24.0
    slow_flood_size: int = 64 * KiB
    slow_duration: float = 12.0
    profile: bool = False
    profile_seconds: float = 10.0
    verbose: bool = True
    # rebind and storm (bench/rebind.py)
    rebind_groups: int = 10_000
    rebind_groups_per_client: int = 1000
    rebind_timeout: float = 120.0
    storm_clients: int = 2000
    storm_concurrency: int = 64
    #: the commit the storm compares against: the last before pipelined binding (None: skip)
    storm_baseline: str | None = "39d096b"

    @classmethod
    def make(cls, amqp_url: str, logdir: Path, quick: bool) -> Config:
        if not quick:
            return cls(amqp_url, logdir)
        return cls(
            amqp_url, logdir, quick=True, runs=1, trial_duration=2.0, drain=6.0,
            fanout_sizes=[100, 1000], many_groups_sizes=[1000], idle_size=2000, connect_size=1000,
            slow_normal=200, slow_duration=8.0, rebind_groups=2000, storm_clients=500,
        )


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Field-by-field median of the numeric fields of ``runs`` (booleans: all true)."""
    out: dict[str, Any] = {}
    for key in runs[0]:
        values: list[Any] = [r.get(key) for r in runs]
        if all(isinstance(v, bool) for v in values):
            out[key] = all(values)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = statistics.median(values)
        elif all(isinstance(v, dict) for v in values):
            out[key] = median_of(values)
    return out


S = TypeVar("S", bound=Server)


@contextmanager
def started(make: Callable[[], S]) -> Iterator[S]:
    server = make()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def load_generator(cfg: Config, label: str) -> Iterator[Child]:
    lg = loadgen(cfg.logdir / f"{label}-loadgen.log")
    try:
        yield lg
    finally:
        lg.stop()


def _say(cfg: Config, text: str) -> None:
    if cfg.verbose:
        print(text, flush=True)


def _connect(lg: Child, server: Server, tag: str, n: int, timeout: float = 120.0, **kw: Any) -> dict[str, Any]:
    cmd = {"cmd": "connect", "tag": tag, "n": n, "url": server.url, "concurrency": 256, "timeout": 30, **kw}
    reply = lg.call(cmd, timeout=timeout)
    if reply["subscribed"] != n:
        raise BenchError(f"only {reply['subscribed']} of {n} clients subscribed: {reply['failures']}")
    return reply


# -- fanout, ceiling, many-groups ---------------------------------------------------


def _rate_search(cfg: Config, server_kind: str, sizes: list[int], own_groups: bool) -> dict[str, Any]:
    """The shared body of fanout, ceiling and many-groups: per size, ``runs`` searches and a half-rate trial."""
    results: dict[str, Any] = {}
    for c in sizes:
        label = f"{server_kind}-{'many' if own_groups else 'fanout'}-{c}"
        _say(cfg, f"  C={c}")

        def make(label: str = label) -> Server:
            if server_kind == "ceiling":
                return CeilingServer(cfg.logdir, label)
            return TowerwsServer(cfg.amqp_url, cfg.logdir, label)

        with started(make) as server, load_generator(cfg, label) as lg:
            if own_groups:
                groups = [f"job_events-{i}" for i in range(1, c + 1)]
                _connect(lg, server, "load", c, own_key="job_events", own_base=1)
                probe = 40_000.0  # round-robin: one frame per message
            else:
                groups = ["job_events-1"]
                _connect(lg, server, "load", c, groups={"job_events": [1]})
                probe = 600_000.0 / c  # frames/s beyond what one CPython process delivers
            rig = Rig(server, lg, "load", groups, c, cfg.latency_limit, cfg.drain, verbose=cfg.verbose)
            runs = []
            guess = None
            for i in range(cfg.runs):
                _say(cfg, f"   run {i + 1}/{cfg.runs}")
                refine = 1 if cfg.quick or guess is not None else 2
                best, trials = find_max(rig, cfg.trial_duration, probe, guess, refine)
                if best is None:
                    runs.append({"max_rate": 0.0, "max_fps": 0.0, "found": False,
                                 "trials": [t.as_dict() for t in trials]})
                    continue
                guess = best.rate
                half = rig.trial(best.rate / 2, cfg.trial_duration)
                runs.append({
                    "found": True,
                    "max_rate": best.rate,
                    "max_fps": best.fps,
                    "server_cpu": best.server_cpu,
                    "loadgen_cpu": best.loadgen_cpu,
                    "feed_cpu": best.feed_cpu,
                    "broker_cpu": best.broker_cpu if best.broker_cpu is not None else 0.0,
                    "peak_rss_mib": best.peak_rss_mib,
                    "half": _half(half),
                    "trials": [t.as_dict() for t in trials],
                })
                if cfg.profile and server_kind == "towerws" and c == 1000 and i == 0:
                    results["profile"] = profile(cfg, rig, best.rate, label)
        found = [r for r in runs if r["found"]]
        results[str(c)] = {"runs": runs, "median": median_of(found) if found else {}}
    return results


def _half(t: Trial) -> dict[str, Any]:
    return {"rate": t.rate, "fps": t.fps, "p50_ms": t.p50 * 1e3, "p99_ms": t.p99 * 1e3, "max_ms": t.max * 1e3,
            "lost": t.lost, "dups": t.dups, "server_cpu": t.server_cpu, "loadgen_cpu": t.loadgen_cpu,
            "passed": t.passed}


def fanout(cfg: Config) -> dict[str, Any]:
    return {"params": {"sizes": cfg.fanout_sizes, "groups": 1}, **_rate_search(cfg, "towerws", cfg.fanout_sizes, False)}


def ceiling(cfg: Config) -> dict[str, Any]:
    return {"params": {"sizes": cfg.fanout_sizes, "groups": 1}, **_rate_search(cfg, "ceiling", cfg.fanout_sizes, False)}


def many_groups(cfg: Config) -> dict[str, Any]:
    return {"params": {"sizes": cfg.many_groups_sizes, "groups": "one per client"},
            **_rate_search(cfg, "towerws", cfg.many_groups_sizes, True)}


# -- idle, connect -------------------------------------------------------------------


def idle(cfg: Config) -> dict[str, Any]:
    """RSS per connection: a fresh server per run, RSS before and after C subscribed clients."""
    c = cfg.idle_size
    runs = []
    for i in range(cfg.runs):
        label = f"idle-{c}-{i + 1}"
        with started(partial(TowerwsServer, cfg.amqp_url, cfg.logdir, label)) as server, \
                load_generator(cfg, label) as lg:
            mon = Monitor(server.pid)
            time.sleep(1.0)
            before = mon.rss()
            reply = _connect(lg, server, "idle", c, timeout=300, groups={"jobs": ["status_changed"]})
            server.wait_connections(c)
            time.sleep(2.0)
            after = mon.rss()
            runs.append({
                "connections": c,
                "rss_before_mib": before / MiB,
                "rss_after_mib": after / MiB,
                "peak_rss_mib": mon.hwm() / MiB,
                "kib_per_connection": (after - before) / c / KiB,
                "connect_rate": reply["rate"],
            })
            _say(cfg, f"   run {i + 1}: {runs[-1]['kib_per_connection']:.1f} KiB per connection "
                      f"({before / MiB:.0f} -> {after / MiB:.0f} MiB)")
    return {"params": {"connections": c, "groups": "jobs-status_changed"}, "runs": runs, "median": median_of(runs)}


def connect(cfg: Config) -> dict[str, Any]:
    """Handshake + accept + groups message + groups reply, ``connect_size`` clients, 256 in flight."""
    n = cfg.connect_size
    runs = []
    with started(partial(TowerwsServer, cfg.amqp_url, cfg.logdir, "connect")) as server, \
            load_generator(cfg, "connect") as lg:
        mon = Monitor(server.pid)
        for i in range(cfg.runs):
            mon.mark()
            reply = lg.call({"cmd": "connect", "tag": f"c{i}", "n": n, "url": server.url,
                             "concurrency": cfg.connect_concurrency, "timeout": 30,
                             "groups": {"jobs": ["status_changed"]}}, timeout=300)
            cpu = mon.cpu()
            runs.append({"clients": n, "subscribed": reply["subscribed"], "failed": reply["failed"],
                         "elapsed_s": reply["elapsed"], "rate": reply["rate"], "server_cpu": cpu,
                         "loadgen_cpu": reply["loadgen_cpu"]})
            _say(cfg, f"   run {i + 1}: {reply['rate']:.0f} handshakes+subscriptions/s "
                      f"(server cpu {cpu:.2f}, loadgen cpu {reply['loadgen_cpu']:.2f}, {reply['failed']} failed)")
            lg.call({"cmd": "close", "tags": [f"c{i}"]}, timeout=60)
            server.wait_connections(0, timeout=60)
    return {"params": {"clients": n, "concurrency": cfg.connect_concurrency, "auth": "static token",
                       "groups": "jobs-status_changed"}, "runs": runs, "median": median_of(runs)}


# -- slow-client -----------------------------------------------------------------------


def slow_client(cfg: Config) -> dict[str, Any]:
    """Normal clients under load with k extra clients that read (baseline), then stop reading (stall)."""
    flow_option = "--max-pending-bytes" in towerws_options()
    extra = ["--max-pending-bytes", str(4 * MiB)] if flow_option else []
    runs = []
    for i in range(cfg.runs):
        label = f"slow-{i + 1}"
        with started(partial(TowerwsServer, cfg.amqp_url, cfg.logdir, label, extra)) as server, \
                load_generator(cfg, label) as lg:
            runs.append(_slow_run(cfg, server, lg))
            r = runs[-1]
            _say(cfg, f"   run {i + 1}: p99 {r['baseline']['p99_ms']:.1f} -> {r['stalled']['p99_ms']:.1f} ms, "
                      f"lost {r['stalled']['lost']}, RSS +{r['rss_growth_mib']:.0f} MiB, "
                      f"{r['stalled_disconnected']}/{cfg.slow_stalled} stalled clients disconnected")
    return {
        "params": {"normal": cfg.slow_normal, "stalled": cfg.slow_stalled, "rate": cfg.slow_rate,
                   "flood_rate_per_stalled_client": cfg.slow_flood_rate, "flood_size": cfg.slow_flood_size,
                   "duration": cfg.slow_duration, "max_pending_bytes": 4 * MiB if flow_option else None},
        "runs": runs,
        "median": median_of([{k: v for k, v in r.items() if k != "rss_series"} for r in runs]),
    }


def _slow_run(cfg: Config, server: TowerwsServer, lg: Child) -> dict[str, Any]:
    _connect(lg, server, "normal", cfg.slow_normal, groups={"job_events": [1]})
    # Each stalled client also watches its own busy job (job_events-1001, ...): a flood of
    # large messages (1.5 MiB/s each by default: more than the 90 MiB growth target over the
    # phase unless the server bounds what it buffers) that fills its buffers in seconds,
    # separately from the others' (a message shared by several stalled clients would be
    # buffered once, its bytes shared).
    # A small receive buffer keeps the client's kernel from hiding the stall.
    _connect(lg, server, "slow", cfg.slow_stalled, groups={"job_events": [1]}, own_key="job_events",
             own_base=1001, track=False, rcvbuf=4096)
    floods = [f"job_events-{1001 + k}" for k in range(cfg.slow_stalled)]
    streams = [{"groups": ["job_events-1"], "rate": cfg.slow_rate},
               {"groups": floods, "rate": cfg.slow_flood_rate * len(floods), "size": cfg.slow_flood_size}]
    per = messages_per_group(cfg.slow_rate, cfg.slow_duration, 1)
    seq = 0
    mon = Monitor(server.pid)

    def phase(stall: bool) -> dict[str, Any]:
        nonlocal seq
        lg.call({"cmd": "expect", "tags": ["normal"], "start": seq, "end": seq + per})
        closed_at: dict[int, float] = {}
        if stall:
            lg.call({"cmd": "stall", "tag": "slow"})
        rss0 = mon.rss()
        mon.reset_peak()
        mon.mark()
        mon.start_sampling()
        t0 = time.monotonic()
        server.feed.send({"cmd": "publish", "duration": cfg.slow_duration, "streams": streams})
        deadline = t0 + cfg.slow_duration * 5 + 30
        while not server.feed.ready():
            if time.monotonic() > deadline:
                raise BenchError("publisher did not finish the slow-client phase")
            if stall:
                states = lg.call({"cmd": "probe", "tag": "slow"})["states"]
                for k, state in enumerate(states):
                    if state != "established" and k not in closed_at:
                        closed_at[k] = time.monotonic() - t0
            time.sleep(0.5)
        reply = server.feed.read(5)
        if reply.get("ok") is False:
            raise BenchError(f"publisher: {reply.get('error')}")
        seq += per
        stats = lg.call({"cmd": "stats", "tags": ["normal"], "wait": cfg.drain}, timeout=cfg.drain + 30)
        cpu = mon.cpu()
        if stall:
            # Give the server a last chance to close those it has not closed yet.
            time.sleep(1.0)
            states = lg.call({"cmd": "probe", "tag": "slow"})["states"]
            for k, state in enumerate(states):
                if state != "established" and k not in closed_at:
                    closed_at[k] = time.monotonic() - t0
        samples = mon.stop_sampling()
        peak = max([mon.hwm()] + [rss for _, rss in samples])
        row = stats["normal"]
        return {
            "p50_ms": row["p50"] * 1e3, "p99_ms": row["p99"] * 1e3, "max_ms": row["max"] * 1e3,
            "lost": row["lost"], "dups": row["dups"], "server_cpu": cpu, "loadgen_cpu": stats["loadgen_cpu"],
            "rss_start_mib": rss0 / MiB, "rss_peak_mib": peak / MiB, "rss_growth_mib": (peak - rss0) / MiB,
            "rss_series": [(t, round(rss / MiB, 1)) for t, rss in samples[:: max(1, len(samples) // 40)]],
            "closed_at": closed_at,
        }

    baseline = phase(stall=False)
    stalled = phase(stall=True)
    resumed = lg.call({"cmd": "resume", "tag": "slow", "timeout": 3}, timeout=30)
    closed_at = stalled.pop("closed_at")
    baseline.pop("closed_at")
    codes = resumed["close_codes"]
    return {
        "baseline": {k: v for k, v in baseline.items() if k != "rss_series"},
        "stalled": {k: v for k, v in stalled.items() if k != "rss_series"},
        "p99_ratio": stalled["p99_ms"] / baseline["p99_ms"] if baseline["p99_ms"] else float("inf"),
        "rss_growth_mib": stalled["rss_growth_mib"],
        "rss_series": stalled["rss_series"],
        "stalled_disconnected": len(closed_at),
        "disconnect_after_s": sorted(round(v, 1) for v in closed_at.values()),
        "close_codes": codes,
    }


# -- profile ---------------------------------------------------------------------------


def profile(cfg: Config, rig: Rig, rate: float, label: str) -> dict[str, Any]:
    """py-spy on the server during a trial at ``rate``: the hottest functions."""
    out = cfg.logdir / f"profile-{label}.txt"
    py_spy = str(Path(sys.executable).parent / "py-spy")
    cmd = [py_spy, "record", "--pid", str(rig.server.pid), "--duration", str(int(cfg.profile_seconds)),
           "--rate", "250", "--format", "raw", "--nolineno", "--nonblocking", "--output", str(out)]
    _say(cfg, f"   profiling: {shown(cmd)}")
    spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        trial = rig.trial(rate, cfg.profile_seconds)
        _, err = spy.communicate(timeout=cfg.profile_seconds + 60)
    except BaseException:
        spy.kill()
        raise
    if spy.returncode != 0:
        return {"error": f"py-spy failed ({spy.returncode}): {err.strip()[-300:]}", "command": shown(cmd)}
    return {"command": shown(cmd), "file": shown([str(out)]), "trial": trial.brief(), **top_stacks(out)}


def top_stacks(path: Path, n: int = 15) -> dict[str, Any]:
    """Shares of py-spy's busy samples (raw, collapsed stacks): by function and by file, self and inclusive.

    Frames on (nearly) every stack -- twistd, the reactor loop -- are left out of the
    inclusive list: they say nothing about where the time goes.
    """
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    files: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        total += k
        frames = stack.split(";")
        leaf = frames[-1]
        own[leaf] = own.get(leaf, 0) + k
        where = leaf.rpartition("(")[2].rstrip(")")
        files[where] = files.get(where, 0) + k
        for f in set(frames):
            incl[f] = incl.get(f, 0) + k
    if not total:
        return {"samples": 0}

    def top(d: dict[str, int], below: float = 1.0) -> list[tuple[str, float]]:
        ranked = sorted(((f, v / total) for f, v in d.items() if v / total < below), key=lambda fv: -fv[1])
        return [(f, round(100 * share, 1)) for f, share in ranked[:n]]

    return {"samples": total, "self": top(own), "self_by_file": top(files), "inclusive": top(incl, below=0.9)}


SCENARIOS: dict[str, Callable[[Config], dict[str, Any]]] = {
    "ceiling": ceiling,
    "fanout": fanout,
    "many-groups": many_groups,
    "idle": idle,
    "connect": connect,
    "slow-client": slow_client,
}
