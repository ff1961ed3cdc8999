"""Re-binding at scale (issue 12, item 4): the ``rebind`` and ``storm`` scenarios.

* ``rebind``  one node holding N active groups (clients of K groups each) loses its
  broker connection (:mod:`bench.amqpproxy` severs it); how long until every group is
  bound again and delivering, when the queue outlived the connection (``kept``) and
  when it was deleted meanwhile (``lost``: the node declares a new queue and binds all N).
* ``storm``   C clients connect and subscribe, 64 in flight, each to a group of its own
  that nobody held before (``new``: every subscribe waits for a new binding) or all to
  one group bound beforehand (``existing``), against this checkout and against a
  baseline commit (the code before the cluster work: its bindings go over one channel),
  fresh servers, interleaved.

"Bound" is the node's own count (``towerws_amqp_bindings`` on ``/metrics``, a binding
counts once the broker's ``bind-ok`` arrived); "delivering" is seen from outside: one
probe message published to every group (:mod:`bench.publisher`, after the count
says all are bound), and every client must receive the probe of every group it holds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from bench.procs import BenchError, Child, Monitor, TowerwsServer, amqp_proxy, baseline_tree, broker_process, shown
from bench.scenarios import Config, _say, load_generator, median_of, started, top_stacks

#: seconds between two reads of /metrics while the node reconnects and binds
POLL = 0.05
#: seconds a probe round may take before the groups still missing are probed again
PROBE_WAIT = 5.0
#: py-spy's samples per second in the profiled reconnect
PROFILE_RATE = 250


def _cpu_monitors(server: TowerwsServer) -> tuple[Monitor, Monitor | None]:
    """CPU of the server and of the broker (beam.smp), both marked now."""
    broker = broker_process()
    server_mon = Monitor(server.pid)
    broker_mon = Monitor(broker.pid) if broker is not None else None
    return server_mon, broker_mon


# -- probes ---------------------------------------------------------------------------


def probe_groups(server: TowerwsServer, lg: Child, tag: str, groups: list[str], first_round: int,
                 timeout: float = 60.0) -> dict[str, Any]:
    """Publish one probe to each group until every client of ``tag`` got the probe of each group it holds.

    A group that is not bound drops its probe (nothing routes it to the node's
    queue): the groups still missing after :data:`PROBE_WAIT` s are probed again,
    until ``timeout``.  Returns the wall-clock start of the first round, the receipt
    time of the last probe, the rounds needed and the groups never heard from.
    """
    lg.call({"cmd": "mark_probes", "tags": [tag]})
    todo = groups
    rounds = 0
    start: float | None = None
    got: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    while todo and time.monotonic() < deadline:
        rounds += 1
        sent = server.feed.call({"cmd": "probe", "groups": todo, "round": first_round + rounds}, timeout=60)
        start = sent["start"] if start is None else start
        wait = max(0.0, min(PROBE_WAIT, deadline - time.monotonic()))
        got = lg.call({"cmd": "wait_probes", "tags": [tag], "wait": wait}, timeout=wait + 30)
        if got["gone"]:
            raise BenchError(f"{got['gone']} clients of {tag} disconnected while probed")
        todo = got["missing_groups"]
    return {"start": start, "last_rx": got.get("last_rx", 0.0), "rounds": rounds, "missing": len(todo),
            "extra": got.get("extra", 0)}


# -- rebind ---------------------------------------------------------------------------


def rebind(cfg: Config) -> dict[str, Any]:
    """N groups on one node; sever its broker connection; time until all are bound and delivering again."""
    n, per = cfg.rebind_groups, cfg.rebind_groups_per_client
    if n % per:
        raise BenchError(f"rebind: {n} groups do not split into clients of {per}")
    clients = n // per
    groups = [f"job_events-{i}" for i in range(1, n + 1)]
    label = f"rebind-{n}"
    proxy, via = amqp_proxy(cfg.amqp_url, cfg.logdir / f"{label}-proxy.log")
    # A groups reply waits for all its bindings; the first subscription of 10,000 on a
    # busy machine may take longer than the default 10 s.
    extra = ["--bind-timeout", "120", "--max-groups-per-connection", str(max(1000, per))]
    try:
        with started(partial(TowerwsServer, cfg.amqp_url, cfg.logdir, label, extra, broker_url=via)) as server, \
                load_generator(cfg, label) as lg:
            reply = lg.call({"cmd": "connect", "tag": "rebind", "n": clients, "url": server.url, "timeout": 300,
                             "concurrency": clients, "own_key": "job_events", "own_base": 1, "own_count": per},
                            timeout=600)
            subscribe_s = reply["elapsed"]
            bound = server.metrics().get("towerws_amqp_bindings")
            if bound != n:
                raise BenchError(f"rebind: {bound} groups bound after subscribing {n}")
            steady = probe_groups(server, lg, "rebind", groups, first_round=0)
            if steady["missing"]:
                raise BenchError(f"rebind: {steady['missing']} groups never delivered before the reconnect")
            _say(cfg, f"   {clients} clients x {per} groups subscribed in {subscribe_s:.1f} s; "
                      f"a probe round at rest: {steady['last_rx'] - steady['start']:.2f} s")
            runs: dict[str, list[dict[str, Any]]] = {"kept": [], "lost": []}
            broker_alone: list[dict[str, Any]] = []
            for i in range(cfg.runs):
                for variant in ("kept", "lost"):
                    # Probe rounds numbered apart per reconnect, so a log line tells them apart.
                    first_round = 1000 * (1 + len(runs["kept"]) + len(runs["lost"]))
                    r = _rebind_once(cfg, server, lg, proxy, variant, groups, first_round)
                    runs[variant].append(r)
                    _say(cfg, f"   run {i + 1} queue {variant}: consuming {r['consuming_s']:.2f} s, "
                              f"all bound {r['bound_s']:.2f} s, all delivering {r['delivered_s']:.2f} s after the "
                              f"reconnect (probe rounds {r['probe_rounds']}; server cpu {r['server_cpu']:.2f}, "
                              f"broker cpu {r['broker_cpu']:.2f})")
                broker_alone.append(_broker_alone(server, groups))
                _say(cfg, "   run {} the broker alone, binds/s: {}".format(
                    i + 1, ", ".join(f"{k} {v:,.0f}" for k, v in broker_alone[-1].items())))
            profile = _profile_lost(cfg, server, lg, proxy, groups) if cfg.profile else None
    finally:
        proxy.stop()
    return {
        "params": {"groups": n, "clients": clients, "groups_per_client": per,
                   "reconnect": "TCP proxy severed (both sides aborted)"},
        "subscribe_s": subscribe_s,
        "probe_round_at_rest_s": steady["last_rx"] - steady["start"],
        "runs": runs,
        "median": {v: median_of([{k: x for k, x in r.items() if k != "bind_series"} for r in rs])
                   for v, rs in runs.items()},
        "broker_alone": {"runs": broker_alone, "median": median_of(broker_alone)},
        **({"bind_profile": profile} if profile else {}),
    }


def _profile_lost(cfg: Config, server: TowerwsServer, lg: Child, proxy: Child, groups: list[str]) -> dict[str, Any]:
    """One more *queue lost* reconnect (not in the medians) with py-spy on the server: where its time goes.

    ``attach_s``: the seconds of samples inside ``Bindings.attach``, which issues
    every bind in one reactor turn (nothing is sent, and nothing else served, until it returns).
    """
    out = cfg.logdir / "profile-rebind-lost.txt"
    cmd = [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(server.pid), "--rate",
           str(PROFILE_RATE), "--format", "raw", "--nolineno", "--nonblocking", "--output", str(out)]
    _say(cfg, f"   profiling a queue-lost reconnect: {shown(cmd)}")
    spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)  # py-spy attaches (no event to wait for)
        r = _rebind_once(cfg, server, lg, proxy, "lost", groups, first_round=100_000)
        spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        _, err = spy.communicate(timeout=60)
    except BaseException:
        spy.kill()
        spy.wait(10)
        raise
    if not out.exists():
        return {"error": f"py-spy failed ({spy.returncode}): {err.strip()[-300:]}", "command": shown(cmd)}
    attach = sum(int(count) for stack, _, count in (line.rpartition(" ") for line in out.read_text().splitlines())
                 if "Bindings.attach" in stack and count.isdigit())
    return {"command": shown(cmd), "file": shown([str(out)]), "bound_s": r["bound_s"], "consuming_s": r["consuming_s"],
            "attach_s": attach / PROFILE_RATE, **top_stacks(out)}


#: the broker alone binding the same groups: how, by label
BROKER_ALONE = {"durable, 4 channels": (True, 4), "durable, 1 channel": (True, 1), "transient, 4 channels": (False, 4)}


def _broker_alone(server: TowerwsServer, groups: list[str]) -> dict[str, float]:
    """binds/s of a raw AMQP client binding a fresh queue to every group: durable as towerws does, and for comparison.

    towerws's node queue is durable (its bindings outlive the connection and a
    broker restart): each binding is a transaction in RabbitMQ's metadata store.
    """
    out = {}
    for label, (durable, channels) in BROKER_ALONE.items():
        reply = server.feed.call({"cmd": "bind", "queue": f"{server.node_id}.reference", "durable": durable,
                                  "groups": groups, "channels": channels}, timeout=600)
        out[label] = reply["binds_per_s"]
    return out


def _rebind_once(cfg: Config, server: TowerwsServer, lg: Child, proxy: Child, variant: str, groups: list[str],
                 first_round: int) -> dict[str, Any]:
    """One forced reconnect; ``variant`` ``lost`` deletes the node's queue while the node cannot reach the broker."""
    import pika

    n = len(groups)
    reconnects = server.metrics().get("towerws_amqp_reconnects_total", 0.0)
    admin = pika.BlockingConnection(pika.URLParameters(cfg.amqp_url)) if variant == "lost" else None
    deleted = {}
    try:
        severed = proxy.call({"cmd": "sever"})
        if admin is not None:
            # The proxy holds the node's new connection meanwhile: it finds no queue.
            deleted = _delete_queue(admin.channel(), f"towerws.{server.node_id}")
        # CPU from here: the node's reconnect and binding, not the runner's deletion.
        server_mon, broker_mon = _cpu_monitors(server)
        proxy.call({"cmd": "release"})
    finally:
        if admin is not None:
            admin.close()
    t0 = proxy.call({"cmd": "wait_piped", "since": severed["at"], "timeout": 30}, timeout=40)["at"]
    consuming_at: float | None = None
    series: list[tuple[float, float]] = []
    deadline = time.monotonic() + cfg.rebind_timeout
    while True:
        m = server.metrics()
        now = time.time()
        if m.get("towerws_amqp_reconnects_total", 0.0) > reconnects and m.get("towerws_amqp_consuming") == 1:
            consuming_at = consuming_at or now
            series.append((round(now - t0, 3), m.get("towerws_amqp_bindings", 0.0)))
            if series[-1][1] >= n:
                break
        if time.monotonic() > deadline:
            raise BenchError(f"rebind ({variant}): not all {n} groups bound within {cfg.rebind_timeout:.0f} s "
                             f"of the reconnect (last seen: {series[-1:]})")
        time.sleep(POLL)  # polling /metrics, bounded by the deadline above
    bound_at = now
    server_cpu, broker_cpu = server_mon.cpu(), broker_mon.cpu() if broker_mon is not None else 0.0
    probes = probe_groups(server, lg, "rebind", groups, first_round)
    if probes["missing"]:
        raise BenchError(f"rebind ({variant}): {probes['missing']} groups bound (by the node's count) "
                         f"never delivered a probe")
    assert consuming_at is not None
    bound_s = bound_at - t0
    return {
        "reconnect_after_s": t0 - severed["at"],
        **deleted,
        "consuming_s": consuming_at - t0,
        "bound_s": bound_s,
        "delivered_s": probes["last_rx"] - t0,
        "probe_round_s": probes["last_rx"] - probes["start"],
        "probe_rounds": probes["rounds"],
        "binds_per_s": n / bound_s if variant == "lost" and bound_s > 0 else None,
        "server_cpu": server_cpu,
        "broker_cpu": broker_cpu,
        "bind_series": series[:: max(1, len(series) // 20)] + series[-1:],
    }


def _delete_queue(channel: Any, queue: str, quiet: float = 0.05, timeout: float = 30.0) -> dict[str, float]:
    """Delete ``queue``, then wait until the broker has finished with its bindings.

    RabbitMQ answers delete-ok before it is done removing 10,000 bindings: a
    declare right after waits a few hundred ms (measured).  A queue really lost
    (expired while the node was away) was gone long before the node came back,
    so the node's reconnect is timed from a settled broker: a scratch durable
    queue is declared and deleted until that takes under ``quiet`` s.
    """
    t0 = time.monotonic()
    channel.queue_delete(queue=queue)
    delete_s = time.monotonic() - t0
    scratch = f"{queue}.settle"
    deadline = t0 + timeout
    while True:
        t = time.monotonic()
        channel.queue_declare(queue=scratch, durable=True, arguments={"x-expires": 60_000})
        channel.queue_delete(queue=scratch)
        if time.monotonic() - t < quiet or time.monotonic() > deadline:
            break
    return {"delete_s": delete_s, "settle_s": time.monotonic() - t0 - delete_s}


# -- storm ----------------------------------------------------------------------------


def storm(cfg: Config) -> dict[str, Any]:
    """Connect + subscribe, new group per client vs one existing group, this code vs the baseline commit."""
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with tempfile.TemporaryDirectory(prefix="towerws-baseline-") as tmp:
        versions: list[tuple[str, Path | None]] = [("this", None)]
        if cfg.storm_baseline:
            versions.append((cfg.storm_baseline, baseline_tree(cfg.storm_baseline, Path(tmp) / "code")))
        for i in range(cfg.runs):
            # Alternate which code goes first: a machine that gets busier or quieter
            # during the run then weighs on both alike.
            for version, code in versions if i % 2 == 0 else versions[::-1]:
                for kind in ("existing", "new"):
                    r = _storm_once(cfg, version, code, kind, i)
                    runs.setdefault(version, {}).setdefault(kind, []).append(r)
                    _say(
                        cfg, f"   run {i + 1} {version} {kind:8}: {r['rate']:.0f} handshakes+subscriptions/s "
                             f"(server cpu {r['server_cpu']:.2f}, broker cpu {r['broker_cpu']:.2f}, "
                             f"loadgen cpu {r['loadgen_cpu']:.2f}, {r['failed']} failed)")
    return {
        "params": {"clients": cfg.storm_clients, "concurrency": cfg.storm_concurrency, "auth": "static token",
                   "cores": os.cpu_count(),
                   "baseline": cfg.storm_baseline, "new": "job_events-<unique> per client",
                   "existing": "all on job_events-1, bound before"},
        "runs": runs,
        "median": {v: {k: median_of(rs) for k, rs in kinds.items()} for v, kinds in runs.items()},
    }


def _storm_once(cfg: Config, version: str, code: Path | None, kind: str, i: int) -> dict[str, Any]:
    """One storm of ``storm_clients`` against a fresh server (no unbinds of an earlier storm in the way)."""
    label = f"storm-{'this' if code is None else 'baseline'}-{kind}-{i + 1}"
    with started(partial(TowerwsServer, cfg.amqp_url, cfg.logdir, label, code=code)) as server, \
            load_generator(cfg, label) as lg:
        if kind == "existing":
            lg.call({"cmd": "connect", "tag": "anchor", "n": 1, "url": server.url, "timeout": 30,
                     "groups": {"job_events": [1]}}, timeout=60)
            spec: dict[str, Any] = {"groups": {"job_events": [1]}}
        else:
            spec = {"own_key": "job_events", "own_base": 2}
        server_mon, broker_mon = _cpu_monitors(server)
        # Not Child.call: a storm with failures is still a result (its failures are reported).
        lg.send({"cmd": "connect", "tag": "storm", "n": cfg.storm_clients, "url": server.url,
                 "concurrency": cfg.storm_concurrency, "timeout": 30, **spec})
        reply = lg.read(300)
        server_cpu, broker_cpu = server_mon.cpu(), broker_mon.cpu() if broker_mon is not None else 0.0
        bindings = server.metrics().get("towerws_amqp_bindings")
        lg.call({"cmd": "close", "timeout": 30}, timeout=60)
    return {"clients": cfg.storm_clients, "subscribed": reply["subscribed"], "failed": reply["failed"],
            "elapsed_s": reply["elapsed"], "rate": reply["rate"], "server_cpu": server_cpu,
            "broker_cpu": broker_cpu, "loadgen_cpu": reply["loadgen_cpu"], "bindings": bindings}


SCENARIOS: dict[str, Callable[[Config], dict[str, Any]]] = {
    "rebind": rebind,
    "storm": storm,
}
