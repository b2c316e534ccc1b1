"""The ``users`` scenario: the deployment (``enrich-dagster`` at its defaults) on many users.

Webserver, daemon, sensor and queue as a user starts them, on ``--users`` users with 3 pending
rows each: time until every row is captioned, runs, sensor ticks (from the sensor's own log
line), materializations per partition, 429s.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from benchmarks.bench.harness import Bench, child_env, free_port
from benchmarks.bench.plan import Plan
from benchmarks.bench.records import CallCount, Deployment, SensorTick, Spread, UsersRun
from enrich_pipeline.db.samples import create_sample_table


def users(bench: Bench, p: Plan) -> UsersRun:
    """``enrich-dagster`` at its defaults on ``p.users`` users with 3 pending rows each."""
    per_user = 3
    total = p.users * per_user
    bench.say(
        f"[users] {p.users:,} users x {per_user} rows, enrich-dagster at its defaults, "
        f"L={p.latency:g} s / {p.embedding_latency:g} s, stand-in {p.rpm} rpm"
        f"{' per second' if p.per_second else ''}"
    )
    images = bench.images(p.memory_image_size, total)
    namespace = f"bench_{uuid.uuid4().hex[:10]}"
    dbname = f"dagster_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(bench.database_url) as conn:
        create_sample_table(conn, namespace, "items")
        copy = sql.SQL("COPY {} (user_id, image, status, metadata) FROM STDIN").format(
            sql.Identifier(namespace, "items")
        )
        with conn.cursor() as cur, cur.copy(copy) as out:
            for n, path in enumerate(images):
                user = f"u{n // per_user:05d}"
                out.write_row((user, str(path), "active", json.dumps({"n": n})))
    from enrich_pipeline.cli.dagster import dagster_url_for, ensure_database
    from enrich_pipeline.defs.instance import INSTANCE_YAML

    ensure_database(bench.database_url, dbname)
    home = bench.tmp / f"users_{dbname}"
    (home / "dagster_home").mkdir(parents=True)
    shutil.copy(INSTANCE_YAML, home / "dagster_home" / "dagster.yaml")
    standin = bench.standin(p.latency, p.rpm or None, p.embedding_latency, p.per_second)
    env = child_env(
        {
            **bench.pipeline_env(namespace, standin.base_url, p.rpm),
            "DAGSTER_HOME": str(home / "dagster_home"),
            "DAGSTER_PG_URL": dagster_url_for(bench.database_url, dbname),
            "ENRICH_HOME": str(home),
            "PYTHONUNBUFFERED": "1",
        }
    )
    port = free_port()
    log = home / "launcher.log"
    started = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "enrich_pipeline.cli.dagster", "--port", str(port)],
            env=env,
            cwd=home,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    timeline: list[tuple[float, int]] = []
    done = 0
    try:
        while True:
            time.sleep(10)
            done = bench.captioned(namespace)
            elapsed = time.monotonic() - started
            timeline.append((round(elapsed, 1), done))
            if len(timeline) % 6 == 0 or done == total:
                bench.say(f"    {elapsed:.0f} s: {done:,} / {total:,} captioned")
            if done >= total or elapsed > p.users_timeout or proc.poll() is not None:
                break
        wall = time.monotonic() - started
        deployment = _deployment(env, home)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        bench.drop(namespace)
        with psycopg.connect(bench.database_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
            )
    requests = standin.requests()
    ticks = sensor_ticks(log.read_text(errors="replace"))
    throttled = sum(1 for r in requests if r.status == 429)
    first_done = next((t for t, n in timeline if n >= total), None)
    result = UsersRun(
        users=p.users,
        rows=total,
        done=done,
        uncaptioned=total - done,
        complete=done == total,
        wall_s=wall,
        all_captioned_after_s=first_done,
        bound_s=total / (p.rpm / 60) if p.rpm else None,
        timeline=timeline,
        share_429=throttled / len(requests) if requests else 0.0,
        calls=CallCount(total=len(requests), throttled_429=throttled),
        ticks=ticks,
        deployment=deployment,
    )
    bench.say(
        f"    all captioned after {first_done} s" if first_done else f"    {done}/{total} done"
    )
    return result


def _deployment(env: dict[str, str], home: Path) -> Deployment:
    from dagster import AssetKey, DagsterInstance, DagsterRunStatus

    saved = dict(os.environ)
    os.environ.update(env)
    try:
        with DagsterInstance.from_config(str(home / "dagster_home")) as instance:
            runs = instance.get_runs()
            asset = AssetKey("enriched_items")
            materialized = instance.get_materialized_partitions(asset)
            statuses: dict[str, int] = {}
            for run in runs:
                statuses[run.status.value] = statuses.get(run.status.value, 0) + 1
            shared = [r for r in runs if "dagster/asset_partition_range_start" in r.tags]
            sizes = []
            for run in shared:
                label = run.tags.get("enrich/users", "")
                if label.split(" ", 1)[0].isdigit():
                    sizes.append(int(label.split(" ", 1)[0]))
            # Each partition's own materialization: a sample of them, read back.
            sample = sorted(materialized)[:: max(1, len(materialized) // 25)]
            own = 0
            for key in sample:
                records = instance.fetch_materializations(
                    _records_filter(asset, key), limit=1
                ).records
                md = records[0].asset_materialization.metadata if records else {}
                if md.get("user_id") and md["user_id"].value == key:
                    own += md["items_captioned"].value == 3
            succeeded = statuses.get(DagsterRunStatus.SUCCESS.value, 0)
            return Deployment(
                runs=len(runs),
                runs_by_status=statuses,
                runs_succeeded=succeeded,
                shared_runs=len(shared),
                users_per_shared_run=Spread(
                    min=min(sizes) if sizes else None,
                    max=max(sizes) if sizes else None,
                    mean=statistics.mean(sizes) if sizes else None,
                ),
                partitions_materialized=len(materialized),
                partitions=len(instance.get_dynamic_partitions("users")),
                sampled_partitions=len(sample),
                sampled_with_own_figures=own,
            )
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _records_filter(asset: Any, key: str) -> Any:
    from dagster import AssetRecordsFilter

    return AssetRecordsFilter(asset_key=asset, asset_partitions=[key])


_TICK = re.compile(
    r"pending_rows_sensor - (\d+) user\(s\) pending(?: \(and \d+ new waiting for a partition\))?,"
    r" (\d+) changed: (\d+) run\(s\) for (\d+)"
    r" user\(s\).*?; (\d+) ms \(database (\d+) ms\), cursor (\d+) B"
)


def sensor_ticks(log: str) -> list[SensorTick]:
    """The sensor's own line per tick that requested or considered runs."""
    return [
        SensorTick(
            pending_users=int(m[1]),
            changed=int(m[2]),
            runs=int(m[3]),
            users_requested=int(m[4]),
            ms=int(m[5]),
            database_ms=int(m[6]),
            cursor_bytes=int(m[7]),
        )
        for m in _TICK.finditer(log)
    ]
