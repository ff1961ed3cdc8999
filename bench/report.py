"""Tables, targets and ``bench/RESULTS.md`` from the scenarios' results."""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import rebind_report

#: a process using more than this share of a core was probably the bottleneck
BUSY = 0.9


def machine(rabbitmq: str) -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    versions = {}
    for pkg in ("towerws", "twisted", "autobahn", "txamqp", "picows", "uvloop"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kib / (1 << 20), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "rabbitmq": rabbitmq,
        **versions,
    }


def _get(d: dict[str, Any] | None, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def targets(results: dict[str, Any], cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of issue 7 with the measured value and met / NOT met (None: not measured)."""
    out = []

    def add(name: str, value: Any, met: bool | None, shown: str) -> None:
        out.append({"target": name, "value": value, "met": met, "shown": shown})

    fan = _get(results, "fanout", "1000", "median")
    ceil = _get(results, "ceiling", "1000", "median")
    if fan and ceil and ceil.get("max_fps"):
        frac = fan["max_fps"] / ceil["max_fps"]
        per_core = per_core_fraction(fan, ceil)
        add("fanout C=1,000: >= 50% of the ceiling's delivered frames/s", frac, frac >= 0.5,
            f"{frac:.0%} ({fan['max_fps']:,.0f} vs {ceil['max_fps']:,.0f} frames/s)"
            + (f"; per server core {per_core:.0%}" if per_core is not None else ""))
    else:
        add("fanout C=1,000: >= 50% of the ceiling's delivered frames/s", None, None, "not measured")
    if fan:
        lost = _get(fan, "half", "lost")
        p99 = _get(fan, "half", "p99_ms")
        add("fanout C=1,000: zero loss", lost, lost == 0, f"{lost} lost at half rate; max rate passed with 0 lost")
        add("fanout C=1,000: p99 <= 50 ms at half the maximum rate", p99, p99 is not None and p99 <= 50,
            f"{p99:.1f} ms" if p99 is not None else "not measured")
    many = _get(results, "many-groups", "1000", "median")
    if many:
        rate = many["max_rate"]
        add("many-groups C=1,000: >= 20,000 messages/s, zero loss", rate, rate >= 20_000, f"{rate:,.0f} messages/s")
    idle = _get(results, "idle", "median")
    if idle:
        kib = idle["kib_per_connection"]
        n = idle["connections"]
        note = "" if n == 10_000 else f" (measured at C={n:,}, not 10,000)"
        add("idle: <= 20 KiB RSS per connection at C=10,000", kib, kib <= 20, f"{kib:.1f} KiB{note}")
    slow = results.get("slow-client")
    if slow:
        med = slow["median"]
        k = slow["params"]["stalled"]
        ratio = med["p99_ratio"]
        add(f"slow-client: normal clients' p99 within 1.5x with {k} stalled", ratio, ratio <= 1.5,
            f"{ratio:.2f}x ({med['baseline']['p99_ms']:.1f} -> {med['stalled']['p99_ms']:.1f} ms)")
        limit = k * 4 + 50
        growth = med["rss_growth_mib"]
        add(f"slow-client: server RSS growth <= {k} x 4 MiB + 50 MiB", growth, growth <= limit,
            f"{growth:.0f} MiB (limit {limit} MiB)")
        fewest = min(r["stalled_disconnected"] for r in slow["runs"])
        add("slow-client: every stalled client disconnected", fewest, fewest == k,
            f"{fewest}/{k} in the worst run")
    conn = results.get("connect")
    if conn:
        rate = conn["median"]["rate"]
        add("connect: >= 2,500 handshakes+subscriptions/s", rate, rate >= 2500, f"{rate:,.0f}/s")
    out += rebind_report.targets(results)
    return out


def per_core(m: dict[str, Any]) -> float | None:
    """Delivered frames per second of server CPU: what the server spends, whoever else was the limit."""
    cpu = m.get("server_cpu")
    return m["max_fps"] / cpu if cpu else None


def per_core_fraction(fan: dict[str, Any], ceil: dict[str, Any]) -> float | None:
    a, b = per_core(fan), per_core(ceil)
    return a / b if a is not None and b else None


# -- tables ----------------------------------------------------------------------------


def _fmt(v: Any, spec: str = ",.0f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def tables(name: str, res: dict[str, Any], all_results: dict[str, Any]) -> list[tuple[list[str], list[list[str]]]]:
    """(header, rows) tables of one scenario's medians."""
    if name in rebind_report.NAMES:
        return rebind_report.tables(name, res)
    if name in ("fanout", "ceiling", "many-groups"):
        head = ["C", "max msg/s", "frames/s", "server CPU", "loadgen CPU", "feed CPU", "broker CPU",
                "frames/s per server core", "peak RSS MiB", "half-rate p50 ms", "p99 ms", "max ms", "lost"]
        if name == "fanout":
            head += ["of ceiling", "of ceiling per core"]
        rows = []
        for c in res["params"]["sizes"]:
            m = _get(res, str(c), "median") or {}
            if not m:
                rows.append([str(c), "no passing rate"] + [""] * (len(head) - 2))
                continue
            busy = " (busy)" if m.get("loadgen_cpu", 0) > BUSY else ""
            row = [
                f"{c:,}", _fmt(m["max_rate"]), _fmt(m["max_fps"]), _fmt(m["server_cpu"], ".2f"),
                _fmt(m["loadgen_cpu"], ".2f") + busy, _fmt(m["feed_cpu"], ".2f"),
                _fmt(m.get("broker_cpu"), ".2f") if name != "ceiling" else "-", _fmt(per_core(m)),
                _fmt(m["peak_rss_mib"], ".0f"),
                _fmt(m["half"]["p50_ms"], ".1f"), _fmt(m["half"]["p99_ms"], ".1f"), _fmt(m["half"]["max_ms"], ".1f"),
                _fmt(m["half"]["lost"]),
            ]
            if name == "fanout":
                ceil_m = _get(all_results, "ceiling", str(c), "median")
                fraction = per_core_fraction(m, ceil_m) if ceil_m else None
                row.append(f"{m['max_fps'] / ceil_m['max_fps']:.0%}" if ceil_m else "-")
                row.append(f"{fraction:.0%}" if fraction is not None else "-")
            rows.append(row)
        return [(head, rows)]
    if name == "idle":
        head = ["run", "connections", "RSS before MiB", "RSS after MiB", "KiB per connection", "connect/s"]
        rows = [[str(i + 1), f"{r['connections']:,}", _fmt(r["rss_before_mib"], ".1f"), _fmt(r["rss_after_mib"], ".1f"),
                 _fmt(r["kib_per_connection"], ".1f"), _fmt(r["connect_rate"])] for i, r in enumerate(res["runs"])]
        m = res["median"]
        rows.append(["median", f"{m['connections']:,.0f}", _fmt(m["rss_before_mib"], ".1f"),
                     _fmt(m["rss_after_mib"], ".1f"), _fmt(m["kib_per_connection"], ".1f"), _fmt(m["connect_rate"])])
        return [(head, rows)]
    if name == "connect":
        head = ["run", "clients", "handshakes+subscriptions/s", "server CPU", "loadgen CPU", "failed"]
        rows = [[str(i + 1), f"{r['clients']:,}", _fmt(r["rate"]), _fmt(r["server_cpu"], ".2f"),
                 _fmt(r["loadgen_cpu"], ".2f"), str(r["failed"])] for i, r in enumerate(res["runs"])]
        m = res["median"]
        rows.append(["median", f"{m['clients']:,.0f}", _fmt(m["rate"]), _fmt(m["server_cpu"], ".2f"),
                     _fmt(m["loadgen_cpu"], ".2f"), _fmt(m["failed"])])
        return [(head, rows)]
    if name == "slow-client":
        head = ["run", "phase", "p50 ms", "p99 ms", "max ms", "lost", "server CPU", "RSS growth MiB",
                "stalled disconnected", "after s", "close codes"]
        rows = []
        k = res["params"]["stalled"]
        for i, r in enumerate(res["runs"]):
            for phase in ("baseline", "stalled"):
                p = r[phase]
                stalled = phase == "stalled"
                rows.append([
                    str(i + 1), phase, _fmt(p["p50_ms"], ".1f"), _fmt(p["p99_ms"], ".1f"), _fmt(p["max_ms"], ".1f"),
                    str(p["lost"]), _fmt(p["server_cpu"], ".2f"), _fmt(p["rss_growth_mib"], ".0f"),
                    f"{r['stalled_disconnected']}/{k}" if stalled else "",
                    " ".join(str(x) for x in r["disconnect_after_s"]) if stalled else "",
                    " ".join(str(x) for x in r["close_codes"]) if stalled else "",
                ])
        return [(head, rows)]
    return []


def notes(name: str, res: dict[str, Any]) -> list[str]:
    """Lines shown under a scenario's table."""
    if name in rebind_report.NAMES:
        return rebind_report.notes(name, res)
    if name != "slow-client":
        return []
    return [f"server RSS (MiB) over the stalled phase, run {i + 1}: "
            + ", ".join(f"{t:.1f}s {mib:.0f}" for t, mib in r["rss_series"][:: max(1, len(r["rss_series"]) // 12)])
            for i, r in enumerate(res["runs"])]


def text_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(x).rjust(w) for x, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def summary_line(name: str, res: dict[str, Any]) -> str:
    """The scenario's one JSON line: its parameters and medians."""
    if name in ("fanout", "ceiling", "many-groups"):
        med = {c: _get(res, str(c), "median") for c in res["params"]["sizes"]}
        med = {c: {k: v for k, v in (m or {}).items() if k != "trials"} for c, m in med.items()}
        return json.dumps({"scenario": name, "params": res["params"], "median": med})
    return json.dumps({"scenario": name, "params": res["params"], "median": res["median"]})


# -- RESULTS.md ------------------------------------------------------------------------

_METHOD = """\
## Method

- One `twistd towerws` process (static-token auth, `--listen tcp:PORT:interface=127.0.0.1:backlog=1024`,
  defaults otherwise), a fresh exchange and node id per server (`bench-<random>`, deleted afterwards).
- Load generator: `bench/loadgen.py`, one process, picows + uvloop; its CPU use is in every table
  ("busy" when above 0.9 cores: then it, not the server, may have been the limit).
- Feed: `bench/publisher.py`, a raw AMQP 0-9-1 publisher (no confirms) in its own process;
  bodies of 200 bytes `{{"seq": N, "t": <send time, us>, "pad": "..."}}`, content type JSON.
  The ceiling (`bench/ceiling.py`) makes the same bodies in-process.
- Latency: from the message's *scheduled* send time to its receipt by the client (one clock).
- Maximum rate: an overload probe estimates the capacity, then trials of {trial}s step and bisect;
  a trial passes when every client got every message (zero loss), the
  feed reached 97% of the asked rate and p99 latency stayed under {limit:.0f} ms.
  "half-rate" columns are a trial at half that maximum.
- CPU in cores (1.00 = one core busy), server CPU and peak RSS (VmHWM, reset before each trial) from /proc.
- Each number is the median of {runs} run(s).
"""


def relative_paths(obj: Any, root: Path) -> Any:
    """``obj`` (JSON data) with ``root/`` cut out of every string: paths relative to the checkout.

    Results are committed; the absolute path of whoever ran the bench means nothing elsewhere.
    """
    prefix = f"{root}/"
    if isinstance(obj, str):
        return obj.replace(prefix, "")
    if isinstance(obj, list):
        return [relative_paths(x, root) for x in obj]
    if isinstance(obj, dict):
        return {k: relative_paths(v, root) for k, v in obj.items()}
    return obj


def checkout_of(doc: dict[str, Any]) -> Path:
    """The checkout a results document was made in (its log folder is ``<checkout>/bench/logs``)."""
    logdir = Path(str(doc.get("config", {}).get("logdir", "")))
    return logdir.parent.parent if logdir.is_absolute() else Path(__file__).resolve().parent.parent


#: the soak's page, linked from the results page when it exists
SOAK_PAGE = "SOAK.md"


#: the page's hand-written part (what stands in the way of unmet targets), kept across renderings
NOTES_PAGE = "RESULTS-notes.md"


def _hand_written_notes(path: Path) -> list[str]:
    notes_file = path.parent / NOTES_PAGE
    if path.name != "RESULTS.md" or not notes_file.exists():
        return []
    return [notes_file.read_text().rstrip(), ""]


def write_markdown(path: Path, doc: dict[str, Any]) -> None:
    doc = relative_paths(doc, checkout_of(doc))
    m = doc["machine"]
    parts = [
        "# towerws benchmark results",
        "",
        f"Generated by `{doc['command']}` on {doc['date']} ({doc['elapsed_s']:.0f} s"
        + (", **quick mode: 1 run, small sizes, numbers only indicative**" if doc["config"]["quick"] else "")
        + ").",
        "",
        *([f"**Note:** {doc['note']}", ""] if doc.get("note") else []),
        *([f"Long-running behaviour (memory, open files, groups, bindings under client churn): "
           f"[the soak]({SOAK_PAGE}).", ""] if (path.parent / SOAK_PAGE).exists() else []),
        "## Machine",
        "",
        f"- CPU: {m['cpu']}, {m['cores']} cores; RAM {m['ram_gib']} GiB; Linux {m['kernel']}",
        f"- Python {m['python']}, Twisted {m['twisted']}, Autobahn {m['autobahn']}, txAMQP {m['txamqp']}, "
        f"RabbitMQ {m['rabbitmq']}; load generator picows {m['picows']}, uvloop {m['uvloop']}",
        f"- towerws {m['towerws']} at commit {doc.get('commit', '?')}",
        "",
        "## Targets",
        "",
        md_table(["target", "measured", "met"],
                 [[t["target"], t["shown"], "met" if t["met"] else ("NOT met" if t["met"] is False else "-")]
                  for t in doc["targets"]]),
        "",
        *plot_section(doc, path),
        *_hand_written_notes(path),
    ]
    for name, res in doc["results"].items():
        parts += [f"## {name}", ""]
        if "error" in res:
            parts += [f"Failed: `{res['error']}`", ""]
            continue
        params = ", ".join(f"{k} {v}" for k, v in res.get("params", {}).items())
        parts += [f"Parameters: {params}.", ""]
        for head, rows in tables(name, res, doc["results"]):
            parts += [md_table(head, rows), ""]
        parts += [f"- {line}" for line in notes(name, res)] + [""] * bool(notes(name, res))
        if "profile" in res:
            parts += _profile_md(name, res["profile"])
    parts.append(_METHOD.format(trial=doc["config"]["trial_duration"], limit=doc["config"]["latency_limit"] * 1e3,
                                runs=doc["config"]["runs"]))
    path.write_text("\n".join(parts))


# -- plots -----------------------------------------------------------------------------

#: scenarios with a rate search, in the order they are drawn, and their colours
_RATE_SCENARIOS = (("fanout", "towerws fanout", "tab:blue"), ("ceiling", "ceiling (plain Twisted)", "tab:gray"),
                   ("many-groups", "towerws many-groups", "tab:orange"))


def plot_section(doc: dict[str, Any], page: Path) -> list[str]:
    """Draw the figures next to ``page`` (``<stem>-frames.png``, ...); the markdown that shows them."""
    from bench import plots

    results = doc["results"]
    drawn: list[tuple[str, Path]] = []
    try:
        figures = (("frames", "Delivered frames/s against clients (towerws vs the ceiling)", _plot_frames),
                   ("latency", "End-to-end latency at half the maximum rate, and in slow-client", _plot_latency),
                   ("slow-client-rss", "Server RSS while 10 clients stall (slow-client)", _plot_slow_rss))
        for suffix, title, draw in figures:
            path = page.parent / f"{page.stem}-{suffix}.png"
            if draw(results, path):
                drawn.append((title, path))
    except ImportError as exc:
        return ["## Plots", "", f"Not drawn: {exc} (`pip install -e '.[bench]'`).", ""]
    if not drawn:
        return []
    out = ["## Plots", ""]
    for title, path in drawn:
        out += [f"![{title}]({plots.link(path, page)})", ""]
    return out


def _rate_points(results: dict[str, Any], name: str, key: str) -> tuple[list[int], list[float], list[list[float]]]:
    """Sizes, medians and every run's value of ``key`` (e.g. ``max_fps``) of a rate-search scenario."""
    res = results.get(name) or {}
    sizes, medians, runs = [], [], []
    for c in (res.get("params") or {}).get("sizes", []):
        m = _get(res, str(c), "median")
        if not m or key not in m:
            continue
        sizes.append(c)
        medians.append(m[key])
        runs.append([r[key] for r in _get(res, str(c), "runs") or [] if r.get("found")])
    return sizes, medians, runs


def _plot_frames(results: dict[str, Any], path: Path) -> bool:
    from bench.plots import WIDTH, pyplot, save

    if not any(results.get(n) and "error" not in results[n] for n, _, _ in _RATE_SCENARIOS):
        return False
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(WIDTH, 4.0))
    for name, label, colour in _RATE_SCENARIOS:
        sizes, medians, runs = _rate_points(results, name, "max_fps")
        if not sizes:
            continue
        left.plot(sizes, medians, marker="o", color=colour, label=f"{label} (median)")
        for c, values in zip(sizes, runs, strict=True):
            left.scatter([c] * len(values), values, color=colour, alpha=0.35, s=12)
        per = [(c, m.get("max_fps", 0) / m["server_cpu"]) for c in sizes
               if (m := _get(results, name, str(c), "median")) and m.get("server_cpu")]
        right.plot([c for c, _ in per], [v for _, v in per], marker="o", color=colour, label=label)
    left.set_title("delivered frames/s at the highest passing rate\n(dots: each run)", fontsize=9)
    right.set_title("frames/s per server core\n(delivered frames/s / server CPU)", fontsize=9)
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xlabel("clients C")
        ax.grid(alpha=0.3, which="both")
        ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v / 1000:,.0f}k"))
        ax.legend(fontsize=8)
        ax.set_ylim(bottom=0)
    fig.tight_layout()
    save(fig, path)
    return True


def _plot_latency(results: dict[str, Any], path: Path) -> bool:
    from bench.plots import WIDTH, pyplot, save

    labels: list[str] = []
    rows: list[tuple[float, float, float]] = []
    for name, _, _ in _RATE_SCENARIOS:
        for c in (_get(results, name, "params") or {}).get("sizes", []):
            half = _get(results, name, str(c), "median", "half")
            if half:
                labels.append(f"{name}\nC={c:,}")
                rows.append((half["p50_ms"], half["p99_ms"], half["max_ms"]))
    slow = _get(results, "slow-client", "median")
    if slow:
        for phase in ("baseline", "stalled"):
            p = slow[phase]
            labels.append(f"slow-client\n{phase}")
            rows.append((p["p50_ms"], p["p99_ms"], p["max_ms"]))
    if not rows:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(WIDTH, 4.2))
    width = 0.27
    for k, (stat, colour) in enumerate((("p50", "tab:green"), ("p99", "tab:orange"), ("max", "tab:red"))):
        xs = [i + (k - 1) * width for i in range(len(rows))]
        ax.bar(xs, [r[k] for r in rows], width, label=stat, color=colour)
    ax.axhline(50, color="k", linestyle=":", linewidth=1, label="fanout C=1,000 p99 target (50 ms)")
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("ms (log scale)")
    ax.set_title("end-to-end latency, scheduled send to receipt (medians of the runs): at half the maximum "
                 "rate; slow-client at its fixed rate", fontsize=9)
    ax.grid(alpha=0.3, axis="y", which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, path)
    return True


def _plot_slow_rss(results: dict[str, Any], path: Path) -> bool:
    from bench.plots import WIDTH, pyplot, save

    slow = results.get("slow-client")
    if not slow or "error" in slow or not any(r.get("rss_series") for r in slow["runs"]):
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(WIDTH, 3.2))
    start = None
    for i, r in enumerate(slow["runs"]):
        series = r.get("rss_series") or []
        ax.plot([t for t, _ in series], [m for _, m in series], label=f"run {i + 1}")
        start = series[0][1] if series and start is None else start
    k = slow["params"]["stalled"]
    if start is not None:
        ax.axhline(start + k * 4 + 50, color="k", linestyle=":", linewidth=1,
                   label=f"growth limit ({k} x 4 MiB + 50 MiB above run 1's start)")
    ax.set_xlabel("seconds into the stalled phase")
    ax.set_ylabel("server RSS (MiB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, path)
    return True


def _profile_md(name: str, prof: dict[str, Any]) -> list[str]:
    if "error" in prof:
        return [f"Profile failed: {prof['error']}", ""]
    return [
        f"Profile of the server during a C=1,000 {name} trial at the maximum rate "
        f"(`{prof['command']}`; trial: {prof['trial']}), shares of the busy samples:", "",
        md_table(["function (self time)", "share"], [[f"`{f}`", f"{p}%"] for f, p in prof.get("self", [])]), "",
        md_table(["file (self time)", "share"], [[f"`{f}`", f"{p}%"] for f, p in prof.get("self_by_file", [])]), "",
        md_table(["function (inclusive)", "share"], [[f"`{f}`", f"{p}%"] for f, p in prof.get("inclusive", [])]), "",
    ]


def main(argv: list[str] | None = None) -> int:
    """Render a results page again from a results JSON (e.g. after adding a note)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.report", description=main.__doc__)
    parser.add_argument("results", type=Path, help="results JSON written by bench.run")
    parser.add_argument("markdown", type=Path, help="page to write, e.g. bench/RESULTS.md")
    parser.add_argument("--note", help="a remark shown under the title (how the machine was used, ...)")
    args = parser.parse_args(argv)
    doc = json.loads(args.results.read_text())
    if args.note is not None:
        doc["note"] = args.note
        args.results.write_text(json.dumps(doc, indent=1))
    write_markdown(args.markdown, doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
