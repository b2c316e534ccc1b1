"""What the store does per dialect, without a server: migrations for Greenplum, the label."""

from __future__ import annotations

from enrich_pipeline.db.dialect import Dialect
from enrich_pipeline.db.migrate import available, for_server


def test_greenplum_tables_are_heap_and_distributed_by_a_key_column() -> None:
    for migration in available():
        text = for_server(migration.text, greenplum=True)
        plain = for_server(migration.text, greenplum=False)
        assert "GREENPLUM" not in text and "DISTRIBUTED" not in plain
        for create in text.split("CREATE TABLE")[1:]:
            body, _, rest = create.partition(") WITH (appendonly=false) DISTRIBUTED BY (")
            assert rest, create[:80]
            column = rest.split(")")[0]
            key = body[body.index("PRIMARY KEY (") :].split(")")[0]
            assert column in key, (column, key)
        assert "IF NOT EXISTS" not in text.split("CREATE INDEX")[-1].split("\n")[0]


def test_label_names_the_server_and_what_it_lacks() -> None:
    gp6 = Dialect(
        version="PostgreSQL 9.4.26 (Greenplum Database 6.24.3 build commit)",
        server_version_num=90426,
        greenplum_major=6,
        analyticdb="6.3.10.21",
        jsonb_concat=False,
        fastann=True,
        items_returning=False,
    )
    assert gp6.label == (
        "AnalyticDB for PostgreSQL 6.3.10.21 (PostgreSQL 9.4.26); jsonb without ||, "
        "FastANN search, append-optimized items table"
    )
    assert not gp6.concurrent_index
    pg = Dialect(version="PostgreSQL 18.4", server_version_num=180004, pgvector=True)
    assert pg.label == "PostgreSQL 18.4; pgvector search" and pg.concurrent_index
