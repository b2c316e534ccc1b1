"""The items_table overview on a large table: ``python -m benchmarks.overview``.

Seeds ``--rows`` rows (1,000,000) of ``--users`` users (1,000) into the embedded PostgreSQL 18,
the PostgreSQL 12 of the test servers (``--server pg12``: AnalyticDB 7.0's PostgreSQL) or
``--database-url``: most rows captioned by the pipeline (two models, one or two caption
languages, a share embedded), ``--pending-share`` (1%) without a caption, a few in the failure
ledger, a few stale, deleted rows and rows without an image as a living table has; a spend
ledger of ``--spend-rows`` (10,000) runs. The table is vacuumed and analyzed (what autovacuum
does after a load), then each statement the observation runs is timed ``--repeats`` times:
the figures (``OverviewRows.figures``: both passes over the items table, in one snapshot), the
spend to date (``SpendRows.to_date``) and the whole observation's metadata as the sensor builds
it (``defs.overview.table_metadata``). Results go to ``artifacts/overview.json``.

What it justifies: the sensor's default interval (``ENRICH_OVERVIEW_INTERVAL``, 300 s) and the
cost added to every run's end. Not a test: timings on a shared machine vary;
``e2e/test_overview_benchmark_smoke.py`` runs it tiny.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql

from benchmarks.large_table import PER, database, insert_items, namespace_on, scattered
from enrich_pipeline.db.samples import create_sample_table
from enrich_pipeline.enrichment.records import text_digest

REPO = Path(__file__).resolve().parent.parent
_TEXT = "A modern blue chair in a minimalist living room with white walls."


@dataclass
class Figures:
    server: str
    rows: int
    users: int
    seed_s: float
    items: int = 0
    captioned: int = 0
    pending: int = 0
    stale: int = 0
    given_up: int = 0
    groups: int = 0
    # Milliseconds per call, one value per repeat.
    figures_ms: list[float] = field(default_factory=list)
    spend_ms: list[float] = field(default_factory=list)
    observation_ms: list[float] = field(default_factory=list)


def seed(url: str, namespace: str, rows: int, users: int, pending: float, spend: int) -> float:
    """Fill the items table and the pipeline's ledgers; returns the seconds it took. Metadata
    is built as JSON text, so the seed runs on every server the pipeline does."""
    pending_n = round(pending * PER)

    def caption(captioned: str) -> str:
        # Two models, and a third of the rows in two languages.
        return (
            f'\'{{{{"caption": "{_TEXT}", "dominant_colors": ["blue"], "caption_model": "\''
            " || CASE WHEN g % 5 = 0 THEN 'qwen3-vl-flash' ELSE 'qwen3-vl-plus' END || '\","
            f' "caption_text_digest": "{text_digest(_TEXT)}", "caption_i18n": {{{{"en": "{_TEXT}"\''
            " || CASE WHEN g % 3 = 0 THEN ', \"zh\": \"x\"' ELSE '' END || '}},"
            ' "caption_image_digest": "\' || md5(' + captioned + ") || '\"}}'"
        )

    ns = sql.Identifier(namespace)
    src = sql.Literal(f"{namespace}.items")
    items = insert_items(
        namespace,
        rows=rows,
        users=users,
        pending=scattered(str(pending_n)),
        stale="g % 211 = 0",
        caption=caption,
    )
    # A tenth of the pending rows failed once (retried), a tenth for good.
    failures = sql.SQL(
        "INSERT INTO {ns}.enrich_failures (source_table, item_id, user_id, attempts, permanent,"
        " error_code, last_error) SELECT {src}, i.id::text, i.user_id, 1, i.id % 2 = 0,"
        " 'InvalidParameter', 'bad image' FROM {items} i"
        " WHERE COALESCE(i.metadata->>'caption', '') = '' AND i.id % 10 = 0"
    ).format(ns=ns, items=sql.Identifier(namespace, "items"), src=src)
    # Half the captioned rows embedded (small vectors: the join reads the key alone).
    embeddings = sql.SQL(
        "INSERT INTO {ns}.enrich_embeddings (source_table, item_id, user_id, model, dimensions,"
        " embedding) SELECT {src}, i.id::text, i.user_id, 'text-embedding-v4', 4,"
        " ARRAY[0.1, 0.2, 0.3, 0.4]::real[] FROM {items} i"
        " WHERE COALESCE(i.metadata->>'caption', '') <> '' AND i.id % 2 = 0"
    ).format(ns=ns, items=sql.Identifier(namespace, "items"), src=src)
    ledger = sql.SQL(
        "INSERT INTO {ns}.enrich_spend (source_table, run_id, user_id, command, models,"
        " prompt_tokens, completion_tokens, cost, currency)"
        " SELECT {src}, 'run-' || g, 'user_' || lpad((g % {users})::text, 5, '0'), 'dagster',"
        " 'qwen3-vl-plus, text-embedding-v4', 1000, 200, 0.00052, 'USD'"
        " FROM generate_series(1, {n}) AS g"
    ).format(ns=ns, users=sql.Literal(users), n=sql.Literal(spend), src=src)
    with psycopg.connect(url) as conn:
        create_sample_table(conn, namespace, "items")
        started = time.perf_counter()
        conn.execute(items)
        conn.commit()
    from enrich_pipeline.db.store import Store
    from enrich_pipeline.settings import DbSettings

    # The pipeline's tables, as a first run makes them.
    with Store(DbSettings.from_env()) as store:
        store.setup()
    with psycopg.connect(url) as conn:
        for statement in (failures, embeddings, ledger):
            conn.execute(statement)
        conn.commit()
    with psycopg.connect(url, autocommit=True) as conn:
        for table in ("items", "enrich_failures", "enrich_embeddings", "enrich_spend"):
            conn.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(namespace, table)))
    return time.perf_counter() - started


def _timed(call: Callable[[], object], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        out.append((time.perf_counter() - started) * 1000)
    return out


def run(args: argparse.Namespace) -> Figures:
    from enrich_pipeline.db.store import Store
    from enrich_pipeline.defs.overview import table_metadata
    from enrich_pipeline.settings import DbSettings

    with (
        database(args.server, args.database_url, "enrich-overview-") as url,
        namespace_on(url, "overview") as namespace,
    ):
        seed_s = seed(url, namespace, args.rows, args.users, args.pending_share, args.spend)
        with Store(DbSettings.from_env()) as store:
            store.setup()
            found = store.overview.figures(max_attempts=3)  # warms the plan cache
            out = Figures(
                server=store.dialect.label,
                rows=args.rows,
                users=args.users,
                seed_s=seed_s,
                items=found.items,
                captioned=found.captioned,
                pending=found.pending,
                stale=found.stale,
                given_up=found.given_up,
                groups=len(found.by_model_language),
            )
            out.figures_ms = _timed(lambda: store.overview.figures(max_attempts=3), args.repeats)
            out.spend_ms = _timed(store.spend.to_date, args.repeats)
            out.observation_ms = _timed(lambda: table_metadata(store, max_attempts=3), args.repeats)
    return out


def report(f: Figures) -> str:
    def cell(values: Sequence[float]) -> str:
        return f"{statistics.median(values):8.1f} ms (min {min(values):.1f}, max {max(values):.1f})"

    return "\n".join(
        [
            f"{f.server}: {f.rows:,} rows of {f.users:,} users (seeded in {f.seed_s:.1f} s): "
            f"{f.items:,} items, {f.captioned:,} captioned, {f.pending:,} pending, "
            f"{f.stale:,} stale, {f.given_up:,} given up, {f.groups} model/language groups",
            f"  figures (two passes, one snapshot)  {cell(f.figures_ms)}",
            f"  spend to date                       {cell(f.spend_ms)}",
            f"  whole observation (sensor's tick)   {cell(f.observation_ms)}",
            f"  median of {len(f.figures_ms)} each",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=1_000)
    parser.add_argument("--pending-share", type=float, default=0.01)
    parser.add_argument("--spend", type=int, default=10_000, help="spend-ledger rows")
    parser.add_argument("--repeats", type=int, default=5, help="timings per statement")
    parser.add_argument("--server", choices=("pg18", "pg12"), default="pg18")
    parser.add_argument("--database-url", default=None, help="a PostgreSQL to use instead")
    parser.add_argument("--json", default=str(REPO / "artifacts" / "overview.json"))
    args = parser.parse_args(argv)
    result = run(args)
    print(report(result))
    target = Path(args.json)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(asdict(result), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
