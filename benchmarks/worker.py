"""One benchmark scenario, run in a process of its own: ``python -m benchmarks.worker SPEC``.

``SPEC`` is a JSON object with ``kind`` (``cli``, ``dagster``, ``legacy``, ``local``,
``sensor``) and its parameters. The database and the stand-in server are given in the
environment exactly as a user would give them (``ADBPG_URL``, ``DASHSCOPE_BASE_URL``, ...).
The result is printed as one line ``BENCH_RESULT <json>`` on stdout.

Because the process does nothing but the scenario, ``getrusage(RUSAGE_SELF)`` is the pipeline's
own CPU time and peak RSS: PostgreSQL and the stand-in server run in other processes.
"""

from __future__ import annotations

import collections
import gc
import io
import json
import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

RESULT_PREFIX = "BENCH_RESULT "
STAGE_NAMES = (
    "claim_chunk",
    "visual_attributes",
    "load_visual",
    "caption_chunk",
    "caption_item",
    "embed_chunk",
    "write_chunk",
)


def current_rss_kb() -> int:
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError, IndexError):
        return 0


def measure(fn: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """Run ``fn`` and return its value with wall time, CPU time and memory figures."""
    gc.collect()
    rss_before = current_rss_kb()
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    value = fn()
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    return value, {
        "wall_s": wall,
        "cpu_user_s": after.ru_utime - before.ru_utime,
        "cpu_sys_s": after.ru_stime - before.ru_stime,
        "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "rss_before_kb": rss_before,
        "peak_rss_before_kb": before.ru_maxrss,
        "peak_rss_kb": after.ru_maxrss,
        "rss_after_kb": current_rss_kb(),
    }


class TailWriter(io.TextIOBase):
    """A text sink that keeps only the last lines: the report must not grow memory with N."""

    def __init__(self, keep: int = 60) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=keep)
        self.count = 0
        self._partial = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        data = self._partial + text
        *complete, self._partial = data.split("\n")
        self.lines.extend(complete)
        self.count += len(complete)
        return len(text)

    def text(self) -> str:
        return "\n".join([*self.lines, self._partial]).strip()


# --- instrumentation (diagnostics only; the figures never depend on it) --------------------

_providers: list[Any] = []
_stage_time: dict[str, list[float]] = {}
_stage_lock = threading.Lock()


def instrument() -> None:
    """Remember every DashScope provider built and time the shared stage functions."""
    from enrich_pipeline.pipeline import stages
    from enrich_pipeline.providers import dashscope

    original_init = dashscope.DashScopeProvider.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        _providers.append(self)

    dashscope.DashScopeProvider.__init__ = init  # type: ignore[method-assign]

    for name in STAGE_NAMES:
        fn = getattr(stages, name, None)
        if fn is None:
            continue

        def timed(*args: Any, _fn: Callable[..., Any] = fn, _name: str = name, **kw: Any) -> Any:
            started = time.perf_counter()
            try:
                return _fn(*args, **kw)
            finally:
                with _stage_lock:
                    entry = _stage_time.setdefault(_name, [0.0, 0.0])
                    entry[0] += time.perf_counter() - started
                    entry[1] += 1

        setattr(stages, name, timed)


def provider_usage() -> dict[str, Any]:
    usage: dict[str, Any] = {}
    for provider in _providers:
        raw = provider.usage.as_dict() if hasattr(provider.usage, "as_dict") else {}
        for key, value in raw.items():
            usage[key] = usage.get(key, 0) + value
        limiter = getattr(provider, "_limiter", None)
        waited = getattr(limiter, "waited", None)
        if isinstance(waited, int | float):
            usage["limiter_waited_s"] = usage.get("limiter_waited_s", 0.0) + waited
    usage["providers"] = len(_providers)
    return usage


def stage_breakdown() -> dict[str, dict[str, float]]:
    with _stage_lock:
        return {k: {"seconds": v[0], "calls": int(v[1])} for k, v in _stage_time.items()}


# --- scenarios ------------------------------------------------------------------------------


def run_cli(spec: dict[str, Any]) -> dict[str, Any]:
    from enrich_pipeline.cli import captions as cli

    instrument()
    out = TailWriter()
    code, figures = measure(lambda: cli.main(spec["argv"], out=out))
    return {
        **figures,
        "exit_code": code,
        "report_tail": out.text()[-3000:],
        "report_lines": out.count,
        "usage": provider_usage(),
        "stages": stage_breakdown(),
    }


def run_legacy(spec: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.legacy import run_legacy as legacy
    from enrich_pipeline.bootstrap import open_runtime
    from enrich_pipeline.settings import Settings

    instrument()

    def go() -> Any:
        runtime = open_runtime(Settings.from_env())
        try:
            return legacy(
                runtime.store,
                runtime.provider,
                runtime.settings.dashscope,
                spec["user"],
                batch_size=spec["batch_size"],
                concurrent=spec["concurrent"],
                max_items=spec["max_items"],
                policy=runtime.image_policy,
            )
        finally:
            runtime.close()

    stats, figures = measure(go)
    return {
        **figures,
        "exit_code": 0,
        "succeeded": stats.succeeded,
        "failed": stats.failed,
        "usage": provider_usage(),
        "stages": stage_breakdown(),
    }


def enrich_job_definition() -> Any:
    """For ``reconstructable``: the job as a deployment runs it."""
    from enrich_pipeline.defs.definitions import defs

    return defs.resolve_job_def("enrich_job")


def run_dagster(spec: dict[str, Any]) -> dict[str, Any]:
    # ``execute_job``, not ``materialize``: ``materialize`` keeps every step's output for its
    # result object, which a daemon-launched run does not, and would charge that to memory.
    from dagster import DagsterInstance, execute_job, reconstructable

    from enrich_pipeline.defs.partitions import user_to_key

    instrument()
    instance = DagsterInstance.ephemeral()
    key = user_to_key(spec["user"])
    instance.add_dynamic_partitions("users", [key])
    run_config = {"ops": {"enriched_items": {"ops": {"pending_rows": {"config": spec["config"]}}}}}
    job = reconstructable(enrich_job_definition)

    def go() -> Any:
        with execute_job(
            job,
            instance=instance,
            run_config=run_config,
            tags={"dagster/partition": key},
            raise_on_error=False,
        ) as result:
            events = result.get_asset_materialization_events()
            return result.success, result.run_id, events

    (success, run_id, events), figures = measure(go)
    metadata: dict[str, Any] = {}
    for event in events:
        mat = event.event_specific_data.materialization
        metadata = {
            k: v.value for k, v in mat.metadata.items() if isinstance(v.value, int | float | str)
        }
    return {
        **figures,
        "exit_code": 0 if success else 1,
        "materialization": {k: v for k, v in metadata.items() if not isinstance(v, str)},
        "steps": _step_profile(instance, run_id),
        "usage": provider_usage(),
        "stages": stage_breakdown(),
    }


def _step_profile(instance: Any, run_id: str) -> dict[str, Any]:
    """Where a Dagster run spends its time, and in which order the chunk steps ran."""
    starts: dict[str, float] = {}
    busy: dict[str, float] = {}
    order: list[str] = []
    first_event = None
    first_write = None
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is None or not event.step_key:
            continue
        first_event = first_event if first_event is not None else entry.timestamp
        op = event.step_key.split("[")[0].rsplit(".", 1)[-1]
        if event.event_type_value == "STEP_START":
            starts[event.step_key] = entry.timestamp
            order.append(op)
        elif event.event_type_value in ("STEP_SUCCESS", "STEP_FAILURE"):
            if event.step_key in starts:
                busy[op] = busy.get(op, 0.0) + entry.timestamp - starts[event.step_key]
            if op == "write_results" and first_write is None:
                first_write = entry.timestamp
    chunks = order.count("visual_attributes")
    before_first_caption = (
        order[: order.index("captions")].count("visual_attributes") if "captions" in order else 0
    )
    return {
        "chunks": chunks,
        "step_seconds": {k: round(v, 3) for k, v in busy.items()},
        "visual_steps_before_first_caption": before_first_caption,
        "first_write_after_s": None
        if first_write is None or first_event is None
        else round(first_write - first_event, 3),
    }


def run_local(spec: dict[str, Any]) -> dict[str, Any]:
    """The per-item CPU on 1600x1200 photos, and the tokens a 4000x3000 photo costs."""
    from benchmarks.data import write_photos
    from enrich_pipeline.enrichment.colors import dominant_colors
    from enrich_pipeline.enrichment.images import (
        ImagePolicy,
        image_tokens,
        load_image,
        prepare_for_vision,
    )
    from enrich_pipeline.enrichment.tags import DEFAULT_VOCABULARY, derive_tags
    from enrich_pipeline.settings import DashScopeSettings

    folder = Path(spec["folder"])
    max_side = DashScopeSettings.from_env().max_image_side
    policy = ImagePolicy(allow_local_files=True)
    caption = (
        "A modern blue fabric sofa with wooden legs in a minimalist living room, beside a "
        "white ceramic lamp and a green plant near a large window."
    )
    photos = write_photos(folder, spec["count"], (1600, 1200))

    def one(path: Path) -> dict[str, float]:
        parts: dict[str, float] = {}
        wall0, cpu0 = time.perf_counter(), time.process_time()
        loaded = load_image(str(path), policy)
        cpu1 = time.process_time()
        dominant_colors(loaded.image, k=5)
        cpu2 = time.process_time()
        prepare_for_vision(loaded, max_side=max_side)
        cpu3 = time.process_time()
        derive_tags(caption, DEFAULT_VOCABULARY)
        cpu4 = time.process_time()
        parts["wall_ms"] = (time.perf_counter() - wall0) * 1000
        parts["cpu_ms"] = (cpu4 - cpu0) * 1000
        parts["load_ms"] = (cpu1 - cpu0) * 1000
        parts["colors_ms"] = (cpu2 - cpu1) * 1000
        parts["vision_ms"] = (cpu3 - cpu2) * 1000
        parts["tags_ms"] = (cpu4 - cpu3) * 1000
        return parts

    for path in photos[:2]:  # warm-up: imports, first K-Means, codec tables
        one(path)
    samples = [one(p) for _ in range(spec["rounds"]) for p in photos]
    medians = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
    # Diagnostic: the same with scikit-learn's OpenMP pool limited to one thread. On a busy
    # machine its idle threads spin, and that CPU is charged to every K-Means call.
    from threadpoolctl import threadpool_info, threadpool_limits

    openmp_threads = [i.get("num_threads") for i in threadpool_info()]
    with threadpool_limits(1):
        for path in photos[:2]:
            one(path)
        single = [one(p) for _ in range(spec["rounds"]) for p in photos]
    medians_single_thread = {k: statistics.median(s[k] for s in single) for k in single[0]}

    tokens: dict[str, Any] = {"max_side": max_side}
    for width, height in ((4000, 3000), (1600, 1200)):
        (path,) = write_photos(folder, 1, (width, height), seed=500)
        vision = prepare_for_vision(load_image(str(path), policy), max_side=max_side)
        full = image_tokens(width, height)
        tokens[f"{width}x{height}"] = {
            "sent": [vision.width, vision.height],
            "tokens": vision.tokens,
            "full_tokens": full,
            "ratio": vision.tokens / full,
        }
    return {
        "exit_code": 0,
        "samples": len(samples),
        "median": medians,
        "median_one_thread": medians_single_thread,
        "thread_pools": openmp_threads,
        "tokens": tokens,
    }


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


def run_sensor(spec: dict[str, Any]) -> dict[str, Any]:
    import psycopg
    from dagster import DagsterInstance, SensorResult, build_sensor_context
    from psycopg import sql

    from enrich_pipeline.db.samples import create_sample_table
    from enrich_pipeline.db.store import Store
    from enrich_pipeline.defs.resources import AdbpgResource
    from enrich_pipeline.defs.sensors import pending_rows_sensor
    from enrich_pipeline.settings import DbSettings, RunSettings

    max_attempts = RunSettings.from_env().max_attempts

    db = DbSettings.from_env()
    items = sql.Identifier(db.namespace, db.table)
    rows, users, every = spec["rows"], spec["users"], spec["pending_every"]
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
    cold = [tick(None)[0] for _ in range(spec["ticks"])]
    steady = [tick(cursor)[0] for _ in range(spec["ticks"])]

    explain: list[str] = []
    with Store(db) as store:
        store.setup()
        store.items.pending_fingerprints(max_attempts)
        alone = []
        for _ in range(spec["ticks"]):
            started = time.perf_counter()
            store.items.pending_fingerprints(max_attempts)
            alone.append((time.perf_counter() - started) * 1000)
        with _capturing(store) as captured:
            store.items.pending_fingerprints(max_attempts)
        with store.db.pool.connection() as conn:
            for query, params in captured:
                plan = conn.execute(
                    sql.SQL("EXPLAIN (ANALYZE, BUFFERS) ") + query, params
                ).fetchall()
                explain.append("\n".join(r[0] for r in plan))
    index = f"{db.table}_enrich_pending_idx"
    return {
        "exit_code": 0,
        "rows": rows,
        "pending_rows": int(pending[0]) if pending else 0,
        "pending_users": int(pending[1]) if pending else 0,
        "run_requests": requested,
        "seed_s": seed_s,
        "setup_s": setup_s,
        "tick_cold_ms": cold,
        "tick_steady_ms": steady,
        "fingerprints_ms": alone,
        "explain": explain,
        "index_name": index,
        "index_used": bool(explain) and index in explain[0],
    }


KINDS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "cli": run_cli,
    "legacy": run_legacy,
    "dagster": run_dagster,
    "local": run_local,
    "sensor": run_sensor,
}


def forked(spec: dict[str, Any], env: dict[str, str], conn: Any) -> None:
    """Entry point of a worker forked from a preloaded server (``bench --preload``)."""
    os.environ.clear()
    os.environ.update(env)
    # As quiet as a subprocess whose output is captured: Dagster logs every step event.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    try:
        result = json.loads(json.dumps(KINDS[spec["kind"]](spec), default=str))
        conn.send(("ok", result))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        import traceback

        conn.send(("error", traceback.format_exc()[-4000:]))
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    result = KINDS[spec["kind"]](spec)
    print(RESULT_PREFIX + json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
