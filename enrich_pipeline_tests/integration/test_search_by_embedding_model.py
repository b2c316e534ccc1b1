"""Every vector says which model made it, and search compares only the query's model's.

The offline provider's vectors are hashed bags of words, stored as ``offline-hashed-words-v1``.
The stand-in's "text-embedding-v4" hashes words the same way, so a search that compared across
models would find offline rows with a perfect score: here it finds none and says why. Vectors
of offline captions that an earlier version stored as the real model's are left out too, and
``enrich-search --reembed`` relabels them; vectors another model made are re-embedded by it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from enrich_pipeline.cli.search import main as search_main
from enrich_pipeline.db.store import Store
from enrich_pipeline.pipeline.search import search_captions
from enrich_pipeline.providers.dashscope import DashScopeProvider
from enrich_pipeline.providers.offline import OFFLINE_EMBEDDING_MODEL, OfflineProvider
from enrich_pipeline.settings import DashScopeSettings
from enrich_pipeline_tests.helpers import Items, run_cli

COLORS = ("blue", "red", "green")


def labels(items: Items) -> dict[str, tuple[str, int]]:
    return {
        str(item_id): (model, dims)
        for item_id, model, dims in items.execute(
            "SELECT item_id, model, dimensions FROM {ns}.enrich_embeddings"
        )
    }


@pytest.fixture
def offline_rows(env: pytest.MonkeyPatch, items: Items, image_dir: Path) -> dict[str, str]:
    """Alice's three items captioned and embedded by the offline provider."""
    ids = {c: items.add("alice", str(image_dir / f"{c}.jpg")) for c in COLORS}
    code, report = run_cli(["--offline", "--max-items", "0"])
    assert code == 0, report
    assert f"{OFFLINE_EMBEDDING_MODEL} (1024 dims)" in report
    return ids


def test_offline_vectors_are_labelled_offline_and_a_real_query_never_meets_them(
    offline_rows: dict[str, str],
    items: Items,
    store: Store,
    api_settings: DashScopeSettings,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert set(labels(items).values()) == {(OFFLINE_EMBEDDING_MODEL, 1024)}
    caption = items.row(offline_rows["blue"])["metadata"]["caption"]

    # The offline query finds its own vectors; the real model's finds nothing, and says why.
    offline = search_captions(store, OfflineProvider(), "alice", caption, method="sql")
    assert offline[0].item_id == offline_rows["blue"]
    assert offline[0].score == pytest.approx(1.0, abs=1e-5)
    assert search_captions(store, DashScopeProvider(api_settings), "alice", caption) == []

    assert search_main(["--user-id", "alice", caption]) == 0
    out = capsys.readouterr().out
    assert out == (
        "No matching items: no caption vectors made by text-embedding-v4 (1024 dims) for user "
        f"alice; not compared: 3 made by {OFFLINE_EMBEDDING_MODEL} for offline captions. "
        "Caption the offline rows with a model: enrich-captions --recaption --user-id alice\n"
    )
    # --reembed does not turn offline captions into a model's vectors: nothing to do.
    assert search_main(["--reembed", "--user-id", "alice"]) == 0
    out = capsys.readouterr().out
    assert out == "re-embedded 0 stored vector(s) that held NaN or an infinity\n"
    assert set(labels(items).values()) == {(OFFLINE_EMBEDDING_MODEL, 1024)}


def test_offline_vectors_an_earlier_version_labelled_as_the_real_model_are_relabelled(
    offline_rows: dict[str, str],
    items: Items,
    store: Store,
    api_settings: DashScopeSettings,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # As every version before this one stored them.
    items.execute("UPDATE {ns}.enrich_embeddings SET model = 'text-embedding-v4'")
    caption = items.row(offline_rows["red"])["metadata"]["caption"]
    assert search_captions(store, DashScopeProvider(api_settings), "alice", caption) == []
    assert search_main(["--user-id", "alice", caption]) == 0
    assert capsys.readouterr().out == (
        "No matching items: no caption vectors made by text-embedding-v4 (1024 dims) for user "
        "alice; not compared: 3 of offline captions, labelled text-embedding-v4 by an earlier "
        "version. Caption the offline rows with a model: enrich-captions --recaption --user-id "
        "alice\n"
    )

    assert search_main(["--reembed"]) == 0
    assert capsys.readouterr().out == (
        "re-embedded 0 stored vector(s) that held NaN or an infinity; labelled 3 vector(s) of "
        "offline captions as the offline model's (an earlier version labelled them as the "
        "embedding model's)\n"
    )
    assert set(labels(items).values()) == {(OFFLINE_EMBEDDING_MODEL, 1024)}
    hits = search_captions(store, OfflineProvider(), "alice", caption, method="sql")
    assert hits[0].item_id == offline_rows["red"]
    # Done once: a second pass finds nothing to relabel.
    assert search_main(["--reembed"]) == 0
    assert "labelled" not in capsys.readouterr().out


def test_vectors_of_another_model_are_left_out_until_re_embedded(
    env: pytest.MonkeyPatch,
    items: Items,
    image_dir: Path,
    store: Store,
    api_settings: DashScopeSettings,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ids = {c: items.add("alice", str(image_dir / f"{c}.jpg")) for c in COLORS}
    assert run_cli(["--max-items", "0"])[0] == 0
    assert set(labels(items).values()) == {("text-embedding-v4", 1024)}
    items.execute(
        "UPDATE {ns}.enrich_embeddings SET model = 'text-embedding-v3' WHERE item_id = %s",
        (ids["green"],),
    )
    provider = DashScopeProvider(api_settings)
    caption = items.row(ids["green"])["metadata"]["caption"]
    hits = search_captions(store, provider, "alice", caption, method="sql")
    assert {h.item_id for h in hits} == {ids["blue"], ids["red"]}
    assert search_main(["--user-id", "alice", caption]) == 0
    out = capsys.readouterr().out
    assert out.startswith(
        "Note: only caption vectors made by text-embedding-v4 (1024 dims) were compared; "
        "not compared: 1 made by text-embedding-v3 (1024 dims). Re-embed the other models' "
        "with enrich-search --reembed.\n"
    )
    assert out.count(" score ") == 2

    assert search_main(["--reembed", "--user-id", "alice"]) == 0
    assert capsys.readouterr().out == (
        "re-embedded 0 stored vector(s) that held NaN or an infinity; re-embedded 1 made by "
        "another model or length with text-embedding-v4 (1024 dims)\n"
    )
    assert set(labels(items).values()) == {("text-embedding-v4", 1024)}
    hits = search_captions(store, provider, "alice", caption, method="sql")
    assert hits[0].item_id == ids["green"] and len(hits) == 3
