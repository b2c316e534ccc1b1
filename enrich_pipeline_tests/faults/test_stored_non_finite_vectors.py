"""Caption vectors holding NaN or an infinity, stored by an older version (``real[]`` takes
them; this version refuses them before they are stored).

They used to rank first with ``score nan`` in plain SQL and to make every pgvector search of
their user fail ("NaN not allowed in vector"). Search now skips them on every method the server
has (FastANN exists only on AnalyticDB: its query shares the same filter), and the
``embedding_dimensions`` check's figures count them.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from enrich_pipeline.cli.search import main as search_main
from enrich_pipeline.db.store import Store
from enrich_pipeline.pipeline.search import search_captions
from enrich_pipeline.providers.dashscope import DashScopeProvider
from enrich_pipeline.settings import DashScopeSettings
from enrich_pipeline_tests.helpers import Items, run_cli
from enrich_pipeline_tests.integration.test_search import install_pgvector

COLORS = ("blue", "red", "green", "yellow", "cyan", "magenta")
SPOILED = {"blue": "NaN", "red": "Infinity", "green": "-Infinity"}


@pytest.fixture
def spoiled(env: pytest.MonkeyPatch, items: Items, image_dir: Path) -> tuple[dict[str, str], bool]:
    """Alice's six items captioned and embedded; then three vectors spoiled in place, as an
    older version wrote them (one element each of NaN, Infinity, -Infinity). Item ids by color,
    and whether the server has pgvector (PostgreSQL 12 here has not: then plain SQL only)."""
    pgvector = install_pgvector(items.conninfo)
    ids = {c: items.add("alice", str(image_dir / f"{c}.jpg")) for c in COLORS}
    assert run_cli(["--max-items", "0"])[0] == 0
    for color, value in SPOILED.items():
        items.execute(
            "UPDATE {ns}.enrich_embeddings SET embedding[2] = %s::real WHERE item_id = %s",
            (value, ids[color]),
        )
    return ids, pgvector


def test_search_skips_stored_non_finite_vectors_on_every_method_the_server_has(
    spoiled: tuple[dict[str, str], bool], store: Store, api_settings: DashScopeSettings
) -> None:
    ids, pgvector = spoiled
    provider = DashScopeProvider(api_settings)
    good = {ids[c] for c in COLORS if c not in SPOILED}
    methods = ["sql", "auto"] + (["pgvector"] if pgvector else [])
    for method in methods:
        for text in ("a blue chair", "a red sofa", "room"):
            hits = search_captions(store, provider, "alice", text, top_k=10, method=method)  # type: ignore[arg-type]
            assert {h.item_id for h in hits} == good, (method, text)
            assert all(math.isfinite(h.score) for h in hits), (method, hits)
    # Search reads only: the spoiled vectors are still there, and the check's figures count them.
    figures = store.items.check_partition("alice", api_settings.embedding_dimensions)
    assert figures["embeddings"] == len(COLORS)
    assert figures["embeddings_not_finite"] == len(SPOILED)


def test_the_search_command_never_shows_a_nan_score(
    spoiled: tuple[dict[str, str], bool], capsys: pytest.CaptureFixture[str]
) -> None:
    for method in ["sql"] + (["pgvector"] if spoiled[1] else []):
        assert search_main(["--user-id", "alice", "--method", method, "a blue chair"]) == 0
        captured = capsys.readouterr()
        assert captured.err == ""
        assert captured.out.count(" score ") == len(COLORS) - len(SPOILED), captured.out
        assert not re.search(r"score (nan|-?inf)", captured.out), captured.out


def test_reembed_replaces_the_non_finite_vectors_with_their_captions_embedding(
    spoiled: tuple[dict[str, str], bool],
    items: Items,
    store: Store,
    api_settings: DashScopeSettings,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ids, _ = spoiled
    # A fourth spoiled vector whose item lost its caption: nothing to embed, said so.
    items.write_by_hand(ids["yellow"], caption=None)
    items.execute(
        "UPDATE {ns}.enrich_embeddings SET embedding[1] = 'NaN' WHERE item_id = %s",
        (ids["yellow"],),
    )
    assert search_main(["--reembed", "--user-id", "alice"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out == (
        "re-embedded 3 stored vector(s) that held NaN or an infinity; "
        "1 left: their item has no caption\n"
    )
    # Each replaced vector is its caption's embedding; the captionless one is left as it was.
    provider = DashScopeProvider(api_settings)
    for color in SPOILED:
        caption = items.row(ids[color])["metadata"]["caption"]
        ((stored, dims),) = items.execute(
            "SELECT embedding, dimensions FROM {ns}.enrich_embeddings WHERE item_id = %s",
            (ids[color],),
        )
        assert stored == pytest.approx(provider.embed([caption])[0], abs=1e-6)
        assert dims == api_settings.embedding_dimensions
    figures = store.items.check_partition("alice", api_settings.embedding_dimensions)
    assert figures["embeddings_not_finite"] == 1
    hits = search_captions(store, provider, "alice", "a blue chair", top_k=10, method="sql")
    assert {h.item_id for h in hits} == {ids[c] for c in COLORS if c != "yellow"}
    # Again: nothing left to do but the captionless one.
    assert search_main(["--reembed"]) == 0
    assert capsys.readouterr().out.startswith("re-embedded 0 stored vector(s)")
