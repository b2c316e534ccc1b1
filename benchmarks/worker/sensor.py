"""The sensor's tick on a large seeded table, and the plan of its pending query (EXPLAIN)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from benchmarks.worker.contract import SensorRun, SensorSpec


@contextmanager
def _capturing(store: Any) -> Iterator[list[tuple[Any, Any]]]:
    """Record the statements a store method runs (for EXPLAIN), without changing them."""
    captured: list[tuple[Any, Any]] = []
    pool = store.db.pool

    class Conn:
        def __init__(self, conn: Any) -> None:
            self._conn = conn

        def execute(self, query: Any, params: Any = None, **kw: Any) -> Any:
            captured.append((query, params))
            return self._conn.execute(query, params, **kw)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._conn, name)

    class Pool:
        @contextmanager
        def connection(self, *args: Any, **kw: Any) -> Iterator[Conn]:
            with pool.connection(*args, **kw) as conn:
                yield Conn(conn)

        def __getattr__(self, name: str) -> Any:
            return getattr(pool, name)

    store.db.pool = Pool()  # type: ignore[assignment]
    try:
        yield captured
    finally:
        store.db.pool = pool


def run_sensor(spec: SensorSpec) -> SensorRun:
    import psycopg
    from dagster import DagsterInstance, SensorResult, build_sensor_context
    from psycopg import sql

    from enrich_pipeline.db.pending_index import INDEX_SUFFIX
    from enrich_pipeline.db.samples import create_sample_table
    from enrich_pipeline.db.store import Store
    from enrich_pipeline.defs.resources import AdbpgResource
    from enrich_pipeline.defs.sensors import pending_rows_sensor
    from enrich_pipeline.settings import DbSettings, RunSettings

    run_settings = RunSettings.from_env()
    max_attempts = run_settings.max_attempts
    # As the sensor counts work: stale rows too, as ENRICH_ON_IMAGE_CHANGE says.
    stale = run_settings.on_image_change

    db = DbSettings.from_env()
    items = sql.Identifier(db.namespace, db.table)
    rows, users, every = spec.rows, spec.users, spec.pending_every
    seed_sql = sql.SQL(
        "INSERT INTO {items} (user_id, image, status, metadata, updated_at)"
        " SELECT 'user_' || lpad(((g / {every}) % {users})::text, 3, '0'),"
        " CASE WHEN g % 997 = 1 THEN NULL ELSE 'https://img.example.com/' || g || '.jpg' END,"
        " CASE WHEN g % 89 = 3 THEN 'deleted' ELSE 'active' END,"
        " CASE WHEN g % {every} = 0 THEN jsonb_build_object('title', 'item ' || g)"
        " ELSE jsonb_build_object('title', 'item ' || g, 'caption', 'Caption of item ' || g) END,"
        " now() - make_interval(secs => g)"
        " FROM generate_series(1, {rows}) AS g"
    ).format(
        items=items,
        every=sql.Literal(every),
        users=sql.Literal(users),
        rows=sql.Literal(rows),
    )
    with psycopg.connect(db.conninfo.get_secret_value()) as conn:
        create_sample_table(conn, db.namespace, db.table)
        started = time.perf_counter()
        conn.execute(seed_sql)
        conn.commit()
        seed_s = time.perf_counter() - started
    with Store(db) as store:
        started = time.perf_counter()
        store.setup()  # migrations and the partial index on pending rows
        setup_s = time.perf_counter() - started
    with psycopg.connect(db.conninfo.get_secret_value(), autocommit=True) as conn:
        conn.execute(sql.SQL("ANALYZE {}").format(items))  # what autovacuum does after a load
        pending = conn.execute(
            sql.SQL(
                "SELECT count(*), count(DISTINCT user_id) FROM {} WHERE status = 'active'"
                " AND COALESCE(metadata->>'caption', '') = '' AND image IS NOT NULL"
                " AND image <> ''"
            ).format(items)
        ).fetchone()

    instance = DagsterInstance.ephemeral()

    def tick(cursor: str | None) -> tuple[float, Any]:
        started = time.perf_counter()
        with build_sensor_context(
            instance=instance, cursor=cursor, resources={"adbpg": AdbpgResource()}
        ) as context:
            result = pending_rows_sensor(context)
        return (time.perf_counter() - started) * 1000, result

    _, first = tick(None)  # warm-up: imports, per-process setup, plan cache
    requested = len(first.run_requests) if isinstance(first, SensorResult) else 0
    cursor = first.cursor if isinstance(first, SensorResult) else None
    cold = [tick(None)[0] for _ in range(spec.ticks)]
    steady = [tick(cursor)[0] for _ in range(spec.ticks)]

    explain: list[str] = []
    with Store(db) as store:
        store.setup()
        store.items.pending_fingerprints(max_attempts, stale=stale)
        alone = []
        for _ in range(spec.ticks):
            started = time.perf_counter()
            store.items.pending_fingerprints(max_attempts, stale=stale)
            alone.append((time.perf_counter() - started) * 1000)
        with _capturing(store) as captured:
            store.items.pending_fingerprints(max_attempts, stale=stale)
        with store.db.pool.connection() as conn:
            for query, params in captured:
                if isinstance(query, str):  # a setting for what follows (SET LOCAL), not a query
                    conn.execute(query, params)
                    continue
                plan = conn.execute(
                    sql.SQL("EXPLAIN (ANALYZE, BUFFERS) ") + query, params
                ).fetchall()
                explain.append("\n".join(r[0] for r in plan))
    index = f"{db.table}{INDEX_SUFFIX}"
    return SensorRun(
        rows=rows,
        pending_rows=int(pending[0]) if pending else 0,
        pending_users=int(pending[1]) if pending else 0,
        run_requests=requested,
        seed_s=seed_s,
        setup_s=setup_s,
        tick_cold_ms=cold,
        tick_steady_ms=steady,
        fingerprints_ms=alone,
        explain=explain,
        index_name=index,
        index_used=bool(explain) and index in explain[0],
    )
