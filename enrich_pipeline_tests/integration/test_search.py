"""Caption search: plain SQL on real[] on every server, the same results with pgvector where
it is installed, and a clear error for a method the server lacks."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from enrich_pipeline.cli.search import main as search_main
from enrich_pipeline.db.store import Store
from enrich_pipeline.pipeline.search import search_captions
from enrich_pipeline.providers.dashscope import DashScopeProvider
from enrich_pipeline.settings import ConfigError, DashScopeSettings
from enrich_pipeline_tests.helpers import Items, run_cli


def install_pgvector(conninfo: str) -> bool:
    """pgvector where the server ships it (the embedded PostgreSQL 18 does, PostgreSQL 12 here
    does not)."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        if not conn.execute(
            "SELECT 1 FROM pg_available_extensions WHERE name = 'vector'"
        ).fetchone():
            return False
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        return True


@pytest.fixture
def captioned(env: pytest.MonkeyPatch, items: Items, image_dir: Path) -> Items:
    install_pgvector(items.conninfo)
    for color in ("blue", "red", "green", "yellow", "cyan", "magenta"):
        items.add("alice", str(image_dir / f"{color}.jpg"))
    items.add("bob", str(image_dir / "blue.jpg"))
    assert run_cli(["--max-items", "0"])[0] == 0
    return items


def test_ranks_by_caption_similarity_and_agrees_with_pgvector(
    captioned: Items, store: Store, api_settings: DashScopeSettings
) -> None:
    provider = DashScopeProvider(api_settings)
    caption_of = {i: r["metadata"]["caption"] for i, r in captioned.all().items()}
    target = next(iter(caption_of.values()))
    by_sql = search_captions(store, provider, "alice", target, top_k=10, method="sql")
    if install_pgvector(captioned.conninfo):
        assert store.search.has_pgvector()
        by_vec = search_captions(store, provider, "alice", target, top_k=10, method="pgvector")
        assert [h.item_id for h in by_sql] == [h.item_id for h in by_vec]
        for a, b in zip(by_sql, by_vec, strict=True):
            assert a.score == pytest.approx(b.score, abs=1e-5)
    else:
        assert not store.search.has_pgvector()
        with pytest.raises(ConfigError, match="pgvector extension is not installed"):
            search_captions(store, provider, "alice", target, method="pgvector")
        auto = search_captions(store, provider, "alice", target, top_k=10)
        assert [h.item_id for h in auto] == [h.item_id for h in by_sql]
    with pytest.raises(ConfigError, match="no FastANN"):
        search_captions(store, provider, "alice", target, method="fastann")
    # Only alice's six items; the exact caption ranks first with similarity 1.
    assert len(by_sql) == 6
    assert by_sql[0].caption == target and by_sql[0].score == pytest.approx(1.0, abs=1e-5)
    assert [h.score for h in by_sql] == sorted((h.score for h in by_sql), reverse=True)


def test_filters_by_color_and_tag(
    captioned: Items, store: Store, api_settings: DashScopeSettings
) -> None:
    provider = DashScopeProvider(api_settings)
    rows = {i: r["metadata"] for i, r in captioned.all().items() if r["user_id"] == "alice"}
    blue = [i for i, md in rows.items() if "blue" in md["dominant_colors"]]
    hits = search_captions(store, provider, "alice", "a chair", colors=["blue"], method="sql")
    assert sorted(h.item_id for h in hits) == sorted(blue)
    some_tag = next(t for md in rows.values() for t in md["style_tags"])
    tagged = [i for i, md in rows.items() if some_tag in md["style_tags"] + md["object_tags"]]
    hits = search_captions(store, provider, "alice", "room", tags=[some_tag])
    assert sorted(h.item_id for h in hits) == sorted(tagged)


def test_search_command(captioned: Items, capsys: pytest.CaptureFixture[str]) -> None:
    assert search_main(["--user-id", "alice", "--top-k", "2", "leather sofa"]) == 0
    out = capsys.readouterr().out
    assert out.count("score") == 2 and " 1. item " in out
    assert search_main(["--user-id", "nobody", "sofa"]) == 0
    assert "No matching items." in capsys.readouterr().out


def test_ann_index_is_refused_with_one_line_where_fastann_is_absent(
    captioned: Items, capsys: pytest.CaptureFixture[str]
) -> None:
    assert search_main(["--create-ann-index"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "FastANN" in err and err.count("\n") == 1, err
