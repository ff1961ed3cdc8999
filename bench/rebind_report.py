"""Tables, notes and targets of the ``rebind`` and ``storm`` scenarios (:mod:`bench.rebind`).

:mod:`bench.report` hands these two scenarios to this module; the notes say what
was measured and, for a target not met, what the numbers show stands in the way.
"""

from __future__ import annotations

from typing import Any

#: the scenarios this module renders
NAMES = ("rebind", "storm")

#: issue 12: every group bound and delivering again within this many seconds of the reconnect
REBIND_TARGET_S = 3.0
#: issue 12: new-group connect storms at least this many times the baseline's rate
STORM_TARGET_X = 2.0

_VARIANTS = {"kept": "queue kept", "lost": "queue lost"}


def _f(v: Any, spec: str = ",.0f") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)


def tables(name: str, res: dict[str, Any]) -> list[tuple[list[str], list[list[str]]]]:
    """(header, rows) of one scenario: every run and the medians."""
    if name == "rebind":
        head = ["run", "variant", "sever -> reconnect s", "consuming s", "all bound s", "all delivering s",
                "probe round s", "probe rounds", "binds/s", "server CPU", "broker CPU"]

        def row(label: str, variant: str, r: dict[str, Any]) -> list[str]:
            return [label, _VARIANTS[variant], _f(r["reconnect_after_s"], ".2f"), _f(r["consuming_s"], ".2f"),
                    _f(r["bound_s"], ".2f"), _f(r["delivered_s"], ".2f"), _f(r["probe_round_s"], ".2f"),
                    _f(r["probe_rounds"]), _f(r.get("binds_per_s")), _f(r["server_cpu"], ".2f"),
                    _f(r["broker_cpu"], ".2f")]

        rows = [row(str(i + 1), v, r) for v, rs in res["runs"].items() for i, r in enumerate(rs)]
        rows += [row("median", v, m) for v, m in res["median"].items() if m]
        out = [(head, rows)]
        alone = res.get("broker_alone")
        if alone:
            labels = list(alone["median"])
            alone_rows = [[str(i + 1)] + [_f(r[k]) for k in labels] for i, r in enumerate(alone["runs"])]
            alone_rows.append(["median"] + [_f(alone["median"][k]) for k in labels])
            out.append((["run"] + [f"broker alone: {k}, binds/s" for k in labels], alone_rows))
        prof = res.get("bind_profile")
        if prof and prof.get("samples"):
            out.append((["server function, profiled queue-lost reconnect (self time)", "share"],
                        [[f"`{f}`", f"{share}%"] for f, share in prof["self"]]))
        return out
    if name == "storm":
        head = ["code", "groups", "handshakes+subscriptions/s (median)", "each run", "server CPU", "broker CPU",
                "loadgen CPU", "CPU ms per client", "failed", "bound after"]
        rows = []
        for version, kinds in res["runs"].items():
            for kind, rs in kinds.items():
                m = res["median"][version][kind]
                rows.append([_code(version), kind, _f(m["rate"]), " ".join(_f(r["rate"]) for r in rs),
                             _f(m["server_cpu"], ".2f"), _f(m["broker_cpu"], ".2f"), _f(m["loadgen_cpu"], ".2f"),
                             _f(cpu_per_client(m) * 1e3, ".2f"), _f(m["failed"]), _f(m["bindings"])])
        return [(head, rows)]
    return []


def cpu_per_client(m: dict[str, Any]) -> float:
    """CPU seconds that server, broker and load generator spent together per client of a storm."""
    return (m["server_cpu"] + m["broker_cpu"] + m["loadgen_cpu"]) / m["rate"]


def _code(version: str) -> str:
    return "this checkout" if version == "this" else f"baseline {version}"


def notes(name: str, res: dict[str, Any]) -> list[str]:
    """What was measured, how, on what load, and what stands in the way of a target not met."""
    lines = []
    measured = res.get("measured")
    if measured:
        where = f" on {measured['cpu']}, {measured['cores']} cores" if "cpu" in measured else ""
        lines.append(f"measured by `{measured['command']}` on {measured['date']} at commit {measured['commit']}{where}; "
                     f"load average (1, 5, 15 min) before {_load(measured['load_before'])}, "
                     f"after {_load(measured.get('load_after'))}")
    if name == "rebind":
        p = res["params"]
        lines += [
            f"{p['clients']} clients hold {p['groups_per_client']:,} groups each ({p['groups']:,} in all, first "
            f"subscribed in {res['subscribe_s']:.1f} s). The node reaches the broker through a TCP proxy; a "
            "reconnect is forced by aborting both sides of the proxied connection (the broker sees the "
            "connection drop and keeps the durable queue and its bindings). The proxy holds the node's next "
            "connection until the runner has done its part (*queue lost*: it deletes the node's queue "
            "meanwhile, then waits until the broker has finished removing the queue's bindings, which it does "
            "after answering the delete, so that this clean-up is not counted against the node), so times "
            "count from the moment the broker is reachable again; *sever -> reconnect* is the node's backoff "
            "plus that work." + _deletion(res),
            "*consuming* and *all bound*: the node's `/metrics` (read every 50 ms: `towerws_amqp_consuming`, "
            "`towerws_amqp_bindings`, which counts a group once the broker's bind-ok arrived). *All "
            "delivering*: then one probe message is published to every group, and every client must receive "
            "the probe of each group it holds; the time of the last receipt. It includes the probe round "
            f"itself (at rest, before any reconnect, a round took {res['probe_round_at_rest_s']:.2f} s). "
            "*binds/s*: groups / *all bound* (queue lost: every group is bound anew). CPU in cores from the "
            "release to *all bound*; the broker is shared with whatever else runs on the machine.",
            "*broker alone*: after each run, a raw AMQP client (`bench/publisher.py`) binds a fresh queue to "
            "the same groups, every `queue.bind` in flight at once (up to 2,048), round-robin over the "
            "channels: what RabbitMQ does without towerws. *durable* like towerws's node queue (its bindings "
            "outlive the connection and a broker restart), *transient* for comparison.",
        ]
        prof = res.get("bind_profile")
        if prof and "error" in prof:
            lines.append(f"profile failed: {prof['error']}")
        elif prof:
            lines.append(
                f"one more *queue lost* reconnect with py-spy on the server (`{prof['command']}`, not in the "
                f"medians): all bound at {prof['bound_s']:.2f} s; {prof['attach_s']:.2f} s of samples inside "
                "`Bindings.attach`, which issues every bind in one reactor turn: until it returns the node sends "
                f"no bind and serves nothing else (it answered `/metrics` again at {prof['consuming_s']:.2f} s). "
                f"Shares of its {prof['samples']} busy samples in the table above.")
        for variant, rs in res["runs"].items():
            for i, r in enumerate(rs):
                if variant == "lost":
                    lines.append(f"bindings counted after the reconnect, run {i + 1} (queue lost): "
                                 + ", ".join(f"{t:.2f}s {n:,.0f}" for t, n in r["bind_series"]))
        lines += _rebind_obstacles(res)
    if name == "storm":
        p = res["params"]
        lines.append(
            f"{p['clients']:,} clients, {p['concurrency']} in flight, each: websocket handshake, `accept`, the "
            "groups message, the groups reply (which waits for the group's binding); clients/s from the first "
            "connect to the last reply. *new*: each client's own `job_events-N` that no one held (one new "
            "durable binding per client); *existing*: all on `job_events-1`, bound by an earlier client. A "
            "fresh server for every storm; the baseline is the towerws code of that commit (`git archive` "
            "into a temporary directory, put first on `PYTHONPATH` of the same venv's `twistd`); the codes "
            "alternate which goes first from run to run.")
        lines += _storm_obstacles(res)
    return lines


def _deletion(res: dict[str, Any]) -> str:
    lost = res["median"].get("lost") or {}
    if "delete_s" not in lost:
        return ""
    return (f" Deleting the queue took {lost['delete_s']:.2f} s and the broker settled {lost['settle_s']:.2f} s "
            "later (medians).")


def _load(values: list[float] | None) -> str:
    return "/".join(f"{v:.1f}" for v in values) if values else "?"


def _rebind_obstacles(res: dict[str, Any]) -> list[str]:
    out = []
    n = res["params"]["groups"]
    alone = (res.get("broker_alone") or {}).get("median") or {}
    kept = res["median"].get("kept") or {}
    for variant, m in res["median"].items():
        if not m or m["delivered_s"] <= REBIND_TARGET_S:
            continue
        what = (f"queue {variant}: {m['delivered_s']:.2f} s to all delivering, over the {REBIND_TARGET_S:g} s "
                "target. ")
        if variant == "kept":
            what += ("Nothing needs binding here (the bindings outlived the connection); the time is the "
                     f"connection set-up ({m['consuming_s']:.2f} s to consuming) plus the probe round "
                     f"({m['probe_round_s']:.2f} s): the machine, not the binding, is slow.")
            out.append(what)
            continue
        blocked = m["consuming_s"] - kept.get("consuming_s", 0.0)
        binding = m["bound_s"] - m["consuming_s"]
        what += (f"It splits into about {blocked:.1f} s before the node answers `/metrics` again (beyond the "
                 f"{kept.get('consuming_s', 0.0):.2f} s a reconnect takes when the queue was kept: the node "
                 f"queues all {n:,} binds in one reactor turn before the first leaves; see the profile), "
                 f"{binding:.1f} s of binding ({n / binding:,.0f} binds/s once sent) and the probe round "
                 f"({m['probe_round_s']:.2f} s).")
        ref = alone.get("durable, 4 channels")
        if ref:
            what += (f" The broker alone binds {ref:,.0f} durable bindings/s over 4 channels "
                     f"({alone.get('durable, 1 channel', 0):,.0f}/s over 1): {n / ref:.1f} s for {n:,} "
                     + ("by itself, over the target without towerws. " if n / ref > REBIND_TARGET_S else ". "))
            what += ("That is the broker's cost per durable binding: each is a transaction in RabbitMQ's "
                     "metadata store, and a channel's methods run one at a time (towerws pipelines them over 4 "
                     "channels).")
            transient = alone.get("transient, 4 channels")
            if transient:
                what += (f" Transient bindings go {transient / ref:.1f}x faster ({transient:,.0f}/s), but the node's "
                         "queue and its bindings are durable on purpose (they outlive a broker restart).")
        out.append(what)
    return out


def _storm_obstacles(res: dict[str, Any]) -> list[str]:
    ratio = storm_ratio(res)
    if ratio is None or ratio >= STORM_TARGET_X:
        return []
    this, base = res["median"]["this"], res["median"][res["params"]["baseline"]]
    cores = res["params"].get("cores") or 2
    lines = [f"new groups at {ratio:.2f}x the baseline's new-group rate, below the {STORM_TARGET_X:g}x target."]
    new = this["new"]
    per = cpu_per_client(new)
    busy = new["server_cpu"] + new["broker_cpu"] + new["loadgen_cpu"]
    measured = res.get("measured") or {}
    load = f" (load average {_load(measured.get('load_before'))} before the scenario)" if measured else ""
    lines.append(
        f"What a new-group client costs: the server {new['server_cpu'] / new['rate'] * 1e3:.2f} ms of CPU, RabbitMQ "
        f"{new['broker_cpu'] / new['rate'] * 1e3:.2f} ms (the durable binding: a transaction in its metadata "
        f"store), the load generator {new['loadgen_cpu'] / new['rate'] * 1e3:.2f} ms: {per * 1e3:.2f} ms together, "
        f"against {cpu_per_client(base['new']) * 1e3:.2f} ms with the baseline's code. At that cost "
        f"{cores} cores allow at most about {cores / per:,.0f} clients/s with nothing else running, "
        f"{cores / per / base['new']['rate']:.1f}x the baseline's {base['new']['rate']:,.0f}/s; the three used "
        f"{busy:.2f} of the {cores} cores during the storm, other work on the machine the rest{load}.")
    ceiling = this["existing"]["rate"] / base["new"]["rate"]
    if ceiling < STORM_TARGET_X:
        lines.append(
            f"Even with an existing group, where a subscription waits for no binding at all, this code goes at "
            f"{this['existing']['rate']:,.0f}/s, only {ceiling:.2f}x the baseline's new-group rate.")
    lines.append(
        f"New groups reach {this['new']['rate'] / this['existing']['rate']:.0%} of the existing-group rate here "
        f"(baseline: {base['new']['rate'] / base['existing']['rate']:.0%}).")
    return lines


def storm_ratio(res: dict[str, Any]) -> float | None:
    """This checkout's new-group rate over the baseline's (None without a baseline)."""
    baseline = res["params"].get("baseline")
    base = res["median"].get(baseline, {}).get("new") if baseline else None
    this = res["median"].get("this", {}).get("new")
    if not base or not this or not base.get("rate"):
        return None
    return this["rate"] / base["rate"]


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets of issue 12, item 4, in :func:`bench.report.targets`'s form."""
    out = []
    rb = results.get("rebind")
    if rb and "error" not in rb:
        n = rb["params"]["groups"]
        note = "" if n == 10_000 else f" (measured with {n:,} groups, not 10,000)"
        for variant, m in rb["median"].items():
            name = f"rebind, {_VARIANTS[variant]}: 10,000 groups bound and delivering <= {REBIND_TARGET_S:g} s after the reconnect"
            if not m:
                out.append({"target": name, "value": None, "met": None, "shown": "not measured"})
                continue
            rate = f", {m['binds_per_s']:,.0f} binds/s" if m.get("binds_per_s") else ""
            out.append({"target": name, "value": m["delivered_s"], "met": m["delivered_s"] <= REBIND_TARGET_S,
                        "shown": f"{m['delivered_s']:.2f} s (all bound by the node's count at {m['bound_s']:.2f} s"
                                 f"{rate}){note}"})
    st = results.get("storm")
    if st and "error" not in st:
        name = f"storm: new-group connects+subscriptions >= {STORM_TARGET_X:g}x the baseline's rate"
        ratio = storm_ratio(st)
        med = st["median"]
        if ratio is None:
            out.append({"target": name, "value": None, "met": None, "shown": "no baseline measured"})
        else:
            base = st["params"]["baseline"]
            out.append({"target": name, "value": ratio, "met": ratio >= STORM_TARGET_X,
                        "shown": f"{ratio:.2f}x ({med['this']['new']['rate']:,.0f}/s vs {base} "
                                 f"{med[base]['new']['rate']:,.0f}/s; an existing group: "
                                 f"{med['this']['existing']['rate']:,.0f} vs {med[base]['existing']['rate']:,.0f}/s)"})
    return out
