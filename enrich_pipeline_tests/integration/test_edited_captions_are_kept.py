"""A caption a person edited is never replaced: the pipeline records the digest of the text it
wrote (``caption_text_digest``); once the caption no longer matches it, the row is the person's,
and a change of its image makes it neither stale, nor flagged, nor marked by a forgotten answer,
nor re-captioned on a model change. ``--adopt`` records the digest for older captions, and
tells a person's edit apart where the row says what the pipeline wrote (``caption_i18n``)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from enrich_pipeline.db.stale import EDITED, FORGOTTEN
from enrich_pipeline.db.store import Store
from enrich_pipeline.db.writes import SuccessRow, replacing
from enrich_pipeline_tests.helpers import Items, good_chat_calls, run_cli, stat
from enrich_pipeline_tests.standin import StandIn


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def change_image(items: Items, item_id: str, image: str) -> None:
    items.execute("UPDATE {items} SET image = %s WHERE id::text = %s", (image, item_id))


def captioned_and_edited(items: Items, image_dir: Path) -> tuple[str, str]:
    """Two rows the pipeline captioned; a person then edits the first one's caption, and the
    app replaces both images. Returns (edited, unedited)."""
    edited = items.add("alice", str(image_dir / "blue.jpg"))
    unedited = items.add("alice", str(image_dir / "green.jpg"))
    assert run_cli(["--user-id", "alice"])[0] == 0
    for row in (edited, unedited):
        meta = items.row(row)["metadata"]
        assert meta["caption_text_digest"] == md5(meta["caption"])
    items.write_by_hand(edited, caption="Our best-selling blue armchair, 2024 edition.")
    change_image(items, edited, str(image_dir / "red.jpg"))
    change_image(items, unedited, str(image_dir / "yellow.jpg"))
    return edited, unedited


def test_an_edited_caption_is_kept_when_its_image_changes_and_an_unedited_one_is_recaptioned(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path, standin: StandIn, store: Store
) -> None:
    edited, unedited = captioned_and_edited(items, image_dir)
    kept = items.row(edited)["metadata"]
    calls = good_chat_calls(standin)
    assert store.items.count_stale("alice").stale == 1
    assert store.items.users_with_pending(3, stale="recaption") == [("alice", 1)]

    code, report = run_cli(["--user-id", "alice"])

    assert code == 0, report
    assert "Stale items: 1 (image changed since captioned;" in report
    assert (stat(report, "Total"), stat(report, "Succeeded")) == ("1", "1")
    assert good_chat_calls(standin) == calls + 1  # the unedited row's, none for the edited one
    assert items.row(edited)["metadata"] == kept
    after = items.row(unedited)["metadata"]
    assert after["caption_image_digest"] == md5(str(image_dir / "yellow.jpg"))
    assert after["caption_text_digest"] == md5(after["caption"])
    # Nothing is stale now: the edited row is not counted, nor work for the sensor.
    assert store.items.count_stale("alice").stale == 0
    assert store.items.users_with_pending(3, stale="recaption") == []
    assert store.summary.user_items(["alice"], max_attempts=3)["alice"].stale == 0
    code, report = run_cli(["--user-id", "alice"])
    assert "No pending items" in report and "Stale" not in report


def test_flag_mode_does_not_flag_an_edited_caption(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path, standin: StandIn, store: Store
) -> None:
    edited, unedited = captioned_and_edited(items, image_dir)
    kept = items.row(edited)["metadata"]
    calls = good_chat_calls(standin)

    env.setenv("ENRICH_ON_IMAGE_CHANGE", "flag")
    code, report = run_cli(["--user-id", "alice"])

    assert code == 0, report
    assert "Stale items: 1 (image changed since captioned, 1 flagged;" in report
    assert good_chat_calls(standin) == calls
    assert items.row(edited)["metadata"] == kept
    assert items.row(unedited)["metadata"]["caption_stale"] is True
    assert store.items.flag_stale("alice") == (0, 0)


def test_a_flag_comes_off_when_a_person_edits_the_flagged_caption(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path, store: Store
) -> None:
    row = items.add("alice", str(image_dir / "blue.jpg"))
    assert run_cli(["--user-id", "alice"])[0] == 0
    env.setenv("ENRICH_ON_IMAGE_CHANGE", "flag")
    change_image(items, row, str(image_dir / "red.jpg"))
    assert run_cli(["--user-id", "alice"])[0] == 0
    assert items.row(row)["metadata"]["caption_stale"] is True

    # The person writes a caption for the new image: it is theirs, no longer stale.
    items.write_by_hand(row, caption="A red square, described by hand.")
    assert store.items.flag_stale("alice") == (0, 1)
    assert "caption_stale" not in items.row(row)["metadata"]
    assert items.row(row)["metadata"]["caption"] == "A red square, described by hand."


def test_forgetting_an_answer_does_not_mark_a_caption_a_person_edited(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path, store: Store
) -> None:
    blue = str(image_dir / "blue.jpg")
    edited, unedited = items.add("alice", blue), items.add("bob", blue)
    assert run_cli([])[0] == 0
    sha = items.row(edited)["metadata"]["caption_content_sha256"]
    items.write_by_hand(edited, caption="Edited by hand.")
    kept = items.row(edited)["metadata"]

    code, report = run_cli(["--forget-cache", "--content-sha256", sha])

    assert code == 0, report
    assert "marked 1 row(s) of 1 user(s)" in report
    assert items.row(edited)["metadata"] == kept
    assert items.row(unedited)["metadata"]["caption_image_digest"] == FORGOTTEN
    assert store.items.count_stale().stale == 1


def test_a_model_change_does_not_recaption_an_edited_caption(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path, store: Store
) -> None:
    edited = items.add("alice", str(image_dir / "blue.jpg"))
    unedited = items.add("alice", str(image_dir / "green.jpg"))
    assert run_cli(["--user-id", "alice"])[0] == 0
    items.write_by_hand(edited, caption="Edited by hand.")

    other = ("another-model", "v9")
    assert store.items.pending_ids("alice", limit=None, max_attempts=3, recaption=other) == [
        unedited
    ]
    assert store.items.count_pending("alice", max_attempts=3, recaption=other) == 1


def test_a_write_never_replaces_a_caption_edited_before_it_was_read(
    store: Store, items: Items
) -> None:
    """The write's own condition, whatever selected the row (a run of an older version, a
    re-caption): the caption it replaces must still be the pipeline's."""
    old = "https://img.example.test/old.jpg"
    ids = [
        items.add(
            "alice",
            "https://img.example.test/new.jpg",
            metadata={
                "caption": caption,
                "caption_image_digest": md5(old),
                "caption_text_digest": md5("The pipeline's caption."),
            },
        )
        for caption in ("Edited by a person.", "The pipeline's caption.")
    ]
    rows = {r[0]: r[1] for r in items.execute("SELECT id::text, metadata FROM {items}")}

    outcome = store.items.write_chunk(
        "alice",
        worker="w",
        successes=[
            SuccessRow(
                i,
                "https://img.example.test/new.jpg",
                {"caption": "New caption.", "caption_text_digest": md5("New caption.")},
                **replacing(rows[i]),
            )
            for i in ids
        ],
        failures=[],
    )

    assert (outcome.written, outcome.skipped) == ([ids[1]], [ids[0]])
    assert items.row(ids[0])["metadata"]["caption"] == "Edited by a person."
    assert items.row(ids[1])["metadata"]["caption"] == "New caption."


def test_captions_from_before_text_digests_are_still_followed_and_adopted(
    env: pytest.MonkeyPatch, items: Items, standin: StandIn, store: Store
) -> None:
    """Rows the pipeline wrote with an image digest but no text digest: stale-able as they are;
    ``--adopt`` records their text, or ``edited`` where ``caption`` is none of the
    ``caption_i18n`` values written with it."""
    captioned = "https://img.example.test/a.jpg"

    def row(caption: str, image: str = captioned) -> str:
        return items.add(
            "alice",
            image,
            metadata={
                "caption": caption,
                "caption_i18n": {"zh": "一把蓝色的椅子。", "en": "A blue chair."},
                "caption_model": "qwen3-vl-plus",
                "caption_image_digest": md5(captioned),
            },
        )

    unedited, edited = row("一把蓝色的椅子。"), row("Our best blue chair.")
    already_stale = row("A blue chair.", image="https://img.example.test/b.jpg")
    legacy = items.add(
        "alice",
        "https://img.example.test/c.jpg",
        metadata={"caption": "Old.", "caption_model": "qwen-vl-old"},
    )
    # Until adopted, a missing text digest counts as the pipeline's caption.
    change_image(items, unedited, "https://img.example.test/changed.jpg")
    assert store.items.count_stale("alice").stale == 2
    change_image(items, unedited, captioned)

    code, report = run_cli(["--adopt", "--user-id", "alice"])

    assert code == 0, report
    assert "Adopted 1 caption(s) of user 'alice'" in report
    assert "Recorded the text of 3 caption(s) written before text digests; 1 of them" in report
    meta = {r: items.row(r)["metadata"] for r in (unedited, edited, already_stale, legacy)}
    assert meta[unedited]["caption_text_digest"] == md5("一把蓝色的椅子。")
    assert meta[edited]["caption_text_digest"] == EDITED
    assert meta[already_stale]["caption_text_digest"] == md5("A blue chair.")
    assert meta[already_stale]["caption_image_digest"] == md5(captioned)  # still stale
    assert meta[legacy]["caption_text_digest"] == md5("Old.")
    assert meta[legacy]["caption_image_digest"] == md5("https://img.example.test/c.jpg")
    assert store.items.count_stale("alice").stale == 1
    # Adopted again: nothing left to do.
    code, report = run_cli(["--adopt", "--user-id", "alice"])
    assert "Adopted 0 caption(s)" in report and "Recorded the text" not in report

    # From now on an edit is noticed, and the edited row stays the person's.
    items.write_by_hand(legacy, caption="Old, edited.")
    for r in (unedited, edited, legacy):
        change_image(items, r, f"https://img.example.test/{r}-new.jpg")
    assert store.items.count_stale("alice").stale == 2  # unedited and already_stale
    assert good_chat_calls(standin) == 0
