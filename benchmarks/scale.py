"""100,000 users: ``python -m benchmarks.scale`` (about 40 minutes; ``--users``, ``--window``).

Starts its own embedded PostgreSQL and the stand-in server (in its own process), seeds
``--users`` users with ``--rows-per-user`` pending rows each, and measures, in three parts:

- ``ticks``: the sensor as Dagster's daemon evaluates it, in this process, on a PostgreSQL
  instance as a deployment has: the first tick (it adds every user's partition), ticks that
  request the next runs (the cursor of the one before), and a steady tick (every user
  requested, nothing changed); each one's time, runs requested and cursor size.
- ``costs``: the per-partition costs that decide what breaks first at a million users, on a
  fresh Dagster database: the time to add 1k / 10k / 100k partitions and to read them back
  (every tick reads them), the time and event-log bytes of one materialization and its three
  check evaluations, and the asset page and its Partitions tab in Chromium at 1k, 10k and 100k
  partitions (``benchmarks.scale_ui``).
- ``deployment``: ``enrich-dagster`` at its defaults on the seeded users, the stand-in
  enforcing ``--rpm`` per second with ``--latency`` per vision call: the captioning rate over a
  steady window of ``--window`` seconds (the full table need not finish), the daemon's own
  sensor ticks (from the sensor's log line), then the pages in Chromium with the runs still
  going, and from the Dagster database the event-log bytes per user and the time a shared run's
  last steps take per user.

Prints each figure against its goal with the load average beside it and writes
``artifacts/scale.json``. Not a test: ``e2e/test_scale_smoke.py`` runs it tiny.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql

from benchmarks.bench.harness import REPO, StandInProcess
from benchmarks.bench.plan import API_KEY
from benchmarks.data import write_small_images
from benchmarks.large_table import database
from benchmarks.scale_deployment import DeploymentFigures, run_deployment
from benchmarks.scale_ui import PageTimes, libpq_url, load, time_pages, webserver
from enrich_pipeline.cli.dagster import environ
from enrich_pipeline.db.samples import create_sample_table

TICK_GOAL_MS = 1000.0
PAGE_GOAL_S = 5.0
RATE_GOAL = 0.85


@dataclass
class Tick:
    kind: str
    ms: float
    runs: int
    users_requested: int
    cursor_bytes: int
    load: str


@dataclass
class Costs:
    add_s: dict[str, float] = field(default_factory=dict)  # partitions -> seconds to add them
    read_ms: dict[str, float] = field(default_factory=dict)  # partitions -> ms to read all
    event_ms: float = 0.0  # one materialization + 3 check evaluations, written
    event_bytes: int = 0  # the same, in event_logs (rows' stored size)
    pages: dict[str, PageTimes] = field(default_factory=dict)
    load: str = ""


@dataclass
class Result:
    users: int
    rows_per_user: int
    ticks: list[Tick]
    costs: Costs | None
    deployment: DeploymentFigures | None


# --- the table and the instance ---------------------------------------------------------


def seed(url: str, namespace: str, users: int, per_user: int, images: Sequence[Path]) -> int:
    """``users`` users (``u000000`` ...) with ``per_user`` pending rows each; row n shows image
    n modulo the pool (distinct images for every row the window can reach, so the caption cache
    merges none of them)."""
    with psycopg.connect(url) as conn:
        create_sample_table(conn, namespace, "items")
        copy = sql.SQL("COPY {} (user_id, image, status, metadata) FROM STDIN").format(
            sql.Identifier(namespace, "items")
        )
        with conn.cursor() as cur, cur.copy(copy) as out:
            for n in range(users * per_user):
                path = images[n % len(images)]
                out.write_row((f"u{n // per_user:06d}", str(path), "active", f'{{"n": {n}}}'))
    return users * per_user


def dagster_home(url: str, folder: Path) -> tuple[Path, str, str]:
    """A DAGSTER_HOME with the shipped ``dagster.yaml`` on a fresh database of ``url``: the
    folder, the database name and its URL."""
    from enrich_pipeline.cli.dagster import dagster_url_for, ensure_database
    from enrich_pipeline.defs.instance import INSTANCE_YAML

    name = f"dagster_{uuid.uuid4().hex[:10]}"
    ensure_database(url, name)
    home = folder / name
    home.mkdir(parents=True)
    shutil.copy(INSTANCE_YAML, home / "dagster.yaml")
    return home, name, dagster_url_for(url, name)


def drop(url: str, created: Sequence[str]) -> None:
    """The benchmark's namespace (the first name) and Dagster databases, on a server it may
    share (``--database-url``)."""
    with psycopg.connect(url, autocommit=True) as conn:
        namespace, *databases = created
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(namespace)))
        for name in databases:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


# --- ticks -----------------------------------------------------------------------------------


def measure_ticks(env: dict[str, str], home: Path, requesting: int) -> list[Tick]:
    import logging

    from dagster import DagsterInstance, SensorResult, build_sensor_context

    from enrich_pipeline.defs.resources import AdbpgResource
    from enrich_pipeline.defs.runs import PartitionOrder, run_keys
    from enrich_pipeline.defs.sensors import pending_rows_sensor

    logging.getLogger("dagster").setLevel(logging.WARNING)
    ticks: list[Tick] = []
    with environ(env), DagsterInstance.from_config(str(home)) as instance:
        resource = AdbpgResource()

        def tick(kind: str, cursor: str | None) -> SensorResult:
            started = time.perf_counter()
            with build_sensor_context(
                instance=instance, cursor=cursor, resources={"adbpg": resource}
            ) as context:
                result = pending_rows_sensor(context)
            ms = (time.perf_counter() - started) * 1000
            assert isinstance(result, SensorResult), result
            order = PartitionOrder.of(instance)
            users = sum(len(run_keys(r.tags, order)) or 1 for r in result.run_requests or [])
            ticks.append(
                Tick(
                    kind,
                    round(ms, 1),
                    len(result.run_requests or []),
                    users,
                    len(result.cursor or ""),
                    load(),
                )
            )
            return result

        result = tick("first (adds every partition)", None)
        for _ in range(requesting):
            result = tick("requesting the next runs", result.cursor)
        # Every user requested at once (a cursor no deployment tick makes in one go, but the
        # one it reaches after users / runs-per-tick ticks), then nothing changed.
        # (10,000 runs a tick, the setting's most: shared runs hold every user.)
        os.environ["ENRICH_SENSOR_MAX_RUNS"] = "10000"
        result = tick("every user requested", None)
        os.environ.pop("ENRICH_SENSOR_MAX_RUNS")
        for _ in range(4):
            result = tick("then, each with the last one's cursor", result.cursor)
        resource.close()
    return ticks


# --- per-partition costs ---------------------------------------------------------------------


def measure_costs(
    env: dict[str, str], home: Path, sizes: Sequence[int], events: int, pages: bool
) -> Costs:
    from dagster import (
        AssetCheckEvaluation,
        AssetKey,
        AssetMaterialization,
        DagsterInstance,
        MetadataValue,
    )

    costs = Costs()
    with environ(env), DagsterInstance.from_config(str(home)) as instance:
        # Adding: to fresh names, so each size is timed on its own.
        for n in sizes:
            keys = [f"u{i:07d}" for i in range(n)]
            started = time.perf_counter()
            instance.add_dynamic_partitions(f"probe_{n}", keys)
            costs.add_s[f"{n}"] = round(time.perf_counter() - started, 3)
            started = time.perf_counter()
            assert len(instance.get_dynamic_partitions(f"probe_{n}")) == n
            costs.read_ms[f"{n}"] = round((time.perf_counter() - started) * 1000, 1)
        # One user's materialization and its three check evaluations, with metadata of the
        # size ours have (ten figures, a JSON of errors, a markdown of sample captions).
        asset = AssetKey("probe_items")
        metadata = {
            "user_id": "u0000001",
            **{k: MetadataValue.int(3) for k in ("total", "succeeded", "failed", "skipped")},
            "success_rate": MetadataValue.float(1.0),
            "tokens_used": MetadataValue.int(1234),
            "errors": MetadataValue.json({}),
            "sample_captions": MetadataValue.md("- a blue chair in a white room\n" * 3),
        }
        started = time.perf_counter()
        for i in range(events):
            key = f"u{i:07d}"
            instance.report_runless_asset_event(
                AssetMaterialization(asset_key=asset, partition=key, metadata=metadata)
            )
            for check in ("rows_captioned", "failure_share", "caption_quality"):
                instance.report_runless_asset_event(
                    AssetCheckEvaluation(
                        asset_key=asset,
                        check_name=check,
                        passed=True,
                        partition=key,
                        metadata={"failure_share": 0.0},
                    )
                )
        costs.event_ms = round((time.perf_counter() - started) * 1000 / max(1, events), 2)
        costs.load = load()
    costs.event_bytes = round(
        _event_bytes(libpq_url(env["DAGSTER_PG_URL"]), "probe_items") / max(1, events)
    )
    if pages:
        costs.pages = time_pages_at_sizes(env, home, sizes)
    return costs


def _event_bytes(url: str, asset: str) -> int:
    """The size of the asset's events as Dagster writes them (the serialized event of each
    ``event_logs`` row naming it; PostgreSQL may store it compressed, and indexes add more)."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(octet_length(e.event)), 0) FROM event_logs e"
            " WHERE e.asset_key LIKE %s",
            (f'%"{asset}"%',),
        ).fetchone()
    return int(row[0]) if row else 0


def time_pages_at_sizes(env: dict[str, str], home: Path, sizes: Sequence[int]) -> dict:
    """The asset page and its Partitions tab with 1k, 10k, 100k ``users`` partitions (added
    between loads) and one webserver reading this instance."""
    from dagster import DagsterInstance

    found: dict[str, PageTimes] = {}
    with webserver(env, home) as url:
        have = 0
        for n in sizes:
            with environ(env), DagsterInstance.from_config(str(home)) as instance:
                instance.add_dynamic_partitions("users", [f"u{i:06d}" for i in range(have, n)])
            have = n
            found[f"{n}"] = time_pages(url, first_key="u000000")
    return found


# --- the report ------------------------------------------------------------------------------


def report(r: Result) -> str:
    lines = [f"{r.users:,} users x {r.rows_per_user} pending rows"]
    for t in r.ticks:
        goal = "" if t.kind.startswith("first") else (" ok" if t.ms < TICK_GOAL_MS else " MISS")
        lines.append(
            f"  tick, {t.kind}: {t.ms:,.0f} ms{goal}; {t.runs} run(s) for "
            f"{t.users_requested:,} user(s); cursor {t.cursor_bytes:,} B (load {t.load})"
        )
    if r.costs:
        c = r.costs
        for n, s in c.add_s.items():
            lines.append(
                f"  add {int(n):,} partitions: {s:.2f} s ({s / int(n) * 1e6:.0f} us each); "
                f"read them all: {c.read_ms[n]:,.0f} ms"
            )
        lines.append(
            f"  one materialization + 3 check evaluations: {c.event_ms:.1f} ms, "
            f"{c.event_bytes:,} B in event_logs (load {c.load})"
        )
        for n, p in c.pages.items():
            lines.append(f"  pages at {int(n):,} partitions: {p.describe(PAGE_GOAL_S)}")
    if r.deployment:
        d = r.deployment
        verdict = "ok" if d.share_of_quota >= RATE_GOAL else "MISS"
        lines += [
            f"  deployment: {d.rate:.2f} rows/s over {d.window_s:.0f} s = "
            f"{d.share_of_quota:.2f} of {d.rpm} rpm {verdict} (vision {d.latency:g} s; "
            f"first caption after {d.first_caption_s:.0f} s; 429s {d.throttled} of {d.calls}; "
            f"1-minute load {min(d.load_window):.1f} to {max(d.load_window):.1f})",
            f"  runs {d.runs} {d.runs_by_status}; users per shared run {d.users_per_run[:12]}",
            f"  partitions {d.partitions:,}, materialized {d.partitions_materialized:,}; "
            f"event log per user {d.event_bytes_per_user:,.0f} B in "
            f"{d.events_per_user:.1f} events, and {d.check_rows_bytes_per_user:,.0f} B of "
            f"asset_check_executions rows; a shared run's last steps "
            f"{d.last_steps_s_per_user} s per user",
        ]
        for t in d.ticks:
            lines.append(
                f"  daemon tick: {t['ms']} ms (database {t['database_ms']} ms), "
                f"{t['pending_users']:,} pending, {t['runs']} run(s) for "
                f"{t['users_requested']:,} user(s), cursor {t['cursor_bytes']:,} B"
            )
        if d.pages:
            lines.append(f"  pages during the runs: {d.pages.describe(PAGE_GOAL_S)}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--rows-per-user", type=int, default=3)
    p.add_argument("--parts", default="ticks,costs,deployment")
    p.add_argument("--sizes", default="1000,10000,100000", help="partition counts of 'costs'")
    p.add_argument("--events", type=int, default=200, help="materializations timed in 'costs'")
    p.add_argument("--requesting-ticks", type=int, default=3)
    p.add_argument("--rpm", type=int, default=600, help="the stand-in's quota, per second too")
    p.add_argument("--latency", type=float, default=2.0, help="seconds per vision call")
    p.add_argument("--embedding-latency", type=float, default=0.3)
    p.add_argument("--window", type=float, default=600.0, help="seconds of steady captioning")
    p.add_argument("--images", type=int, default=20_000, help="distinct images (a pool)")
    p.add_argument("--no-pages", action="store_true", help="no Chromium")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a pipeline setting for the ticks and the deployment (ENRICH_BUNDLE_USERS=200)",
    )
    p.add_argument("--database-url", default=None)
    p.add_argument("--json", default=str(REPO / "artifacts" / "scale.json"))
    a = p.parse_args(argv)
    parts = {x.strip() for x in a.parts.split(",")}
    sizes = [int(x) for x in a.sizes.split(",")]
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"enrich-scale-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    folder.chmod(0o755)
    result = Result(a.users, a.rows_per_user, [], None, None)
    standin = StandInProcess()
    created: list[str] = []  # Dagster databases, dropped at the end with the namespace
    try:
        with database("pg18", a.database_url, "enrich-scale-") as url:
            namespace = f"scale_{uuid.uuid4().hex[:8]}"
            created.append(namespace)
            images = write_small_images(
                folder / "images", min(a.images, a.users * a.rows_per_user), (64, 48)
            )
            started = time.perf_counter()
            rows = seed(url, namespace, a.users, a.rows_per_user, images)
            print(f"seeded {rows:,} rows in {time.perf_counter() - started:.0f} s", flush=True)
            base = {
                "ADBPG_URL": url,
                "ADBPG_NAMESPACE": namespace,
                "DASHSCOPE_API_KEY": API_KEY,
                "DASHSCOPE_BASE_URL": standin.base_url,
                "DASHSCOPE_RPM": str(a.rpm),
                "ENRICH_ALLOW_LOCAL_FILES": "true",
                "ENRICH_HOME": str(folder / "home"),
                **dict(x.split("=", 1) for x in a.set),
            }
            if "ticks" in parts:
                home, name, dagster_url = dagster_home(url, folder)
                created.append(name)
                env = {**base, "DAGSTER_HOME": str(home), "DAGSTER_PG_URL": dagster_url}
                result.ticks = measure_ticks(env, home, a.requesting_ticks)
                print(f"ticks measured (load {load()})", flush=True)
            if "costs" in parts:
                home, name, dagster_url = dagster_home(url, folder)
                created.append(name)
                env = {**base, "DAGSTER_HOME": str(home), "DAGSTER_PG_URL": dagster_url}
                result.costs = measure_costs(env, home, sizes, a.events, not a.no_pages)
                print(f"costs measured (load {load()})", flush=True)
            if "deployment" in parts:
                home, name, dagster_url = dagster_home(url, folder)
                created.append(name)
                env = {**base, "DAGSTER_HOME": str(home), "DAGSTER_PG_URL": dagster_url}
                standin.configure(a.latency, a.rpm, a.embedding_latency, True)
                standin.reset()
                result.deployment = run_deployment(
                    env, home, standin, url, namespace, a, pages=not a.no_pages
                )
            drop(url, created)
    finally:
        standin.stop()
        shutil.rmtree(folder, ignore_errors=True)
    print(report(result))
    target = Path(a.json)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(asdict(result), indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
