"""The ``deployment`` part of ``benchmarks.scale``: ``enrich-dagster`` at its defaults on the
seeded users, its captioning rate over a steady window, its daemon's sensor ticks, the pages
with runs going, and what the runs left in Dagster's event log."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from benchmarks.bench.deployment import sensor_ticks
from benchmarks.bench.harness import StandInProcess, child_env, free_port
from benchmarks.scale_ui import (
    PageTimes,
    libpq_url,
    load,
    time_pages,
    wait_http,
)
from enrich_pipeline.cli.dagster import environ

# Seconds after the first caption before the window opens: the first runs' start-up.
WARM_UP_S = 60.0


@dataclass
class DeploymentFigures:
    users: int
    rows: int
    rpm: int
    latency: float
    window_s: float
    window_rows: int
    rate: float  # captioned rows/s over the window
    share_of_quota: float
    first_caption_s: float | None
    calls: int
    throttled: int
    ticks: list[dict[str, Any]]
    runs: int
    runs_by_status: dict[str, int]
    users_per_run: list[int]
    partitions: int
    partitions_materialized: int
    # Dagster's event log for the runs, per materialized user: every event of the runs.
    event_bytes_per_user: float
    events_per_user: float
    events_by_type: dict[str, list[int]]  # type -> [count, bytes]
    # Dagster's asset_check_executions rows (one per partition and check, each holding its
    # planned event, which names every partition of the run), per user a run planned.
    check_rows_bytes_per_user: float
    # A finished shared run: from its first materialization to its last check evaluation.
    last_steps_s_per_user: float | None
    pages: PageTimes | None
    load_window: list[float]  # the 1-minute load average at each sample of the window
    timeline: list[tuple[float, int, str]]


def captioned(url: str, namespace: str) -> int:
    query = sql.SQL(
        "SELECT count(*) FROM {} WHERE COALESCE(metadata->>'caption', '') <> ''"
    ).format(sql.Identifier(namespace, "items"))
    with psycopg.connect(url) as conn:
        row = conn.execute(query).fetchone()
    return int(row[0]) if row else 0


def run_deployment(
    env: dict[str, str],
    home: Path,
    standin: StandInProcess,
    url: str,
    namespace: str,
    a: argparse.Namespace,
    *,
    pages: bool,
) -> DeploymentFigures:
    port = free_port()
    log = home / "launcher.log"
    started = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "enrich_pipeline.cli.dagster", "--port", str(port)],
            env=child_env({**env, "PYTHONUNBUFFERED": "1"}),
            cwd=home,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    timeline: list[tuple[float, int, str]] = []
    first: float | None = None
    window: tuple[tuple[float, int], tuple[float, int]] | None = None
    opened: tuple[float, int] | None = None
    page_times: PageTimes | None = None
    total = a.users * a.rows_per_user
    try:
        while proc.poll() is None:
            time.sleep(10)
            done = captioned(url, namespace)
            now = time.monotonic() - started
            timeline.append((round(now, 1), done, load()))
            print(f"    {now:.0f} s: {done:,} captioned (load {load()})", flush=True)
            if first is None and done:
                first = now
            if first is not None and opened is None and now >= first + WARM_UP_S:
                opened = (now, done)
            if opened and (now >= opened[0] + a.window or done >= total):
                window = (opened, (now, done))
                break
            if now > a.window + 1800:
                break
        if pages and proc.poll() is None:
            wait_http(f"http://127.0.0.1:{port}/server_info", 60)
            page_times = time_pages(f"http://127.0.0.1:{port}", first_key="u000000", shots=home)
            print(f"    pages: {page_times.describe(5.0)}", flush=True)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    calls = standin.requests()
    chat = [c for c in calls if c.endpoint == "chat"]
    (t0, n0), (t1, n1) = window or ((0.0, 0), (max(1.0, timeline[-1][0]), timeline[-1][1]))
    rate = (n1 - n0) / max(1e-9, t1 - t0)
    figures = _dagster_figures(env, home)
    return DeploymentFigures(
        users=a.users,
        rows=total,
        rpm=a.rpm,
        latency=a.latency,
        window_s=round(t1 - t0, 1),
        window_rows=n1 - n0,
        rate=round(rate, 2),
        share_of_quota=round(rate / (a.rpm / 60), 3),
        first_caption_s=first,
        calls=len(chat),
        throttled=sum(1 for c in chat if c.status == 429),
        ticks=[asdict(t) for t in sensor_ticks(log.read_text(errors="replace"))],
        pages=page_times,
        load_window=[float(x[2].split()[0]) for x in timeline if t0 <= x[0] <= t1] or [0.0],
        timeline=timeline,
        **figures,
    )


def _dagster_figures(env: dict[str, str], home: Path) -> dict[str, Any]:
    from dagster import AssetKey, DagsterInstance

    with environ(env), DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs()
        statuses: dict[str, int] = {}
        for run in runs:
            statuses[run.status.value] = statuses.get(run.status.value, 0) + 1
        sizes = [
            int(r.tags["enrich/users"].split(" ", 1)[0])
            for r in runs
            if r.tags.get("enrich/users", "").split(" ", 1)[0].isdigit()
        ]
        materialized = len(instance.get_materialized_partitions(AssetKey("enriched_items")))
        partitions = len(instance.get_dynamic_partitions("users"))
    with psycopg.connect(libpq_url(env["DAGSTER_PG_URL"])) as c:
        by_type = {
            str(t): [int(n), int(b)]
            for t, n, b in c.execute(
                "SELECT coalesce(dagster_event_type, 'log'), count(*),"
                " sum(octet_length(e.event)) FROM event_logs e WHERE run_id <> ''"
                " GROUP BY 1 ORDER BY 3 DESC"
            )
        }
        spans = c.execute(
            "SELECT count(*) FILTER (WHERE dagster_event_type = 'ASSET_MATERIALIZATION'),"
            " extract(epoch FROM max(timestamp) FILTER (WHERE dagster_event_type ="
            " 'ASSET_CHECK_EVALUATION') - min(timestamp) FILTER (WHERE dagster_event_type ="
            " 'ASSET_MATERIALIZATION')) FROM event_logs WHERE run_id <> '' GROUP BY run_id"
        ).fetchall()
        check_bytes, check_users = c.execute(
            "SELECT coalesce(sum(octet_length(evaluation_event)), 0),"
            " count(DISTINCT (run_id, partition)) FROM asset_check_executions"
        ).fetchone() or (0, 0)
    users = sum(v[0] for k, v in by_type.items() if k == "ASSET_MATERIALIZATION")
    shared = [(n, float(s)) for n, s in spans if n and n > 1 and s is not None]
    return {
        "runs": len(runs),
        "runs_by_status": statuses,
        "users_per_run": sizes,
        "partitions": partitions,
        "partitions_materialized": materialized,
        "event_bytes_per_user": round(sum(b for _, b in by_type.values()) / max(1, users)),
        "events_per_user": round(sum(n for n, _ in by_type.values()) / max(1, users), 1),
        "events_by_type": by_type,
        "check_rows_bytes_per_user": round(int(check_bytes) / max(1, int(check_users))),
        "last_steps_s_per_user": (
            round(sum(s for _, s in shared) / sum(n for n, _ in shared), 3) if shared else None
        ),
    }
