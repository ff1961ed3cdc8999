"""Run the benchmark scenarios: ``python -m bench.run [--quick] [--scenario NAME ...] [--profile]``.

Each scenario prints one JSON line and a readable table; at the end the results
go to ``--out`` (JSON) and ``--markdown`` (``bench/RESULTS.md`` for a full run).
Servers, load generators and publishers are child processes stopped at the end,
and each server's exchange and queue are deleted, even when a scenario fails.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench import report
from bench.procs import ROOT, BenchError, ensure_broker, rabbitmq_version, raise_nofile
from bench.rebind import SCENARIOS as REBIND_SCENARIOS
from bench.scenarios import SCENARIOS as BASE_SCENARIOS, Config

SCENARIOS = {**BASE_SCENARIOS, **REBIND_SCENARIOS}

DEFAULT_AMQP = "amqp://guest:guest@127.0.0.1:5672/%2F"


def git_commit() -> str:
    """``git describe --always --dirty`` of the checkout ("?" without git)."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=ROOT,
                             timeout=10)
    except OSError:
        return "?"
    return out.stdout.strip() or "?"


def doc_head(module: str, argv: list[str] | None, note: str | None, broker: str) -> dict[str, Any]:
    """The first fields of a results document: the exact command, the note, when, which commit, what machine."""
    args = argv if argv is not None else sys.argv[1:]
    return {
        "command": f"python -m {module} {' '.join(shlex.quote(a) for a in args)}".strip(),
        "note": note,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "machine": report.machine(broker),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 run each, smaller sizes (development)")
    parser.add_argument("--scenario", action="append", choices=list(SCENARIOS), metavar="NAME",
                        help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}")
    parser.add_argument("--runs", type=int, help="runs per measurement (default 3, quick 1)")
    parser.add_argument("--sizes", type=int, nargs="+", metavar="C",
                        help="client counts for fanout, ceiling and many-groups (default 100 1000 5000)")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy the server during C=1,000 fanout and many-groups trials at the maximum rate")
    parser.add_argument("--baseline", metavar="REV",
                        help="commit the storm scenario compares against (default 39d096b; none: skip it)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other scenarios' results already in --out and render the page from all "
                             "(each scenario says when and how it was measured)")
    parser.add_argument("--note", help="a remark shown under the title of the results page")
    parser.add_argument("--amqp-url", default=DEFAULT_AMQP)
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results-latest.json, "
                                                  "quick: bench/results-quick.json)")
    parser.add_argument("--markdown", type=Path, help="results page (default bench/RESULTS.md, "
                                                       "quick: bench/RESULTS-quick.md)")
    parser.add_argument("--logs", type=Path, default=ROOT / "bench" / "logs", help="server and client logs")
    args = parser.parse_args(argv)

    raise_nofile()
    args.logs.mkdir(parents=True, exist_ok=True)
    cfg = Config.make(args.amqp_url, args.logs, args.quick)
    if args.runs:
        cfg.runs = args.runs
    cfg.profile = args.profile
    if args.sizes:
        cfg.fanout_sizes = cfg.many_groups_sizes = args.sizes
    if args.baseline:
        cfg.storm_baseline = None if args.baseline == "none" else args.baseline
    names = args.scenario or list(SCENARIOS)
    out = args.out or ROOT / "bench" / ("results-quick.json" if args.quick else "results-latest.json")
    markdown = args.markdown or ROOT / "bench" / ("RESULTS-quick.md" if args.quick else "RESULTS.md")

    try:
        ensure_broker(cfg.amqp_url)
        broker = rabbitmq_version(cfg.amqp_url)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    started = doc_head("bench.run", argv, args.note, broker)
    doc: dict[str, Any] = {
        **started,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()},
        "results": {},
    }
    if args.merge and out.exists():
        # The page stays the earlier run's, with this run's scenarios replaced or added.
        earlier = json.loads(out.read_text())
        doc = {**earlier, "note": args.note or earlier.get("note"),
               "config": {**doc["config"], **earlier["config"]}}
    print(f"machine: {json.dumps(doc['machine'])}", flush=True)
    t0 = time.monotonic()
    failed = False
    for name in names:
        print(f"\n== {name}", flush=True)
        # The machine is shared: its load average before and after goes with each result.
        measured = {"command": started["command"], "date": started["date"], "commit": started["commit"],
                    "cpu": started["machine"]["cpu"], "cores": started["machine"]["cores"],
                    "load_before": [round(x, 2) for x in os.getloadavg()]}
        try:
            res = SCENARIOS[name](cfg)
        except (BenchError, OSError) as exc:
            # A failed scenario is reported and the others still run; the exit status says so.
            traceback.print_exc()
            doc["results"][name] = {"error": str(exc)}
            failed = True
            continue
        measured["load_after"] = [round(x, 2) for x in os.getloadavg()]
        res["measured"] = measured
        doc["results"][name] = res
        print(report.summary_line(name, res))
        for head, rows in report.tables(name, res, doc["results"]):
            print(report.text_table(head, rows))
        for line in report.notes(name, res):
            print(f"  {line}")
        if "profile" in res:
            _print_profile(res["profile"])
    if not args.merge or "elapsed_s" not in doc:
        doc["elapsed_s"] = time.monotonic() - t0
    doc["targets"] = report.targets(doc["results"], doc["config"])
    print("\n== targets")
    for t in doc["targets"]:
        verdict = "met" if t["met"] else ("NOT met" if t["met"] is False else "-")
        print(f"  {verdict:8} {t['target']}: {t['shown']}")
    doc = report.relative_paths(doc, ROOT)
    out.write_text(json.dumps(doc, indent=1))
    report.write_markdown(markdown, doc)
    print(f"\nresults: {out}, {markdown} ({doc['elapsed_s']:.0f} s)")
    return 1 if failed else 0


def _print_profile(prof: dict[str, Any]) -> None:
    print("\n  profile of the server:", prof.get("command", ""))
    if "error" in prof:
        print(f"  {prof['error']}")
        return
    print(f"  trial: {prof['trial']}")
    titles = {"self": "functions, self time", "self_by_file": "files, self time",
              "inclusive": "functions, inclusive time (below 90%)"}
    for kind, title in titles.items():
        print(f"  top {title} ({prof['samples']} busy samples):")
        for func, share in prof.get(kind, []):
            print(f"    {share:5.1f}%  {func}")


if __name__ == "__main__":
    sys.exit(main())
