"""Vector search latency at a million vectors: ``python -m benchmarks.vector_search``.

Seeds ``--rows`` items (1,000,000) of ``--users`` users (1,000) into the embedded PostgreSQL 18,
the test servers' PostgreSQL 12 (``--server pg12``: AnalyticDB 7.0's PostgreSQL) or
``--database-url``, each with an image vector of ``--dims`` dimensions (256: a length the
models offer that a 2-core machine indexes in minutes; tongyi-embedding-vision-flash's
default is 768) in ``enrich_image_embeddings``. An eighth of the rows has each of eight
dominant colors; a third has a Chinese caption beside the English one.

The vectors have a low intrinsic dimension, as real embeddings have (a model's 256 or 768
numbers vary along a few dozen directions; uniform random vectors, or clusters with noise in
every dimension, make a point's nearest neighbours near-ties no real embedding set has, and
are the worst case of every ANN index): ``--clusters`` centres (300, subjects), random unit
vectors; each centre has its own ``--subspace`` (24) of the dimensions, chosen at random, and
each row is its centre plus an offset drawn uniformly in that subspace alone, of RMS length
``--offset`` (0.6) of the centre's, then normalized to unit length as the models' vectors are.
(The subspaces lie along coordinate axes, which SQL draws cheaply; cosine distance is blind to
a rotation of the whole space, and within a cluster to a rotation of its subspace.) Two rows of
a subject are then about 0.7 cosine-similar, two subjects about 0.

Then ``--queries`` query vectors (50; drawn as the rows are, near a centre, as a query about a
subject is) are ranked through the pipeline's own statement (``VectorRanking.rank``, what
``enrich-search`` runs), top 10, with no filter, with a color filter (1 row in 8), and with a
user filter (1 row in ``--users``), by each ranking the server has: plain SQL on ``real[]``
(exact; no extension), and, where pgvector is installed, its HNSW index (``enrich-search
--create-index``: m 16, ef_construction 64, pgvector's defaults) and its plan checked to use
that index, the filtered cases once per ``--ef-search`` value (``hnsw.ef_search``; iterative
scans as ``VectorRanking`` sets them; unfiltered scans use 40, pgvector's default). p50 and p95
of each, the index's build time, and the HNSW answers' recall@10 against the exact ones and
their distance ratio: the mean over queries of the 10th answer's cosine distance over the exact
10th's (1.0: as near as exact; a recall below 1 with a ratio near 1 means near-ties were
swapped, not worse answers returned). Results go to ``artifacts/vector_search-<server>.json``.

Plain SQL reads every vector of the model for an unfiltered query: ``--exact-queries`` bounds
how many of those are timed, ``--exact-filtered-queries`` how many color-filtered ones (default
``--queries``; each figure is stated with its count, recall measured over those only). Not a
test: timings on a shared machine vary; ``e2e/test_vector_search_benchmark_smoke.py`` runs it
tiny.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql

from benchmarks.large_table import database, insert_items, namespace_on
from enrich_pipeline.db.search_rank import EF_SEARCH, EF_SEARCH_FILTERED

REPO = Path(__file__).resolve().parent.parent
MODEL = "bench-vision"
COLORS = ("red", "blue", "green", "yellow", "white", "black", "gray", "brown")
_TEXT = "A modern blue chair in a minimalist living room with white walls."
TOP_K = 10

Found = dict[tuple[str, int], list[tuple[str, float]]]  # (filter, query) -> (item, distance)


@dataclass
class Case:
    method: str  # "sql" or "pgvector-hnsw"
    filter: str  # "none", "color", "user"
    queries: int
    ms: list[float] = field(default_factory=list)
    uses_index: bool | None = None
    recall_at_10: float | None = None  # against the exact ranking, HNSW only
    distance_ratio: float | None = None  # mean 10th distance over the exact 10th's, HNSW only
    ef_search: int | None = None  # hnsw.ef_search of the HNSW scan
    hits: int = 0  # rows returned, over every query

    @property
    def p50(self) -> float:
        return statistics.median(self.ms) if self.ms else float("nan")

    @property
    def p95(self) -> float:
        if len(self.ms) < 2:
            return self.ms[0] if self.ms else float("nan")
        return statistics.quantiles(self.ms, n=20, method="inclusive")[18]


@dataclass
class Figures:
    server: str
    rows: int
    users: int
    dims: int
    vectors: int = 0
    seed_s: float = 0.0
    index_build_s: float | None = None
    index: str | None = None
    cases: list[Case] = field(default_factory=list)


def seed(url: str, namespace: str, args: argparse.Namespace) -> tuple[float, int]:
    """The items and their image vectors; returns the seconds it took and the vectors made."""

    def caption(image: str) -> str:
        return (
            f'\'{{{{"caption": "{_TEXT}", "dominant_colors": ["\' || (ARRAY{list(COLORS)!r})'
            '[1 + g % 8] || \'"], "caption_model": "qwen3-vl-plus",'
            f' "caption_i18n": {{{{"en": "{_TEXT}"\''
            " || CASE WHEN g % 3 = 0 THEN ', \"zh\": \"x\"' ELSE '' END || '}},"
            ' "caption_image_digest": "\' || md5(' + image + ") || '\"}}'"
        )

    items = insert_items(
        namespace, rows=args.rows, users=args.users, pending="false", stale="false",
        caption=caption,
    )  # fmt: skip
    ns = sql.Identifier(namespace)
    subspace = min(args.subspace, args.dims)
    # Centres: random unit vectors, each with its subspace as a 0/1 mask over the dimensions.
    centres = sql.SQL(
        "CREATE TABLE {ns}.bench_centres AS"
        " WITH raw AS (SELECT c, d, random() - 0.5 AS x, random() AS pick"
        " FROM generate_series(0, {n} - 1) c, generate_series(1, {dims}) d),"
        " unit AS (SELECT c, d, x / sqrt(sum(x * x) OVER (PARTITION BY c)) AS u,"
        " row_number() OVER (PARTITION BY c ORDER BY pick) <= {k} AS inside FROM raw)"
        " SELECT c, array_agg(u::real ORDER BY d) AS v,"
        " array_agg((CASE WHEN inside THEN 1 ELSE 0 END)::real ORDER BY d) AS mask"
        " FROM unit GROUP BY c"
    ).format(ns=ns, n=sql.Literal(args.clusters), dims=sql.Literal(args.dims),
             k=sql.Literal(subspace))  # fmt: skip
    # Each row: its centre plus a uniform offset in the centre's subspace, normalized. The
    # centre by a hash of the id: by id % clusters, a subject would hold 2 of the 8 colors
    # (color and user are id % 8 and id % users) and a color filter would leave most queries'
    # subjects empty.
    vectors = sql.SQL(
        "INSERT INTO {ns}.enrich_image_embeddings (source_table, item_id, user_id, model,"
        " dimensions, embedding, image_digest)"
        " SELECT {src}, i.id::text, i.user_id, {model}, {dims},"
        " (SELECT array_agg((x / norm)::real ORDER BY d) FROM"
        "  (SELECT d, x, sqrt(sum(x * x) OVER ()) AS norm FROM"
        "   (SELECT d, c.v[d] + c.mask[d] * (random() - 0.5) * {width} AS x"
        "    FROM generate_series(1, {dims}) d WHERE i.id IS NOT NULL) a) b), md5(i.image)"
        " FROM {items} i JOIN {ns}.bench_centres c ON c.c = abs(hashint8(i.id::bigint) % {n})"
        " WHERE i.image IS NOT NULL"
    ).format(
        ns=ns,
        src=sql.Literal(f"{namespace}.items"),
        model=sql.Literal(MODEL),
        dims=sql.Literal(args.dims),
        items=sql.Identifier(namespace, "items"),
        n=sql.Literal(args.clusters),
        width=sql.Literal(_width(args.offset, subspace)),
    )
    from enrich_pipeline.db.samples import create_sample_table
    from enrich_pipeline.db.store import Store
    from enrich_pipeline.settings import DbSettings

    started = time.perf_counter()
    with psycopg.connect(url) as conn:
        create_sample_table(conn, namespace, "items")
        conn.execute(items)
        conn.commit()
    with Store(DbSettings.from_env()) as store:
        store.setup()
    with psycopg.connect(url) as conn:
        conn.execute(centres)
        made = conn.execute(vectors).rowcount
        conn.commit()
    with psycopg.connect(url, autocommit=True) as conn:
        for table in ("items", "enrich_image_embeddings"):
            conn.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(namespace, table)))
    return time.perf_counter() - started, made


def _width(offset: float, subspace: int) -> float:
    """The width of a uniform draw per dimension whose ``subspace`` dimensions together have
    an RMS length of ``offset`` (a uniform draw of width w has variance w**2 / 12)."""
    return offset * (12 / subspace) ** 0.5


def query_vectors(
    url: str, namespace: str, n: int, offset: float, subspace: int, seed_value: int = 7
) -> list[list[float]]:
    """``n`` queries, each drawn as a row is, near one centre (a subject), reproducibly."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            sql.SQL("SELECT v, mask FROM {} ORDER BY c").format(
                sql.Identifier(namespace, "bench_centres")
            )
        ).fetchall()
    rng = random.Random(seed_value)
    width = _width(offset, min(subspace, len(rows[0][0])))
    out = []
    for _ in range(n):
        centre, mask = rows[rng.randrange(len(rows))]
        x = [v + m * (rng.random() - 0.5) * width for v, m in zip(centre, mask, strict=True)]
        norm = sum(v * v for v in x) ** 0.5
        out.append([v / norm for v in x])
    return out


def run(args: argparse.Namespace) -> Figures:
    from enrich_pipeline.db.search_rank import Filters
    from enrich_pipeline.db.store import Store
    from enrich_pipeline.settings import DbSettings

    with (
        database(args.server, args.database_url, "enrich-vector-search-") as url,
        namespace_on(url, "vecbench") as namespace,
    ):
        if args.pgvector:
            with psycopg.connect(url, autocommit=True) as conn:
                available = conn.execute(
                    "SELECT 1 FROM pg_available_extensions WHERE name = 'vector'"
                ).fetchone()
                if available:
                    conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        seed_s, made = seed(url, namespace, args)
        queries = query_vectors(url, namespace, args.queries, args.offset, args.subspace)
        filters = {
            "none": Filters(),
            "color": Filters(colors=("red",)),
            "user": Filters(users=(f"user_{42 % args.users:05d}",)),
        }
        with Store(DbSettings.from_env()) as store:
            store.setup()
            ranking = store.search.ranking
            out = Figures(store.dialect.label, args.rows, args.users, args.dims, made, seed_s)

            def timed(case: Case, method: str, found: Found) -> None:
                for n, vector in enumerate(queries[: case.queries]):
                    started = time.perf_counter()
                    rows = ranking.rank("image", vector, model=MODEL, limit=TOP_K,
                                        filters=filters[case.filter], method=method)  # type: ignore[arg-type]  # fmt: skip
                    case.ms.append((time.perf_counter() - started) * 1000)
                    case.hits += len(rows)
                    found[(case.filter, n)] = [(r.item_id, 1 - r.similarity) for r in rows]

            exact: Found = {}
            for name in filters:
                count = {"none": args.exact_queries, "color": args.exact_filtered_queries}.get(
                    name, args.queries
                )
                case = Case("sql", name, min(count or args.queries, len(queries)))
                timed(case, "sql", exact)
                out.cases.append(case)
            if store.dialect.pgvector:
                started = time.perf_counter()
                made_index = store.search.indexes.create(
                    "image", model=MODEL, dimensions=args.dims,
                    maintenance_work_mem=args.maintenance_work_mem,
                )  # fmt: skip
                out.index_build_s = time.perf_counter() - started
                out.index = made_index.name
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute(
                        sql.SQL("ANALYZE {}").format(
                            sql.Identifier(namespace, "enrich_image_embeddings")
                        )
                    )
                for name in filters:
                    for ef in [EF_SEARCH] if name == "none" else args.ef_search:
                        ranking.ef_search_filtered = ef
                        case = Case("pgvector-hnsw", name, len(queries), ef_search=ef)
                        plan = ranking.plan("image", queries[0], model=MODEL, limit=TOP_K,
                                            filters=filters[name], method="pgvector")  # fmt: skip
                        case.uses_index = bool(out.index and out.index in plan)
                        approx: Found = {}
                        timed(case, "pgvector", approx)
                        _accuracy(case, approx, exact)
                        out.cases.append(case)
                ranking.ef_search_filtered = EF_SEARCH_FILTERED
    return out


def _accuracy(case: Case, approx: Found, exact: Found) -> None:
    """Recall@10 and the distance ratio of ``case``'s answers, over the queries ranked exactly."""
    pairs = [k for k in approx if k in exact and exact[k]]
    if not pairs:
        return
    case.recall_at_10 = statistics.mean(
        len({i for i, _ in approx[k]} & {i for i, _ in exact[k]}) / len(exact[k]) for k in pairs
    )
    ratios = [
        approx[k][-1][1] / exact[k][-1][1]
        for k in pairs
        if len(approx[k]) == len(exact[k]) and exact[k][-1][1] > 0
    ]
    case.distance_ratio = statistics.mean(ratios) if ratios else None


def report(f: Figures) -> str:
    lines = [
        f"{f.server}: {f.vectors:,} image vectors of {f.dims} dims, {f.rows:,} rows of "
        f"{f.users:,} users (seeded in {f.seed_s:.0f} s)"
        + (f"; HNSW index built in {f.index_build_s:.0f} s" if f.index_build_s else ""),
        f"  {'ranking':<15}{'filter':<8}{'ef':>5}{'queries':>8}{'p50 ms':>10}{'p95 ms':>10}"
        f"{'recall@10':>11}{'dist ratio':>11}  index used",
    ]
    for c in f.cases:
        recall = f"{c.recall_at_10:.3f}" if c.recall_at_10 is not None else "exact"
        ratio = f"{c.distance_ratio:.4f}" if c.distance_ratio is not None else "-"
        used = "-" if c.uses_index is None else "yes" if c.uses_index else "NO"
        ef = str(c.ef_search) if c.ef_search is not None else "-"
        lines.append(
            f"  {c.method:<15}{c.filter:<8}{ef:>5}{c.queries:>8}{c.p50:>10.1f}{c.p95:>10.1f}"
            f"{recall:>11}{ratio:>11}  {used}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=1_000)
    parser.add_argument("--dims", type=int, default=256)
    parser.add_argument("--clusters", type=int, default=300, help="centres (subjects)")
    parser.add_argument(
        "--subspace", type=int, default=24, help="dimensions a subject's rows vary along"
    )
    parser.add_argument(
        "--offset", type=float, default=0.6, help="a row's RMS offset from its unit centre"
    )
    parser.add_argument("--queries", type=int, default=50, help="timed queries per case")
    parser.add_argument(
        "--exact-queries",
        type=int,
        default=50,
        help="timed unfiltered plain-SQL queries (each reads every vector)",
    )
    parser.add_argument(
        "--exact-filtered-queries",
        type=int,
        default=None,
        help="timed color-filtered plain-SQL queries (default: --queries)",
    )
    parser.add_argument(
        "--ef-search",
        type=lambda text: [int(v) for v in text.split(",")],
        default=[40, 100, EF_SEARCH_FILTERED],
        help="hnsw.ef_search values for the filtered HNSW cases (comma-separated)",
    )
    parser.add_argument(
        "--no-pgvector", dest="pgvector", action="store_false", help="plain SQL only"
    )
    parser.add_argument("--maintenance-work-mem", default="2GB", help="for the HNSW build")
    parser.add_argument("--server", choices=("pg18", "pg12"), default="pg18")
    parser.add_argument("--database-url", default=None, help="a PostgreSQL to use instead")
    parser.add_argument(
        "--json", default=None, help="default: artifacts/vector_search-<server>.json"
    )
    args = parser.parse_args(argv)
    result = run(args)
    print(report(result))
    target = Path(args.json or REPO / "artifacts" / f"vector_search-{args.server}.json")
    target.parent.mkdir(parents=True, exist_ok=True)
    doc = asdict(result)
    for case, data in zip(result.cases, doc["cases"], strict=True):
        data["p50_ms"], data["p95_ms"] = case.p50, case.p95
    target.write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
