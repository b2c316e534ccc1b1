"""The vector indexes search can use, one per table and model/length, made only on request
(``enrich-search --create-index``): building one reads every vector and, on AnalyticDB,
fixes the column's length.

- pgvector: HNSW on ``(embedding::vector(N)) vector_cosine_ops``, partial on the model and the
  length (and on finite vectors, which ``::vector`` refuses), so each model's vectors have
  their own graph and ``search_rank``'s query, which names the same literals, can use it;
  ``vector`` indexes hold at most 2,000 dimensions (pgvector README, "HNSW":
  https://github.com/pgvector/pgvector/blob/master/README.md).
- AnalyticDB: FastANN, ``USING ann (embedding) WITH (dim = N, distancemeasure = cosine)`` on the
  ``real[]`` column (cosine needs 6.3.10.18 or later:
  https://www.alibabacloud.com/help/en/analyticdb-for-postgresql/user-guide/create-a-vector-index).
- Neither: none; search ranks exactly in plain SQL, and the command says so.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import psycopg
from psycopg import sql

from enrich_pipeline.db.database import Database
from enrich_pipeline.db.search_rank import TABLES, Signal, non_finite

# pgvector's limit for HNSW on the vector type (README "HNSW"); halfvec would take 4,000.
PGVECTOR_HNSW_MAX_DIMS = 2000


@dataclass(frozen=True)
class IndexOutcome:
    signal: Signal
    model: str
    dimensions: int
    kind: str  # "hnsw", "fastann" or "none"
    name: str | None
    created: bool  # False: it was there already, or none can be made (``reason``)
    reason: str = ""

    def describe(self) -> str:
        what = f"{self.signal} vectors of {self.model} ({self.dimensions} dims)"
        if self.name is None:
            return f"no index for {what}: {self.reason}"
        label = {"hnsw": "pgvector HNSW", "fastann": "FastANN"}[self.kind]
        done = "created" if self.created else "already there:"
        return f"{done} {label} index {self.name} on {what}"


class VectorIndexes:
    def __init__(self, db: Database) -> None:
        self.db = db

    def name(self, signal: Signal, kind: str, model: str, dimensions: int) -> str:
        tag = hashlib.md5(model.encode()).hexdigest()[:8]  # noqa: S324 - a name, not a secret
        suffix = f"_ann_{dimensions}" if kind == "fastann" else f"_hnsw_{dimensions}_{tag}"
        return f"{TABLES[signal]}{suffix}"

    def create(
        self,
        signal: Signal,
        *,
        model: str,
        dimensions: int,
        maintenance_work_mem: str | None = None,
    ) -> IndexOutcome:
        """The index for ``signal``'s vectors of ``model`` and length, made if missing."""
        dialect = self.db.dialect
        if dialect.fastann:
            kind = "fastann"
        elif dialect.pgvector:
            kind = "hnsw"
            if dimensions > PGVECTOR_HNSW_MAX_DIMS:
                return IndexOutcome(
                    signal, model, dimensions, kind, None, False,
                    f"pgvector's HNSW indexes at most {PGVECTOR_HNSW_MAX_DIMS} dimensions; "
                    "search ranks these exactly (choose fewer dimensions to index them)",
                )  # fmt: skip
        else:
            return IndexOutcome(
                signal, model, dimensions, "none", None, False,
                "this server has neither pgvector nor AnalyticDB's FastANN; search ranks "
                "exactly in plain SQL",
            )  # fmt: skip
        name = self.name(signal, kind, model, dimensions)
        table = self.db.t(TABLES[signal])
        with self.db.connection() as conn:
            conn.autocommit = True
            try:
                if self._valid(conn, name):
                    return IndexOutcome(signal, model, dimensions, kind, name, False)
                conn.execute(
                    sql.SQL("DROP INDEX IF EXISTS {}").format(
                        sql.Identifier(self.db.namespace, name)
                    )
                )  # a cancelled concurrent build leaves an invalid one
                # Reading every vector of a large table takes minutes, not the statement
                # timeout queries get; this is an explicit command, stopped with Ctrl-C.
                conn.execute("SET statement_timeout = 0")
                if maintenance_work_mem:
                    conn.execute(
                        sql.SQL("SET maintenance_work_mem = {}").format(
                            sql.Literal(maintenance_work_mem)
                        )
                    )
                if kind == "fastann":
                    conn.execute(
                        sql.SQL(
                            "CREATE INDEX {name} ON {t} USING ann (embedding)"
                            " WITH (dim = {dim}, distancemeasure = cosine)"
                        ).format(name=sql.Identifier(name), t=table, dim=sql.Literal(dimensions))
                    )
                else:
                    body = sql.SQL(
                        "{name} ON {t} USING hnsw ((embedding::vector({dim})) vector_cosine_ops)"
                        " WHERE model = {model} AND dimensions = {dim} AND NOT {non_finite}"
                    ).format(
                        name=sql.Identifier(name),
                        t=table,
                        dim=sql.Literal(dimensions),
                        model=sql.Literal(model),
                        non_finite=non_finite("embedding"),
                    )
                    # Concurrently: the pipeline goes on writing vectors while it builds.
                    conn.execute(sql.SQL("CREATE INDEX CONCURRENTLY ") + body)
            finally:
                conn.execute("RESET statement_timeout")
                if maintenance_work_mem:
                    conn.execute("RESET maintenance_work_mem")
                conn.autocommit = False
        return IndexOutcome(signal, model, dimensions, kind, name, True)

    def _valid(self, conn: psycopg.Connection, name: str) -> bool:
        row = conn.execute(
            "SELECT x.indisvalid FROM pg_index x WHERE x.indexrelid = to_regclass(%s)",
            (sql.Identifier(self.db.namespace, name).as_string(conn),),
        ).fetchone()
        return bool(row and row[0])

    def existing(self, signal: Signal) -> list[str]:
        """The vector indexes on ``signal``'s table (for the benchmark and the report)."""
        with self.db.connection() as conn:
            rows = conn.execute(
                "SELECT c.relname FROM pg_index x JOIN pg_class c ON c.oid = x.indexrelid"
                " JOIN pg_am a ON a.oid = c.relam WHERE x.indrelid = to_regclass(%s)"
                " AND a.amname IN ('hnsw', 'ivfflat', 'ann') ORDER BY 1",
                (self.db.t(TABLES[signal]).as_string(conn),),
            ).fetchall()
        return [str(r[0]) for r in rows]
