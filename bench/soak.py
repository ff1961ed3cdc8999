"""The soak: ``python -m bench.soak [--minutes N]`` (``make soak SOAK_MINUTES=N``), 30 minutes by default.

One towerws (``twistd --nodaemon towerws``) and the local RabbitMQ under steady
churn (:mod:`bench.soakgen`: clients come and go, subscribe to shared and new
groups, receive a steady feed).  Every ``--interval`` s the runner samples, over
the network and /proc only, the server's RSS and open files, its /metrics gauges
(``towerws_connections``, ``towerws_groups_active``, ``towerws_amqp_bindings``)
and what the clients saw.  At the end every client leaves and the server must
drain: no connection, group or binding left, its open files back to where they were.

The soak FAILS (exit status 1) when a checked series still grows once the churn
is steady (:mod:`bench.growth`: the rule and why), when the server does not drain,
when a client lost or got a message twice, or when more than 1% of connects failed.
The report (markdown + PNG + JSON) goes to ``bench/SOAK.md`` for a run of 30 minutes
or more, else to ``bench/logs/soak-short.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench import report
from bench.growth import Growth, Tolerance, detect, trend_line
from bench.plots import link, pyplot, save
from bench.procs import ROOT, BenchError, Child, TowerwsServer, ensure_broker, rabbitmq_version, raise_nofile
from bench.run import DEFAULT_AMQP, doc_head

MiB = 1 << 20
DEFAULT_MINUTES = 30.0
#: connects that may fail before the soak fails (the population would not be what it claims)
MAX_FAILED_SHARE = 0.01
#: the server's open files may end this many above where they started (a /metrics request still closing)
FDS_SLACK = 3


@dataclass(frozen=True)
class Series:
    """One sampled series: its key in a sample, how it is shown, and its leak tolerance (None: not checked)."""

    key: str
    label: str
    unit: str
    tolerance: Tolerance | None


#: Tolerances: about 3% of the level, at least a few units, at least twice the sample noise.
#: The smallest growth a 30-minute run sees is about the tolerance per 9 minutes (a third of
#: the steady part): RSS ~13 MiB/h, i.e. ~190 bytes kept per connect at 20 connects/s.
SERIES = (
    Series("rss_mib", "server RSS", "MiB", Tolerance(absolute=2.0, relative=0.03)),
    Series("fds", "server open files", "", Tolerance(absolute=5, relative=0.03)),
    Series("connections", "towerws_connections", "", Tolerance(absolute=5, relative=0.03)),
    Series("groups_active", "towerws_groups_active", "", Tolerance(absolute=5, relative=0.03)),
    Series("bindings", "towerws_amqp_bindings", "", Tolerance(absolute=5, relative=0.03)),
    # The server's counts minus what the clients hold: population noise cancels, a leak does not.
    Series("extra_connections", "connections - live clients", "", Tolerance(absolute=5, relative=0.0)),
    Series("extra_bindings", "bindings - groups in use", "", Tolerance(absolute=10, relative=0.0)),
    Series("delivered_per_s", "frames delivered", "/s", Tolerance(absolute=50, relative=0.10)),
    # Loss is judged by a stricter rule than growth: none at all outside broker restarts.
    Series("lost", "messages lost per interval", "", None),
    Series("clients", "live clients", "", None),
    Series("groups_in_use", "groups in use by live clients", "", None),
    Series("server_cpu", "server CPU", "cores", None),
    Series("loadgen_cpu", "churn + feed CPU", "cores", None),
    Series("p99_ms", "p99 latency", "ms", None),
)
BY_KEY = {s.key: s for s in SERIES}


@dataclass
class SoakConfig:
    """The load of one soak (defaults: about 500 clients, 20 connects/s; see bench/README.md)."""

    minutes: float = DEFAULT_MINUTES
    interval: float = 5.0
    connect_rate: float = 20.0
    lifetime: tuple[float, float] = (5.0, 45.0)
    shared_jobs: int = 5
    mix: dict[str, float] = field(default_factory=lambda: {"status": 0.8, "shared": 0.6, "own": 0.8})
    status_rate: float = 5.0
    shared_rate: float = 10.0
    own_rate: float = 1.0
    resubscribe: float = 0.2
    abort: float = 0.2
    size: int = 200
    seed: int = 1
    warmup_s: float = 0.0  # 0: the larger of 10% of the run and the longest lifetime + 15 s

    def __post_init__(self) -> None:
        if not self.warmup_s:
            self.warmup_s = max(0.1 * self.minutes * 60, self.lifetime[1] + 15)

    @property
    def population(self) -> float:
        """The steady number of live clients (Little's law: arrival rate x mean lifetime)."""
        return self.connect_rate * sum(self.lifetime) / 2


class Sampler:
    """One sample of the server (psutil, /metrics) and the churn (soakgen stats) per call."""

    def __init__(self, server: TowerwsServer, gen: Child):
        self.server, self.gen = server, gen
        self.proc = psutil.Process(server.pid)
        self.t0 = time.monotonic()
        self.last_t = self.t0
        self.last_cpu = self._cpu()
        self.last: dict[str, Any] = {}
        self.prev_sample: dict[str, Any] | None = None

    def _cpu(self) -> float:
        t = self.proc.cpu_times()
        return t.user + t.system

    def take(self) -> dict[str, Any]:
        if self.server.proc.poll() is not None:
            raise BenchError(f"towerws exited with {self.server.proc.returncode}; see {self.server.log}")
        now = time.monotonic()
        cpu = self._cpu()
        m = self.server.metrics()
        g = self.gen.call({"cmd": "stats"}, timeout=30)
        if g.get("feed_error"):
            raise BenchError(f"the feed failed: {g['feed_error']}")
        dt = now - self.last_t
        prev = self.last or {k: 0 for k in ("frames", "lost", "dups", "published", "subscribed", "failed")}
        sample = {
            "t": round(now - self.t0, 2),
            "rss_mib": round(self.proc.memory_info().rss / MiB, 2),
            "fds": self.proc.num_fds(),
            "server_cpu": round((cpu - self.last_cpu) / dt, 3),
            "connections": int(m.get("towerws_connections", -1)),
            "groups_active": int(m.get("towerws_groups_active", -1)),
            "bindings": int(m.get("towerws_amqp_bindings", -1)),
            "clients": g["live"],
            "connecting": g["connecting"],
            "groups_in_use": g["groups"],
            "delivered_per_s": round((g["frames"] - prev["frames"]) / dt, 1),
            "published_per_s": round((g["published"] - prev["published"]) / dt, 1),
            "connects_per_s": round((g["subscribed"] - prev["subscribed"]) / dt, 2),
            "failed": g["failed"] - prev["failed"],
            "lost": g["lost"] - prev["lost"],
            "dups": g["dups"] - prev["dups"],
            "p50_ms": g["p50"] * 1e3,
            "p99_ms": g["p99"] * 1e3,
            "max_ms": g["max"] * 1e3,
            "loadgen_cpu": round(g["cpu"], 3),
            "feed_backlog": g["feed_backlog"],
            "consuming": int(m.get("towerws_amqp_consuming", -1)),
            "amqp_reconnects": int(m.get("towerws_amqp_reconnects_total", 0)),
            "feed_up": g["feed_up"],
            "feed_outages": g["feed_outages"],
        }
        before = self.prev_sample or sample
        # The shared broker restarted (other engineers' tests do that): the judge excuses what follows.
        sample["broker_event"] = (sample["consuming"] != 1 or not sample["feed_up"]
                                  or sample["feed_outages"] != before["feed_outages"]
                                  or sample["amqp_reconnects"] != before["amqp_reconnects"])
        self.prev_sample = sample
        sample["extra_connections"] = sample["connections"] - sample["clients"]
        sample["extra_bindings"] = sample["bindings"] - sample["groups_in_use"]
        self.last, self.last_t, self.last_cpu = g, now, cpu
        return sample


def drain(server: TowerwsServer, proc: psutil.Process, fds_before: int, timeout: float = 40.0) -> dict[str, Any]:
    """After every client left: wait for no connection, group or binding, and the open files back."""
    deadline = time.monotonic() + timeout
    t0 = time.monotonic()
    state: dict[str, Any] = {}
    while True:
        m = server.metrics()
        state = {"connections": int(m.get("towerws_connections", -1)),
                 "groups_active": int(m.get("towerws_groups_active", -1)),
                 "bindings": int(m.get("towerws_amqp_bindings", -1)), "fds": proc.num_fds(),
                 "rss_mib": round(proc.memory_info().rss / MiB, 2)}
        clean = (state["connections"] == 0 and state["groups_active"] == 0 and state["bindings"] == 0
                 and state["fds"] <= fds_before + FDS_SLACK)
        if clean or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    return {**state, "fds_before": fds_before, "drained": clean, "after_s": round(time.monotonic() - t0, 1)}


#: after the broker is back (towerws reconnects with a backoff of up to 30 s), what the clients
#: see is still the restart's doing for this long
OUTAGE_MARGIN_S = 45.0


def disturbed(samples: list[dict[str, Any]], interval: float) -> list[bool]:
    """Per sample: was the broker restarting around it (from one interval before to the margin after)?"""
    events = [s["t"] for s in samples if s.get("broker_event")]
    return [any(e - interval <= s["t"] <= e + OUTAGE_MARGIN_S for e in events) for s in samples]


def client_totals(samples: list[dict[str, Any]], interval: float) -> dict[str, int]:
    """Lost, duplicated and failed, split into quiet intervals and those around a broker restart."""
    flags = disturbed(samples, interval)
    out = {"lost": 0, "dups": 0, "failed": 0, "lost_restart": 0, "dups_restart": 0, "failed_restart": 0,
           "restart_samples": sum(flags)}
    for s, bad in zip(samples, flags, strict=True):
        for key in ("lost", "dups", "failed"):
            out[key + ("_restart" if bad else "")] += s[key]
    return out


def analyse(samples: list[dict[str, Any]], cfg: SoakConfig) -> dict[str, Growth]:
    """The growth verdict of every checked series."""
    times = [s["t"] for s in samples]
    return {s.key: detect(times, [x[s.key] for x in samples], cfg.warmup_s, s.tolerance)
            for s in SERIES if s.tolerance is not None}


def verdict(doc: dict[str, Any]) -> list[str]:
    """Why the soak failed (empty: it passed)."""
    reasons = []
    short = [BY_KEY[k].label for k, g in doc["growth"].items() if g["verdict"] == "too short"]
    if short:
        # No verdict is no pass: a soak too short to judge says nothing about leaks.
        reasons.append(f"too short to judge the growth of {', '.join(short)} "
                       f"(after the {doc['config']['warmup_s']:.0f} s warm-up); run longer")
    for key, g in doc["growth"].items():
        if g["verdict"] == "GROWS":
            s = BY_KEY[key]
            reasons.append(f"{s.label} grows: {Growth(**g).explain(s.unit)}")
    d = doc.get("drain")
    if d and not d["drained"]:
        reasons.append(f"the server did not drain within {d['after_s']} s after the clients left: "
                       f"{d['connections']} connections, {d['groups_active']} groups, {d['bindings']} bindings, "
                       f"{d['fds']} open files (before the churn: {d['fds_before']})")
    q = doc.get("quiet") or {}
    if q.get("lost") or q.get("dups"):
        reasons.append(f"outside broker restarts, clients lost {q['lost']} messages and got {q['dups']} twice")
    t = doc.get("totals") or {}
    attempts = t.get("subscribed", 0) + t.get("failed", 0)
    if attempts and q.get("failed", 0) > MAX_FAILED_SHARE * attempts:
        reasons.append(f"{q['failed']} of {attempts} connects failed outside broker restarts: {t.get('failures')}")
    return reasons


def run(cfg: SoakConfig, amqp_url: str, logdir: Path, doc: dict[str, Any], out: Path) -> None:
    """Start the server and the churn, sample until the time is up, stop, check the drain; fills ``doc``."""
    with_server = TowerwsServer(amqp_url, logdir, "soak", feed=False)
    try:
        proc = psutil.Process(with_server.pid)
        time.sleep(1.0)
        fds_before = proc.num_fds()
        doc["before"] = {"fds": fds_before, "rss_mib": round(proc.memory_info().rss / MiB, 2)}
        gen = Child("soakgen", [sys.executable, "-m", "bench.soakgen"], logdir / "soak-soakgen.log")
        try:
            gen.call({"cmd": "start", "url": with_server.url, "amqp_url": amqp_url,
                      "exchange": with_server.exchange, **asdict(cfg)}, timeout=30)
            sampler = Sampler(with_server, gen)
            duration = cfg.minutes * 60
            due = time.monotonic()
            print(f"soak: {cfg.minutes:g} min, sampling every {cfg.interval:g} s, warm-up {cfg.warmup_s:.0f} s; "
                  f"server pid {with_server.pid}, log {with_server.log}", flush=True)
            while time.monotonic() - sampler.t0 < duration:
                due += cfg.interval
                time.sleep(max(0.0, due - time.monotonic()))
                s = sampler.take()
                doc["samples"].append(s)
                print(f"  {s['t']:7.0f}s  rss {s['rss_mib']:6.1f} MiB  fds {s['fds']:5d}  conns {s['connections']:4d} "
                      f"(clients {s['clients']:4d})  groups {s['groups_active']:4d}  bindings {s['bindings']:4d}  "
                      f"frames/s {s['delivered_per_s']:7.0f}  lost {s['lost']}  p99 {s['p99_ms']:6.1f} ms  "
                      f"cpu {s['server_cpu']:.2f}", flush=True)
                if len(doc["samples"]) % 12 == 0:
                    out.write_text(json.dumps(doc, indent=1))  # a crash late in a long run keeps the data
            totals = gen.call({"cmd": "stop", "timeout": 30}, timeout=60)
            doc["totals"] = {k: v for k, v in totals.items() if k not in ("ok", "p50", "p99", "max", "cpu")}
        finally:
            gen.stop()
        doc["drain"] = drain(with_server, proc, fds_before)
    finally:
        with_server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=DEFAULT_MINUTES, help="how long the churn runs (default 30)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples (default 5)")
    parser.add_argument("--connect-rate", type=float, default=20.0, help="new clients per second (default 20)")
    parser.add_argument("--lifetime", type=float, nargs=2, default=(5.0, 45.0), metavar=("MIN", "MAX"),
                        help="each client lives a uniform random time in [MIN, MAX] s (default 5 45)")
    parser.add_argument("--mix", type=float, nargs=3, default=(0.8, 0.6, 0.8), metavar=("STATUS", "SHARED", "OWN"),
                        help="share of clients in jobs-status_changed, in a shared job, in an own new job "
                             "(default 0.8 0.6 0.8)")
    parser.add_argument("--resubscribe", type=float, default=0.2,
                        help="share of clients that switch to a new own job half-way (default 0.2)")
    parser.add_argument("--abort", type=float, default=0.2,
                        help="share of clients that leave by a TCP reset, not a close frame (default 0.2)")
    parser.add_argument("--note", help="a remark shown under the title of the report")
    parser.add_argument("--amqp-url", default=DEFAULT_AMQP)
    parser.add_argument("--out", type=Path, help="JSON (default bench/soak-latest.json; shorter than 30 minutes: "
                                                  "bench/logs/soak-short.json)")
    parser.add_argument("--logs", type=Path, default=ROOT / "bench" / "logs", help="server and client logs")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="run nothing: judge the samples of this JSON again and render its report "
                             "(next to it; with --note, the note added)")
    args = parser.parse_args(argv)
    if args.render:
        return render_again(args.render, args.note)

    full = args.minutes >= DEFAULT_MINUTES
    out = args.out or (ROOT / "bench" / "soak-latest.json" if full else args.logs / "soak-short.json")
    markdown = out.parent / ("SOAK.md" if full and args.out is None else f"{out.stem}.md")
    cfg = SoakConfig(minutes=args.minutes, interval=args.interval, connect_rate=args.connect_rate,
                     lifetime=tuple(args.lifetime), mix=dict(zip(("status", "shared", "own"), args.mix, strict=True)),
                     resubscribe=args.resubscribe, abort=args.abort)
    raise_nofile()
    args.logs.mkdir(parents=True, exist_ok=True)
    try:
        ensure_broker(args.amqp_url)
        broker = rabbitmq_version(args.amqp_url)
    except BenchError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 2
    doc: dict[str, Any] = {
        **doc_head("bench.soak", argv, args.note, broker),
        "load": os_load(),
        "config": asdict(cfg),
        "population": cfg.population,
        "samples": [],
    }
    t0 = time.monotonic()
    try:
        run(cfg, args.amqp_url, args.logs, doc, out)
    except (BenchError, OSError) as exc:
        doc["error"] = str(exc)
        print(f"soak: {exc}", file=sys.stderr)
    doc["elapsed_s"] = round(time.monotonic() - t0)
    doc["load_after"] = os_load()
    judge(doc)
    doc = report.relative_paths(doc, ROOT)
    out.write_text(json.dumps(doc, indent=1))
    render(doc, markdown)
    print("\n" + "\n".join(summary(doc)))
    print(f"\nreport: {markdown}, data: {out}")
    return 0 if doc["passed"] else 1


def render_again(path: Path, note: str | None) -> int:
    """Judge the samples of a soak's JSON by the current rules and render its page again, next to it."""
    doc = json.loads(path.read_text())
    if note is not None:
        doc["note"] = note
    judge(doc)
    doc = report.relative_paths(doc, ROOT)
    path.write_text(json.dumps(doc, indent=1))
    page_path = path.parent / ("SOAK.md" if path.name == "soak-latest.json" else f"{path.stem}.md")
    render(doc, page_path)
    print(f"report: {page_path}")
    return 0 if doc["passed"] else 1


def judge(doc: dict[str, Any]) -> None:
    """Growth verdicts, loss outside broker restarts, pass or fail: from the samples, by the current rules."""
    cfg = SoakConfig(**doc["config"])
    doc["growth"] = {k: g.as_dict() for k, g in analyse(doc["samples"], cfg).items()}
    doc["quiet"] = client_totals(doc["samples"], cfg.interval)
    doc["reasons"] = verdict(doc) + ([f"the soak stopped early: {doc['error']}"] if "error" in doc else [])
    doc["passed"] = not doc["reasons"]


def os_load() -> list[float]:
    """The machine's 1/5/15-minute load averages (other engineers' tests share these 2 cores)."""
    return [round(x, 2) for x in psutil.getloadavg()]


# -- the report ---------------------------------------------------------------------------


def summary(doc: dict[str, Any]) -> list[str]:
    """The verdict and one line per checked series."""
    lines = ["PASSED" if doc["passed"] else "FAILED"] + [f"  - {r}" for r in doc["reasons"]]
    for key, g in doc["growth"].items():
        s = BY_KEY[key]
        lines.append(f"  {s.label:32} {Growth(**g).explain(s.unit)}")
    return lines


def figures(doc: dict[str, Any]) -> list[list[str]]:
    """Rows of the figures table: first, after the warm-up, last, max of every series."""
    samples = doc["samples"]
    warm = doc["config"]["warmup_s"]
    steady = [s for s in samples if s["t"] >= samples[0]["t"] + warm] if samples else []
    rows = []
    for s in SERIES:
        if not samples:
            break
        values = [x[s.key] for x in samples]
        g = doc["growth"].get(s.key)
        check = "-" if g is None else ("GROWS" if g["verdict"] == "GROWS" else g["verdict"])
        rows.append([s.label + (f" ({s.unit})" if s.unit else ""), _n(values[0]),
                     _n(steady[0][s.key]) if steady else "-", _n(values[-1]), _n(max(values)),
                     _n(g["middle"]) if g else "-", _n(g["last"]) if g else "-",
                     f"{g['per_hour']:+.3g}" if g else "-", _n(g["tolerance"]) if g else "-", check])
    return rows


def _n(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def render(doc: dict[str, Any], markdown: Path) -> None:
    """The report page and its plot (next to it, same stem)."""
    png = markdown.with_suffix(".png") if markdown.stem != "SOAK" else markdown.parent / "soak.png"
    if doc["samples"]:
        plot(doc, png)
    markdown.write_text("\n".join(page(doc, link(png, markdown) if doc["samples"] else None)))


def page(doc: dict[str, Any], png: str | None) -> list[str]:
    cfg, m, t = doc["config"], doc["machine"], doc.get("totals") or {}
    lo, hi = cfg["lifetime"]
    d = doc.get("drain")
    minutes = doc["samples"][-1]["t"] / 60 if doc["samples"] else 0.0
    parts = [
        "# towerws soak",
        "",
        f"Generated by `{doc['command']}` on {doc['date']}: "
        f"{minutes:.1f} minutes of churn, {doc['elapsed_s'] / 60:.1f} minutes in all.",
        "",
        *([f"**Note:** {doc['note']}", ""] if doc.get("note") else []),
        f"**Verdict: {'PASSED' if doc['passed'] else 'FAILED'}.**"
        + ("" if doc["passed"] else " " + " ".join(f"{r}." for r in doc["reasons"])),
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, RAM {m['ram_gib']} GiB; Python {m['python']}, "
        f"Twisted {m['twisted']}, Autobahn {m['autobahn']}, txAMQP {m['txamqp']}, RabbitMQ {m['rabbitmq']}; "
        f"towerws {m['towerws']} at commit {doc.get('commit', '?')}. "
        f"Load average (1/5/15 min) {'/'.join(map(str, doc['load']))} before, "
        f"{'/'.join(map(str, doc.get('load_after', [])))} after: the 2 cores are shared by towerws, "
        "RabbitMQ, the churn process and whatever else runs on the machine (other engineers' tests "
        "ran concurrently), so CPU and latency wobble with them.",
        "",
        "## Load",
        "",
        "- One towerws (`twistd --nodaemon towerws`, as in `make bench`), its own exchange and node id, "
        "`--unbind-grace` at its default; one churn process (`bench/soakgen.py`: picows clients and the AMQP feed).",
        f"- {cfg['connect_rate']:g} new clients/s, each living {lo:g}-{hi:g} s (uniform): "
        f"about {doc['population']:.0f} live clients; {cfg['abort']:.0%} leave by a TCP reset, the rest with a close "
        f"frame; {cfg['resubscribe']:.0%} switch to a new job half-way through.",
        f"- Groups: `jobs-status_changed` ({cfg['mix']['status']:.0%} of clients, {cfg['status_rate']:g} msg/s), "
        f"one of `job_events-1..{cfg['shared_jobs']}` ({cfg['mix']['shared']:.0%}, {cfg['shared_rate']:g} msg/s each), "
        f"an own new `job_events-<id>` ({cfg['mix']['own']:.0%}, {cfg['own_rate']:g} msg/s while its client lives: "
        f"a binding made and removed per client). Bodies of {cfg['size']} bytes.",
        f"- Sampled every {cfg['interval']:g} s; the first {cfg['warmup_s']:.0f} s are warm-up (population ramping, "
        "allocator settling) and not judged.",
        "",
    ]
    if png:
        parts += [f"![soak series over time]({png})", "",
                  "Grey: warm-up. Red: from one interval before a broker connection dropped to 45 s after "
                  "(losses there excused). Dashed lines: the middle and last thirds of the steady part, whose "
                  "medians the growth test compares.", ""]
    parts += [
        "## Figures",
        "",
        report.md_table(["series", "first", "after warm-up", "last", "max", "middle third (median)",
                         "last third (median)", "trend per hour", "tolerance", "growth test"], figures(doc)),
        "",
    ]
    if t:
        attempts = t.get("subscribed", 0) + t.get("failed", 0)
        parts += [
            "## What the clients saw",
            "",
            f"- {t.get('subscribed', 0):,} clients subscribed ({attempts:,} attempts, {t.get('failed', 0)} failed"
            + (f": {t['failures']}" if t.get("failures") else "") + f"; {t.get('skipped', 0)} arrivals skipped "
            f"because 200 were still connecting); {t.get('left_clean', 0):,} left with a close frame, "
            f"{t.get('left_abort', 0):,} by a reset, {t.get('server_closed', 0)} were closed by the server; "
            f"{t.get('resubscribed', 0):,} switched jobs.",
            f"- {t.get('frames', 0):,} frames delivered, {t.get('lost', 0):,} lost, {t.get('dups', 0):,} duplicated, "
            f"{t.get('stale', 0):,} stale (in flight for a group just left); {t.get('published', 0):,} messages published.",
            _restarts(doc),
            "",
        ]
    if d:
        parts += [
            "## Drain after the churn",
            "",
            f"All clients gone, then within {d['after_s']} s: {d['connections']} connections, {d['groups_active']} "
            f"groups, {d['bindings']} bindings, {d['fds']} open files (before the churn: {d['fds_before']}), "
            f"RSS {d['rss_mib']:.1f} MiB (before the churn: {doc['before']['rss_mib']:.1f} MiB): "
            + ("drained." if d["drained"] else "**did not drain**."),
            "",
        ]
    parts += [
        "## The test",
        "",
        "A series fails when, after the warm-up, the median of its last third exceeds the median of its middle "
        "third by more than its tolerance *and* it is still rising within the last third (Theil-Sen slope x the "
        "third's span above half the tolerance): a leak keeps climbing, a one-time step (RSS settling) does not. "
        "Tolerance: the larger of an absolute floor, a share of the level and twice the robust sample noise "
        "(`bench/growth.py`, `bench/soak.py` `SERIES`). The soak also fails if the server does not drain, a client "
        f"lost or repeated a message, or more than {MAX_FAILED_SHARE:.0%} of connects failed. A 30-minute run sees "
        "about its tolerance per 9 minutes: for RSS, growth from about 13 MiB/h (some 190 bytes kept per connect).",
        "",
    ]
    return parts


def _zoom_on_trend(ax: Any, t: list[float], ys: list[float], steady_t: list[float]) -> None:
    """Limit ``ax`` to the values after the warm-up and draw their trend over the middle and last thirds."""
    steady = [(x, y) for x, y in zip(t, ys, strict=True) if x >= steady_t[0]]
    low, high = min(y for _, y in steady), max(y for _, y in steady)
    pad = max(0.5, 0.1 * (high - low))
    ax.set_ylim(low - pad, high + pad)
    start = steady_t[0] + (steady_t[-1] - steady_t[0]) / 3
    judged = [(x, y) for x, y in steady if x >= start]
    slope, intercept = trend_line([x for x, _ in judged], [y for _, y in judged])
    ends = [judged[0][0], judged[-1][0]]
    ax.plot(ends, [intercept + slope * x for x in ends], "k:", linewidth=1.2,
            label=f"trend {slope * 60:+.2f} MiB/h")


def _spans(t: list[float], flags: list[bool]) -> list[tuple[float, float]]:
    """The runs of consecutive flagged samples as (first, last) times."""
    spans: list[tuple[float, float]] = []
    for i, (x, bad) in enumerate(zip(t, flags, strict=True)):
        if bad and i > 0 and flags[i - 1]:
            spans[-1] = (spans[-1][0], x)
        elif bad:
            spans.append((x, x))
    return spans


def _restarts(doc: dict[str, Any]) -> str:
    q, t = doc.get("quiet") or {}, doc.get("totals") or {}
    if not q.get("restart_samples"):
        return "- No broker connection dropped during the soak."
    return (f"- Broker connections dropped during the soak (the broker is shared: other engineers' tests restart "
            f"it with `rabbitmqctl stop_app`/`start_app`; the feed saw {t.get('feed_outages', '?')} outage(s) and skipped "
            f"{t.get('feed_skipped', 0):,} messages due meanwhile): {q['restart_samples']} samples from one interval "
            f"before to {OUTAGE_MARGIN_S:.0f} s after are excused (shaded red in the plot). There clients lost "
            f"{q['lost_restart']:,}, got {q['dups_restart']} twice and {q['failed_restart']} connects failed; "
            f"elsewhere {q['lost']} lost, {q['dups']} twice, {q['failed']} failed.")


def plot(doc: dict[str, Any], path: Path) -> None:
    """One panel per kind of series over time (minutes); warm-up shaded grey, broker restarts red."""
    plt = pyplot()
    samples = doc["samples"]
    t = [s["t"] / 60 for s in samples]
    warm = doc["config"]["warmup_s"] / 60
    steady_t = [x for x in t if x >= t[0] + warm]
    spans = _spans(t, disturbed(samples, doc["config"]["interval"]))
    panels = [
        ("server RSS (MiB)", ["rss_mib"]),
        ("server RSS after the warm-up (MiB), zoomed; dotted: its Theil-Sen trend over the middle and last thirds",
         ["rss_mib"]),
        ("connections and open files", ["fds", "connections", "clients"]),
        ("groups and AMQP bindings", ["bindings", "groups_active", "groups_in_use"]),
        ("server count minus what the clients hold", ["extra_connections", "extra_bindings"]),
        ("frames delivered per second", ["delivered_per_s"]),
        ("p99 latency (ms), scheduled send to receipt", ["p99_ms"]),
        ("messages lost per interval", ["lost"]),
        ("CPU (cores)", ["server_cpu", "loadgen_cpu"]),
    ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10.0, 2.1 * len(panels)), sharex=True)
    for n, (ax, (title, keys)) in enumerate(zip(axes, panels, strict=True)):
        zoom = n == 1
        for key in keys:
            g = doc["growth"].get(key)
            mark = "" if g is None else f" [{'GROWS' if g['verdict'] == 'GROWS' else g['verdict']}]"
            ax.plot(t, [s[key] for s in samples], linewidth=1.0, label=BY_KEY[key].label + mark)
        if zoom and len(steady_t) >= 3:
            _zoom_on_trend(ax, t, [s["rss_mib"] for s in samples], steady_t)
        ax.axvspan(t[0], t[0] + warm, color="0.9", zorder=0)
        for start, end in spans:
            ax.axvspan(start, end, color="#f4c7c3", zorder=0)
        if len(steady_t) >= 3:
            third = (steady_t[-1] - steady_t[0]) / 3
            for edge in (steady_t[0] + third, steady_t[0] + 2 * third):
                ax.axvline(edge, color="0.5", linestyle="--", linewidth=0.8)
        ax.set_title(title, fontsize=9, loc="left")
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    axes[-1].set_xlabel("minutes")
    verdict_text = "PASSED" if doc["passed"] else "FAILED"
    fig.suptitle(f"towerws soak, {doc['date']}: {verdict_text}", fontsize=11)
    fig.tight_layout()
    save(fig, path)


if __name__ == "__main__":
    sys.exit(main())
