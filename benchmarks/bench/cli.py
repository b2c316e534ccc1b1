"""``python -m benchmarks.bench``: the flags, the run, the printed table and ``bench.json``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import benchmarks.bench
from benchmarks.bench.harness import REPO, Bench
from benchmarks.bench.plan import DEFAULT_RPM, EXTRA_SCENARIOS, SCENARIOS, Plan
from benchmarks.bench.report import build_report
from benchmarks.bench.scenarios import run_scenarios
from benchmarks.bench.table import render


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench",
        description=benchmarks.bench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="short run (N=200, L=0.1 s, ...)")
    p.add_argument(
        "--scenarios",
        help=f"comma-separated, from {','.join(SCENARIOS)} (default: all of these) "
        f"and {','.join(EXTRA_SCENARIOS)}",
    )
    p.add_argument("--n", type=int, help="items per throughput run (2000; quick 200)")
    p.add_argument("--concurrent", type=int, default=16, help="calls in flight C (16)")
    p.add_argument(
        "--latency", type=float, help="stand-in latency per vision call L, s (2; quick 0.5)"
    )
    p.add_argument(
        "--embedding-latency",
        type=float,
        help="stand-in latency per embeddings call, s (0.3; quick 0.1)",
    )
    p.add_argument(
        "--no-per-second",
        action="store_true",
        help="the stand-in enforces the quota per minute only (default: per second too)",
    )
    p.add_argument("--users", type=int, help="users of the 'users' scenario (10,000; quick 500)")
    p.add_argument(
        "--users-timeout", type=float, default=5400.0, help="seconds the 'users' scenario may take"
    )
    p.add_argument("--batch-size", type=int, help="items per chunk (200; quick 50)")
    p.add_argument(
        "--rpm",
        type=int,
        default=DEFAULT_RPM,
        help=f"client limit DASHSCOPE_RPM for throughput runs ({DEFAULT_RPM}; 0 = off)",
    )
    p.add_argument("--legacy-n", type=int, help="items for the legacy run at the same settings")
    p.add_argument("--legacy-defaults-n", type=int, help="items for the runs at legacy defaults")
    p.add_argument("--memory-n", help="small,large N of the memory runs (1000,20000)")
    p.add_argument("--memory-latency", type=float, default=0.0, help="latency of memory runs")
    p.add_argument("--ratelimit-rpm", type=int, help="stand-in and client limit (600; quick 300)")
    p.add_argument("--ratelimit-seconds", type=float, help="intended run length (75; quick 20)")
    p.add_argument(
        "--ratelimit-captions-only",
        action="store_true",
        help="no embedding calls in the rate-limit run (only the limit of DASHSCOPE_RPM)",
    )
    p.add_argument("--sensor-rows", type=int, help="rows of the sensor table (1,000,000)")
    p.add_argument("--sensor-ticks", type=int, help="timed sensor ticks (10)")
    p.add_argument("--cpu-images", type=int, help="distinct 1600x1200 photos (12)")
    p.add_argument("--cpu-rounds", type=int, help="passes over them (3)")
    p.add_argument("--database-url", help="use this PostgreSQL instead of a fresh embedded one")
    p.add_argument(
        "--json",
        default=str(REPO / "artifacts" / "bench.json"),
        help="where to write the results (artifacts/bench.json)",
    )
    p.add_argument("--worker-timeout", type=float, help="seconds a scenario may take (none)")
    p.add_argument(
        "--preload",
        action="store_true",
        help="fork scenarios from a process with the pipeline imported: faster, for smoke "
        "runs only (peak RSS then includes every preloaded module)",
    )
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    args = parse_args(argv)
    plan = Plan.from_args(args)
    started = time.monotonic()
    bench = Bench(plan, args.database_url, out, args.worker_timeout, args.preload)
    try:
        results = run_scenarios(bench)
    finally:
        bench.close()
    report = build_report(plan, results)
    print("", file=out)
    render(report, out)
    elapsed = time.monotonic() - started
    print(
        f"\nbenchmark took {elapsed:.0f} s on {os.cpu_count()} CPU(s), load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        file=out,
    )
    document = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "elapsed_s": elapsed,
        "machine": {
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "plan": dataclasses.asdict(plan),
        "workers": "forked from a preloaded server" if args.preload else "fresh processes",
        "figures": [vars(f) for f in report.figures],
        "notes": report.notes,
        "results": results.to_json(),
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, default=str))
    print(f"results written to {path}", file=out)
    missed = any(f.verdict == "MISS" for f in report.figures)
    return 1 if args.strict and missed else 0
