"""``enrich-search --create-index``: the vector index each server can have, and searches that
rank alike with it and without it.

With pgvector (the embedded PostgreSQL 18): an HNSW index per table, partial on the configured
model and length, that the ranking's plan uses; vectors of another model or length are still
written (the index leaves them out). Without pgvector or FastANN (PostgreSQL 12, the gp6
profile): no index, said in one line, and search ranks exactly in plain SQL.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from enrich_pipeline.cli.search import main as search_main
from enrich_pipeline.db.search_rank import Filters
from enrich_pipeline.db.store import Store
from enrich_pipeline.enrichment.synthetic import draw_sample
from enrich_pipeline.pipeline.search import ranking
from enrich_pipeline.settings import ConfigError, DbSettings
from enrich_pipeline_tests.helpers import Items, run_cli
from enrich_pipeline_tests.integration.test_search import install_pgvector

MODEL = "tongyi-embedding-vision-flash"
SUBJECTS = ("chair", "lamp", "vase", "sofa")
COLORS = {"red": (200, 30, 30), "blue": (40, 80, 200)}


@pytest.fixture
def embedded(env: pytest.MonkeyPatch, items: Items, tmp_path: Path) -> dict[str, str]:
    install_pgvector(items.conninfo)  # before the server's abilities are probed
    env.setenv("ENRICH_IMAGE_EMBEDDING_MODEL", MODEL)
    env.setenv("ENRICH_IMAGE_EMBEDDING_DIMENSIONS", "256")
    ids = {}
    for subject in SUBJECTS:
        for color, rgb in COLORS.items():
            path = tmp_path / f"{color}-{subject}.png"
            draw_sample(subject, rgb, (240, 240, 240)).save(path)
            ids[f"{color} {subject}"] = items.add("alice", str(path))
    code, report = run_cli(["--max-items", "0"])
    assert code == 0, report
    return ids


def ranked(store: Store, method: str, vector: list[float], filters: Filters) -> list[str]:
    rows = store.search.ranking.rank(
        "image",
        vector,
        model=MODEL,
        limit=5,
        filters=filters,
        method=method,  # type: ignore[arg-type]
    )
    return [r.item_id for r in rows]


def test_create_index_makes_what_the_server_can_have_and_search_ranks_alike(
    embedded: dict[str, str], items: Items, capsys: pytest.CaptureFixture[str]
) -> None:
    has_pgvector = install_pgvector(items.conninfo)
    assert search_main(["--create-index"]) == 0
    out = capsys.readouterr().out.splitlines()
    with Store(items.settings) as store:
        store.setup()
        if not has_pgvector:
            assert out == [
                f"no index for {signal} vectors of {model} ({dims} dims): this server has "
                "neither pgvector nor AnalyticDB's FastANN; search ranks exactly in plain SQL"
                for signal, model, dims in (
                    ("caption", "text-embedding-v4", 1024),
                    ("image", MODEL, 256),
                )
            ]
            assert store.search.indexes.existing("image") == []
            return
        caption_index = store.search.indexes.name("caption", "hnsw", "text-embedding-v4", 1024)
        image_index = store.search.indexes.name("image", "hnsw", MODEL, 256)
        assert out == [
            f"created pgvector HNSW index {caption_index} on caption vectors of "
            "text-embedding-v4 (1024 dims)",
            f"created pgvector HNSW index {image_index} on image vectors of {MODEL} (256 dims)",
        ]
        assert store.search.indexes.existing("image") == [image_index]
        # Made once.
        assert search_main(["--create-index"]) == 0
        assert "already there: pgvector HNSW index" in capsys.readouterr().out

        (vector,) = items.execute(
            "SELECT embedding FROM {ns}.enrich_image_embeddings WHERE item_id = %s",
            (embedded["red chair"],),
        )[0]
        query = [float(v) for v in vector]
        for filters in (Filters(), Filters(colors=("red",)), Filters(users=("alice",))):
            assert ranked(store, "pgvector", query, filters) == ranked(store, "sql", query, filters)

    # Vectors of another model and length are still written: the index leaves them out.
    items.execute(
        "INSERT INTO {ns}.enrich_image_embeddings (source_table, item_id, user_id, model,"
        " dimensions, embedding, image_digest) VALUES (%s, '0', 'alice', 'multimodal-embedding-v1',"
        " 3, '{{1,2,3}}'::real[], 'x')",
        (f"{items.namespace}.items",),
    )


def test_the_ranking_uses_the_hnsw_index_at_a_size_worth_it(items: Items) -> None:
    has_pgvector = install_pgvector(items.conninfo)
    with Store(DbSettings(conninfo=items.conninfo, namespace=items.namespace)) as store:
        store.setup()
        if not has_pgvector:  # PostgreSQL 12, gp6: asking for HNSW is one line, not an exact scan
            with pytest.raises(ConfigError, match="the pgvector extension is not installed"):
                ranking(store.dialect, "pgvector")
            return
        items.execute(
            "INSERT INTO {ns}.items (user_id, image, status, metadata)"
            " SELECT 'u' || (g % 5), 'img-' || g, 'active',"
            " ('{{\"dominant_colors\": [\"' || (CASE WHEN g % 2 = 0 THEN 'red' ELSE 'blue' END)"
            " || '\"]}}')::jsonb FROM generate_series(1, 4000) g"
        )
        items.execute(
            "INSERT INTO {ns}.enrich_image_embeddings (source_table, item_id, user_id, model,"
            " dimensions, embedding, image_digest) SELECT %s, i.id::text, i.user_id, %s, 8,"
            " ARRAY[random(), random(), random(), random(), random(), random(), random(),"
            " random()]::real[], md5(i.image) FROM {ns}.items i",
            (f"{items.namespace}.items", MODEL),
        )
        items.execute("ANALYZE {ns}.enrich_image_embeddings")
        made = store.search.indexes.create("image", model=MODEL, dimensions=8)
        assert made.created and made.name
        query = [0.5] * 8
        for filters in (Filters(), Filters(colors=("red",))):
            plan = store.search.ranking.plan(
                "image", query, model=MODEL, limit=10, filters=filters, method="pgvector"
            )
            assert made.name in plan, plan
            found = ranked(store, "pgvector", query, filters)
            exact = ranked(store, "sql", query, filters)
            assert len(set(found) & set(exact)) >= 4, (found, exact)
