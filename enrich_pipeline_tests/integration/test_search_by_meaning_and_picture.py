"""One search, three signals: rows found by words (caption vectors, image vectors, or both fused
by reciprocal rank fusion), like a row, or like a picture, among the rows the filters admit.

The rows are the sample drawings, captioned and embedded by a real run against the stand-in,
whose multimodal vectors put a drawing and the words for its subject and colors near each other
(``standin/concepts.py``). What the user sees is ``enrich-search``'s output; what is left in the
database is checked where a search could change it (it never does).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from enrich_pipeline.cli.search import main as search_main
from enrich_pipeline.db.store import Store
from enrich_pipeline.enrichment.images import ImagePolicy
from enrich_pipeline.enrichment.synthetic import draw_sample
from enrich_pipeline.pipeline.search import RRF_K, SearchQuery, search
from enrich_pipeline.providers.dashscope import DashScopeProvider
from enrich_pipeline.settings import ConfigError
from enrich_pipeline_tests.helpers import Items, run_cli, standin_settings
from enrich_pipeline_tests.standin import StandIn

MODEL = "tongyi-embedding-vision-flash"
RED, BLUE, WHITE = (200, 30, 30), (40, 80, 200), (240, 240, 240)
DRAWINGS = {
    "red chair": ("chair", RED),
    "blue chair": ("chair", BLUE),
    "red lamp": ("lamp", RED),
    "blue vase": ("vase", BLUE),
}


def draw(folder: Path, name: str) -> Path:
    subject, color = DRAWINGS[name]
    path = folder / f"{name.replace(' ', '-')}.png"
    draw_sample(subject, color, WHITE).save(path)
    return path


@pytest.fixture
def rows(env: pytest.MonkeyPatch, items: Items, tmp_path: Path, standin: StandIn) -> dict[str, str]:
    """Alice's four drawings and Bob's red chair, captioned and embedded (256-dim image vectors)
    by one run."""
    env.setenv("ENRICH_IMAGE_EMBEDDING_MODEL", MODEL)
    env.setenv("ENRICH_IMAGE_EMBEDDING_DIMENSIONS", "256")
    ids = {name: items.add("alice", str(draw(tmp_path, name))) for name in DRAWINGS}
    ids["bob's red chair"] = items.add("bob", str(draw(tmp_path, "red chair")))
    code, report = run_cli(["--max-items", "0"])
    assert code == 0, report
    assert items.execute("SELECT count(*) FROM {ns}.enrich_image_embeddings") == [(5,)]
    standin.reset_log()
    return ids


def provider_for(standin: StandIn) -> DashScopeProvider:
    settings = standin_settings(standin).with_(
        image_embedding_model=MODEL, image_embedding_dimensions=256
    )
    return DashScopeProvider(settings)


def hit_ids(out: str) -> list[str]:
    return [line.split()[2] for line in out.splitlines() if line[:3].strip().endswith(".")]


def test_words_in_english_or_chinese_find_the_drawing_by_its_image_vector(
    rows: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    for words in ("red chair", "红色椅子"):
        assert search_main(["--by", "image", "--user-id", "alice", words]) == 0
        out = capsys.readouterr().out
        found = hit_ids(out)
        assert found[0] == rows["red chair"], out
        # The subject weighs more than the color: a blue chair before a red lamp.
        assert found.index(rows["blue chair"]) < found.index(rows["red lamp"]), out
        assert rows["bob's red chair"] not in found
        assert "image: similarity " in out and f"rank 1 ({MODEL}, 256 dims)" in out
        assert "caption: similarity" not in out and "(fused)" not in out


def test_both_signals_are_fused_by_reciprocal_rank_and_each_hit_says_why(
    rows: dict[str, str], store: Store, standin: StandIn, capsys: pytest.CaptureFixture[str]
) -> None:
    provider = provider_for(standin)
    result = search(store, provider, SearchQuery(text="a red chair", users=("alice",)))
    assert result.mode == "both"  # the default when an image model is set
    assert len(result.hits) == 4
    for hit in result.hits:
        assert {s.signal for s in hit.signals} == {"caption", "image"}
        assert hit.score == pytest.approx(sum(1 / (RRF_K + s.rank) for s in hit.signals))
        assert hit.filters_met == ("user alice",)
        assert hit.caption and hit.captions and hit.dominant_colors
    assert [h.score for h in result.hits] == sorted((h.score for h in result.hits), reverse=True)
    image = {s.model: s for s in result.hits[0].signals}
    assert image[MODEL].dimensions == 256
    assert image["text-embedding-v4"].dimensions == 1024

    # Every user's rows when no user is named: Bob's red chair comes too.
    assert search_main(["a red chair"]) == 0
    out = capsys.readouterr().out
    assert rows["bob's red chair"] in hit_ids(out) and "(fused)" in out
    assert "user bob" in out and "user alice" in out
    assert "caption: similarity" in out and "image: similarity" in out


def test_like_an_item_uses_its_stored_vectors_and_leaves_it_out(
    rows: dict[str, str], store: Store, standin: StandIn, capsys: pytest.CaptureFixture[str]
) -> None:
    assert search_main(["--by", "image", "--like", rows["red chair"]]) == 0
    out = capsys.readouterr().out
    found = hit_ids(out)
    assert rows["red chair"] not in found
    # The same picture (Bob's copy) first, then the other chair.
    assert found[:2] == [rows["bob's red chair"], rows["blue chair"]], out
    assert standin.count() == 0  # no call: the stored vectors are the query

    assert search_main(["--like", "999999999"]) == 2
    assert capsys.readouterr().err == "error: no item 999999999 in the items table\n"


def test_like_a_picture_embeds_it_once_and_ranks_by_image(
    rows: dict[str, str], store: Store, standin: StandIn, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    (tmp_path / "query").mkdir()
    picture = draw(tmp_path / "query", "blue vase")
    assert search_main(["--like-image", str(picture), "--user-id", "alice"]) == 0
    out = capsys.readouterr().out
    assert hit_ids(out)[0] == rows["blue vase"], out
    assert "caption: similarity" not in out  # a picture has no caption vector
    assert standin.count("multimodal") == 1

    # A page's visitor may not name the server's files: the default policy refuses them.
    with pytest.raises(ConfigError, match="cannot be used"):
        search(store, provider_for(standin), SearchQuery(like_image=str(picture)))
    allowed = ImagePolicy(allow_local_files=True)
    hits = search(store, provider_for(standin), SearchQuery(like_image=str(picture)),
                  image_policy=allowed).hits  # fmt: skip
    assert hits[0].item_id == rows["blue vase"]


def test_filters_by_color_language_and_users_and_says_which_were_met(
    rows: dict[str, str], items: Items, capsys: pytest.CaptureFixture[str]
) -> None:
    red = {i for i, r in items.all().items() if "red" in r["metadata"]["dominant_colors"]}
    assert red == {rows["red chair"], rows["red lamp"], rows["bob's red chair"]}
    argv = ["--color", "red", "--lang", "en", "--user-id", "alice", "--user-id", "bob", "chair"]
    assert search_main(argv) == 0
    out = capsys.readouterr().out
    assert set(hit_ids(out)) == red
    assert out.count("filters met: user ") == 3
    assert "color red, language en" in out
    # No row has a Japanese caption.
    assert search_main(["--lang", "ja", "chair"]) == 0
    assert capsys.readouterr().out == "No matching items.\n"


def test_stale_and_other_models_image_vectors_are_never_compared_and_are_counted(
    rows: dict[str, str], items: Items, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Alice's red chair now shows a lamp: its vector is of the old picture.
    items.execute(
        "UPDATE {ns}.items SET image = %s WHERE id::text = %s",
        (str(draw(tmp_path, "red lamp")), rows["red chair"]),
    )
    items.execute(
        "UPDATE {ns}.enrich_image_embeddings SET model = 'multimodal-embedding-v1'"
        " WHERE item_id = %s",
        (rows["blue vase"],),
    )
    before = items.execute("SELECT item_id, model, image_digest FROM {ns}.enrich_image_embeddings")
    assert search_main(["--by", "image", "--user-id", "alice", "red chair"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(
        f"Note: only image vectors made by {MODEL} (256 dims) were compared; not compared: "
        "1 made by multimodal-embedding-v1 (256 dims); 1 made from an image the row no longer "
        "holds (a run captions and embeds the new image).\n"
    ), out
    assert set(hit_ids(out)) == {rows["blue chair"], rows["red lamp"]}
    # A search changes nothing.
    after = items.execute("SELECT item_id, model, image_digest FROM {ns}.enrich_image_embeddings")
    assert sorted(after) == sorted(before)


def test_image_search_without_an_image_model_is_one_line(
    env: pytest.MonkeyPatch, items: Items, capsys: pytest.CaptureFixture[str]
) -> None:
    items.add("alice", None)
    assert search_main(["--by", "image", "chair"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "error: search by image needs an image embedding model: set ENRICH_IMAGE_EMBEDDING_MODEL\n"
    )
    assert search_main(["--like-image", "x.png", "--by", "caption"]) == 2
    assert "a picture has no caption vector" in capsys.readouterr().err


def test_offline_search_by_words_and_picture_meets_only_offline_image_vectors(
    env: pytest.MonkeyPatch, items: Items, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env.setenv("ENRICH_IMAGE_EMBEDDING_MODEL", MODEL)
    ids = {name: items.add("alice", str(draw(tmp_path, name))) for name in DRAWINGS}
    code, report = run_cli(["--offline", "--max-items", "0"])
    assert code == 0, report
    models = {m for (m,) in items.execute("SELECT model FROM {ns}.enrich_image_embeddings")}
    assert models == {"offline-hashed-vision-v1"}

    assert search_main(["--offline", "--by", "image", "red chair"]) == 0
    assert hit_ids(capsys.readouterr().out)[0] == ids["red chair"]
    (tmp_path / "query").mkdir()
    picture = draw(tmp_path / "query", "blue vase")
    assert search_main(["--offline", "--like-image", str(picture)]) == 0
    assert hit_ids(capsys.readouterr().out)[0] == ids["blue vase"]
    # The real model's query meets none of them, and says why.
    assert search_main(["--by", "image", "red chair"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(
        f"No matching items: no image vectors made by {MODEL} (768 dims) to compare; "
        "not compared: 4 made by offline-hashed-vision-v1"
    ), out
