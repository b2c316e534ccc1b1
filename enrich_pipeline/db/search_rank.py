"""One signal's ranking: the items whose stored vector (caption or image) is nearest a query
vector, among the rows every filter admits.

Both vector tables have the same shape (``enrich_embeddings``, ``enrich_image_embeddings``), so
one statement serves both; the image table adds the staleness rule: a vector made from another
image than the row holds now (``image_digest`` <> ``md5(image)``) is never ranked.

The ranking is written so that an index can serve it: the model, the length and the table are
literals (an index partial on them is provable at plan time, and ``vector(N)`` needs its N),
and the innermost ``ORDER BY`` is the bare distance with a ``LIMIT`` (the shape pgvector's HNSW
and AnalyticDB's FastANN scans answer); the outer query puts ties in item-id order. Plain SQL
ranks exactly, on ``real[]``, with no extension.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import psycopg
from psycopg import sql

from enrich_pipeline.db.database import Database

Signal = Literal["caption", "image"]
Method = Literal["fastann", "pgvector", "sql"]

TABLES: dict[Signal, str] = {"caption": "enrich_embeddings", "image": "enrich_image_embeddings"}

# pgvector's HNSW returns at most hnsw.ef_search rows (default 40) and takes at most 1,000
# (pgvector README, "Query Options": https://github.com/pgvector/pgvector/blob/master/README.md).
EF_SEARCH_MAX = 1000
EF_SEARCH = 40  # pgvector's default, for unfiltered scans
# With filters, a wider search: the rows filters reject are not among the answers, and the
# graph's nearest candidates are fewer. Measured (benchmarks/vector_search.py, 1M vectors of 256
# dims, color filter 1 in 8, iterative scan): recall@10 0.885 at ef_search 40, 100 and 200 alike,
# p50 11-13 ms; kept at 200 until the filtered scan's ef_search is shown to matter.
EF_SEARCH_FILTERED = 200


@dataclass(frozen=True)
class Filters:
    """What a ranked row must be: every one of ``colors``, ``tags`` and ``languages``, one of
    ``users`` (none: any user), not ``exclude_item``, not captioned by ``skip_caption_model``."""

    users: tuple[str, ...] = ()
    colors: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    languages: tuple[str, ...] = ()
    exclude_item: str | None = None
    skip_caption_model: str | None = None

    @property
    def any(self) -> bool:
        return bool(
            self.users or self.colors or self.tags or self.languages or self.skip_caption_model
        )


@dataclass(frozen=True)
class Ranked:
    item_id: str
    user_id: str
    similarity: float  # cosine similarity
    metadata: dict[str, Any] = field(compare=False)


@dataclass(frozen=True)
class Group:
    """Vectors of one signal counted by model and length (and, for captions, whether the offline
    provider made the caption; for images, whether the image changed since)."""

    model: str
    dimensions: int
    offline_captions: bool
    stale: bool
    count: int


class VectorRanking:
    """Ranking statements over both vector tables joined with the items table."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._pgvector_version: tuple[int, ...] | None = None
        # What a filtered HNSW scan searches; benchmarks/vector_search.py varies it.
        self.ef_search_filtered = EF_SEARCH_FILTERED

    def rank(
        self,
        signal: Signal,
        vector: Sequence[float],
        *,
        model: str,
        limit: int,
        filters: Filters = Filters(),  # noqa: B008 - frozen
        method: Method = "sql",
    ) -> list[Ranked]:
        """The rows nearest ``vector`` (cosine), best first, ties by item id: only vectors made
        by ``model`` with as many dimensions as ``vector`` (two models' spaces cannot be
        compared), none holding NaN or an infinity. With an approximate index and filters, a
        scan that found fewer than ``limit`` rows is done again exactly: an index never hides
        a row the filters admit."""
        rows = self._rank(signal, vector, model=model, limit=limit, filters=filters, exact=False,
                          method=method)  # fmt: skip
        if method != "sql" and filters.any and len(rows) < limit:
            rows = self._rank(
                signal, vector, model=model, limit=limit, filters=filters, exact=True, method=method
            )
        return rows

    def _rank(
        self,
        signal: Signal,
        vector: Sequence[float],
        *,
        model: str,
        limit: int,
        filters: Filters,
        exact: bool,
        method: Method,
    ) -> list[Ranked]:
        query, params = self._statement(signal, vector, model, limit, filters, exact, method)
        with self.db.connection() as conn:
            if method == "pgvector" and not exact:
                for setting in self._pgvector_settings(conn, limit, filtered=filters.any):
                    conn.execute(setting)
            rows = conn.execute(query, params).fetchall()
        return [
            Ranked(str(r[0]), str(r[1]), float(r[2]) if r[2] is not None else 0.0, r[3] or {})
            for r in rows
        ]

    def plan(
        self,
        signal: Signal,
        vector: Sequence[float],
        *,
        model: str,
        limit: int,
        filters: Filters = Filters(),  # noqa: B008 - frozen
        method: Method = "sql",
    ) -> str:
        """The server's plan for ``rank``'s first statement (EXPLAIN, not run): whether an index
        serves it, for the tests and the benchmark."""
        query, params = self._statement(signal, vector, model, limit, filters, False, method)
        with self.db.connection() as conn:
            if method == "pgvector":
                for setting in self._pgvector_settings(conn, limit, filtered=filters.any):
                    conn.execute(setting)
            rows = conn.execute(sql.SQL("EXPLAIN ") + query, params).fetchall()
        return "\n".join(str(r[0]) for r in rows)

    def _statement(
        self,
        signal: Signal,
        vector: Sequence[float],
        model: str,
        limit: int,
        filters: Filters,
        exact: bool,
        method: Method,
    ) -> tuple[sql.Composable, dict[str, Any]]:
        dims = len(vector)
        similarity, distance = _expressions(method, dims)
        common = {
            "similarity": similarity,
            "e": self.db.t(TABLES[signal]),
            "items": self.db.items,
            "i_id": self.db.i_id,
            "id_cast": self.db.id_cast,
            "src": sql.Literal(self.db.source_table),
            "model": sql.Literal(model),
            "dims": sql.Literal(dims),
            "non_finite": non_finite("e.embedding"),
            "vector_where": _vector_where(),
            "item_where": _item_where(signal),
        }
        if exact or method == "sql":
            # Exact: a join the server may plan as it likes (a hash join, filters first), the
            # order (similarity, then id) matching no index.
            query = sql.SQL(
                "SELECT item_id, user_id, similarity, metadata FROM ("
                "SELECT e.item_id, e.user_id, {similarity} AS similarity, i.metadata FROM {e} e"
                " JOIN {items} i ON {i_id} = e.item_id::{id_cast} AND i.user_id = e.user_id"
                " WHERE e.source_table = {src} AND e.model = {model} AND e.dimensions = {dims}"
                " AND NOT {non_finite} AND {vector_where} AND {item_where}"
                " ORDER BY similarity DESC NULLS LAST, e.item_id LIMIT %(k)s) AS r"
                " ORDER BY similarity DESC NULLS LAST, item_id"
            ).format(**common)
        else:
            # For an index: the vectors alone in distance order, each row's item checked by a
            # subquery the scan calls as it goes (a join would be planned apart from the index,
            # its row count guessed from three join columns), the items read for the LIMIT's
            # rows only.
            query = sql.SQL(
                "SELECT r.item_id, r.user_id, r.similarity, i.metadata FROM ("
                "SELECT e.item_id, e.user_id, {similarity} AS similarity FROM {e} e"
                " WHERE e.source_table = {src} AND e.model = {model} AND e.dimensions = {dims}"
                " AND NOT {non_finite} AND {vector_where}"
                " AND (SELECT true FROM {items} i WHERE {i_id} = e.item_id::{id_cast}"
                " AND i.user_id = e.user_id AND {item_where} LIMIT 1)"
                " ORDER BY {distance} LIMIT %(k)s) AS r"
                " JOIN {items} i ON {i_id} = r.item_id::{id_cast} AND i.user_id = r.user_id"
                " ORDER BY r.similarity DESC NULLS LAST, r.item_id"
            ).format(distance=distance, **common)
        params = _params(filters) | {
            "q": list(vector),
            "qnorm": sum(v * v for v in vector) ** 0.5,
            "k": limit,
        }
        return query, params

    def _pgvector_settings(self, conn: Any, limit: int, *, filtered: bool) -> list[sql.Composable]:
        """For this transaction: an HNSW scan that returns ``limit`` rows (``ef_search``), and,
        from pgvector 0.8.0, one that keeps scanning while filters reject rows (iterative
        scan; pgvector README "Iterative Index Scans"). ``relaxed_order`` may return rows
        slightly out of order: the outer query sorts them again."""
        if self._pgvector_version is None:
            row = conn.execute(
                "SELECT extversion FROM pg_extension WHERE extname = 'vector'"
            ).fetchone()
            self._pgvector_version = _version(str(row[0])) if row else ()
        ef = min(EF_SEARCH_MAX, max(self.ef_search_filtered if filtered else EF_SEARCH, limit))
        out: list[sql.Composable] = [
            sql.SQL("SET LOCAL hnsw.ef_search = {}").format(sql.Literal(ef))
        ]
        if self._pgvector_version >= (0, 8, 0):
            out.append(sql.SQL("SET LOCAL hnsw.iterative_scan = relaxed_order"))
        return out

    def stored_vector(self, signal: Signal, item_id: str, *, model: str) -> list[float] | None:
        """The item's stored vector (one per item) if ``model`` made it (and, for images, from
        the image the row holds now), or None: what "more like this" compares, no call made."""
        fresh = (
            sql.SQL(" AND i.image IS NOT NULL AND e.image_digest = md5(i.image)")
            if signal == "image"
            else sql.SQL("")
        )
        query = sql.SQL(
            "SELECT e.embedding FROM {e} e JOIN {items} i ON {i_id} = e.item_id::{id_cast}"
            " AND i.user_id = e.user_id WHERE e.source_table = %(src)s AND e.item_id = %(id)s"
            " AND e.model = %(model)s AND NOT {non_finite}{fresh}"
        ).format(
            e=self.db.t(TABLES[signal]),
            items=self.db.items,
            i_id=self.db.i_id,
            id_cast=self.db.id_cast,
            non_finite=non_finite("e.embedding"),
            fresh=fresh,
        )
        params = {"src": self.db.source_table, "id": item_id, "model": model}
        with self.db.connection() as conn:
            row = conn.execute(query, params).fetchone()
        return [float(v) for v in row[0]] if row else None

    def item_exists(self, item_id: str) -> bool:
        query = sql.SQL("SELECT 1 FROM {items} i WHERE {i_id} = %(id)s::{id_cast}").format(
            items=self.db.items, i_id=self.db.i_id, id_cast=self.db.id_cast
        )
        with self.db.connection() as conn:
            try:
                return conn.execute(query, {"id": item_id}).fetchone() is not None
            except psycopg.errors.DataError:  # an id the column's type cannot hold: no such item
                conn.rollback()
                return False

    def groups(
        self, signal: Signal, users: Sequence[str], offline_caption_model: str
    ) -> list[Group]:
        """The vectors of ``users`` (none: every user) of one signal, as search would find them
        (joined with their items), counted by model, length, offline caption and staleness."""
        if signal == "image":
            offline = sql.SQL("false")
            stale = sql.SQL("(i.image IS NULL OR e.image_digest <> md5(i.image))")
        else:
            offline = sql.SQL("COALESCE(i.metadata->>'caption_model', '') = %(offline)s")
            stale = sql.SQL("false")
        query = sql.SQL(
            "SELECT e.model, e.dimensions, {offline} AS offline, {stale} AS stale, count(*)"
            " FROM {e} e JOIN {items} i ON {i_id} = e.item_id::{id_cast} AND i.user_id = e.user_id"
            " WHERE e.source_table = %(src)s"
            " AND (%(users)s::text[] IS NULL OR e.user_id = ANY(%(users)s::text[]))"
            " GROUP BY 1, 2, 3, 4 ORDER BY 5 DESC, 1, 2, 3, 4"
        ).format(
            offline=offline,
            stale=stale,
            e=self.db.t(TABLES[signal]),
            items=self.db.items,
            i_id=self.db.i_id,
            id_cast=self.db.id_cast,
        )
        params = {
            "src": self.db.source_table,
            "users": list(users) if users else None,
            "offline": offline_caption_model,
        }
        with self.db.connection() as conn:
            return [
                Group(str(m), int(d), bool(o), bool(s), int(n))
                for m, d, o, s, n in conn.execute(query, params)
            ]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".") if p.isdigit())


def _expressions(method: Method, dims: int) -> tuple[sql.Composable, sql.Composable]:
    """The similarity and the distance an index orders by, for ``method``. pgvector's operand
    is ``embedding::vector(N)``, the expression its partial HNSW indexes are built on
    (``db/search_index.py``)."""
    if method == "pgvector":
        cast = sql.SQL("::vector({})").format(sql.Literal(dims))
        distance = sql.SQL("(e.embedding{cast} <=> %(q)s::real[]{cast})").format(cast=cast)
        return sql.SQL("1 - {}").format(distance), distance
    if method == "fastann":
        # AnalyticDB's <=> on real[] is the cosine distance its ANN index answers.
        distance = sql.SQL("(e.embedding <=> %(q)s::real[])")
        return sql.SQL("1 - {}").format(distance), distance
    similarity = sql.SQL(
        "((SELECT sum(a::float8 * b::float8) FROM unnest(e.embedding, %(q)s::real[])"
        " AS t(a, b)) / NULLIF(sqrt((SELECT sum(a::float8 * a::float8)"
        " FROM unnest(e.embedding) AS a)) * %(qnorm)s, 0))"
    )
    return similarity, sql.SQL("-{}").format(similarity)


def _vector_where() -> sql.Composable:
    """The filters on the vector row itself."""
    return sql.SQL(
        "(%(users)s::text[] IS NULL OR e.user_id = ANY(%(users)s::text[]))"
        " AND (%(exclude)s::text IS NULL OR e.item_id <> %(exclude)s::text)"
    )


def _item_where(signal: Signal) -> sql.Composable:
    """The filters on the vector's item (``i``)."""
    parts = [
        sql.SQL(
            "(%(skip)s::text IS NULL"
            " OR COALESCE(i.metadata->>'caption_model', '') <> %(skip)s::text)"
        ),
        sql.SQL(
            "(%(colors)s::jsonb IS NULL OR i.metadata->'dominant_colors' @> %(colors)s::jsonb)"
        ),
        # Each tag in either list; jsonb's ? is 9.4's, unlike || (not on AnalyticDB 6.0).
        sql.SQL(
            "(%(tags)s::text[] IS NULL OR NOT EXISTS (SELECT 1 FROM unnest(%(tags)s::text[])"
            " AS t(tag) WHERE NOT (COALESCE(i.metadata->'style_tags', '[]'::jsonb) ? t.tag"
            " OR COALESCE(i.metadata->'object_tags', '[]'::jsonb) ? t.tag)))"
        ),
        # A caption in each language asked for: caption_i18n holds one per language.
        sql.SQL(
            "(%(langs)s::text[] IS NULL OR NOT EXISTS (SELECT 1 FROM unnest(%(langs)s::text[])"
            " AS l(lang) WHERE COALESCE(i.metadata->'caption_i18n'->>l.lang, '') = ''))"
        ),
    ]
    if signal == "image":
        # A vector of the image the row held before is not this row's picture.
        parts.append(sql.SQL("i.image IS NOT NULL AND e.image_digest = md5(i.image)"))
    return sql.SQL(" AND ").join(parts)


def _params(filters: Filters) -> dict[str, Any]:
    return {
        "users": list(filters.users) if filters.users else None,
        "exclude": filters.exclude_item,
        "skip": filters.skip_caption_model,
        "colors": json.dumps(list(filters.colors)) if filters.colors else None,
        "tags": list(filters.tags) if filters.tags else None,
        "langs": list(filters.languages) if filters.languages else None,
    }


def non_finite(column: str) -> sql.Composable:
    """Whether the ``real[]`` in ``column`` holds NaN or an infinity: what an older version could
    store, which would rank first in plain SQL (NaN sorts above every number) and make pgvector
    refuse the whole query ("NaN not allowed in vector"). Array overlap compares elements with
    ``real``'s equality, under which NaN equals NaN (unlike IEEE), on every server."""
    return sql.SQL("({} && '{{NaN,Infinity,-Infinity}}'::real[])").format(
        sql.SQL(".").join(sql.Identifier(part) for part in column.split("."))
    )
