"""``enrich-search --relevance``: the labelled set captioned once in a namespace of its own, its
queries run in every ranking mode, recall@5 and MRR printed; on the stand-in, whose vectors are
built so that a drawing and a text naming its subject and colors are near (standin/concepts.py).
"""

from __future__ import annotations

import re
import uuid

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from enrich_pipeline.cli import search as search_cli
from enrich_pipeline_tests.helpers import Items
from enrich_pipeline_tests.standin.server import StandIn


def figures(output: str) -> dict[str, tuple[float, float]]:
    rows = re.findall(r"^(caption|image|both)\s+([\d.]+)\s+([\d.]+)", output, re.M)
    return {mode: (float(recall), float(mrr)) for mode, recall, mrr in rows}


def test_relevance_prints_each_mode_and_pays_for_the_set_once(
    env: pytest.MonkeyPatch,
    items: Items,
    standin: StandIn,
    capsys: pytest.CaptureFixture[str],
) -> None:
    env.setenv("ENRICH_IMAGE_EMBEDDING_MODEL", "tongyi-embedding-vision-flash")
    env.setenv("ENRICH_IMAGE_EMBEDDING_DIMENSIONS", "256")
    env.setenv("ENRICH_CAPTION_LANGUAGES", "en,zh")
    argv = ["--relevance", "--relevance-namespace", items.namespace]

    assert search_cli.main(argv) == 0
    first = capsys.readouterr().out
    assert "10 sample drawings" in first and "(10 captioned this run)" in first
    scores = figures(first)
    assert set(scores) == {"caption", "image", "both"}, first
    # The stand-in's image vectors are built to meet the words naming what is drawn, in English
    # and Chinese; its captions name subject and colors in both languages.
    assert scores["image"] == (1.0, 1.0), first
    assert scores["caption"][0] >= 0.9 and scores["both"][0] >= 0.9, first
    assert re.search(r"like \(7\)", first) and re.search(r"text zh \(11\)", first)
    paid_captions = standin.count("chat", 200)
    paid_images = standin.count("multimodal", 200)
    assert paid_captions == 10

    # Again: the set's rows are kept, so only the queries' embeddings are paid for.
    assert search_cli.main(argv) == 0
    second = capsys.readouterr().out
    assert "(captioned by an earlier run)" in second
    assert figures(second) == scores
    assert standin.count("chat", 200) == paid_captions
    # The queries' texts only: 24 text queries in two modes that embed by image model.
    assert standin.count("multimodal", 200) - paid_images <= 2 * 24
    # The user's own items table was not touched.
    assert items.all() == {}


def test_without_an_image_model_only_caption_ranking_is_measured(
    env: pytest.MonkeyPatch, items: Items, capsys: pytest.CaptureFixture[str]
) -> None:
    assert search_cli.main(["--relevance", "--relevance-namespace", items.namespace]) == 0
    out = capsys.readouterr().out
    assert set(figures(out)) == {"caption"}, out
    assert "image vectors: off (set ENRICH_IMAGE_EMBEDDING_MODEL" in out


def test_a_role_that_may_not_create_the_set_s_table_is_told_what_to_grant(
    env: pytest.MonkeyPatch,
    items: Items,
    standin: StandIn,
    capsys: pytest.CaptureFixture[str],
) -> None:
    role, password = f"reader_{uuid.uuid4().hex[:8]}", "pw-" + uuid.uuid4().hex[:8]
    namespace = f"rel_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(items.conninfo, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )
    try:
        params = conninfo_to_dict(items.conninfo)
        params.update(user=role, password=password)
        env.setenv("ADBPG_URL", make_conninfo(**params))
        code = search_cli.main(["--relevance", "--relevance-namespace", namespace])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith("error: the relevance set needs a table of its own"), err
        assert "--relevance-namespace" in err[0] and password not in err[0]
        assert standin.count() == 0  # nothing paid
    finally:
        with psycopg.connect(items.conninfo, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(namespace))
            )
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
