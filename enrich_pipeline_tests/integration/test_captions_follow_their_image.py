"""Captions that follow their image: a row whose image changed since the pipeline captioned it
is stale, and ENRICH_ON_IMAGE_CHANGE says what happens to it (recaption by default, flag, or
ignore); people's captions are never touched; old pipeline captions are adopted without a
call; forgetting cached answers marks the rows they fed stale."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from enrich_pipeline.db.stale import FORGOTTEN
from enrich_pipeline.db.store import Store
from enrich_pipeline.db.writes import SuccessRow, replacing
from enrich_pipeline_tests.helpers import Items, good_chat_calls, run_cli, stat
from enrich_pipeline_tests.standin import StandIn


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def change_image(items: Items, item_id: str, image: str) -> None:
    """The app replaces the item's picture: only ``image`` changes."""
    items.execute("UPDATE {items} SET image = %s WHERE id::text = %s", (image, item_id))


def test_a_replaced_image_is_recaptioned_and_records_its_new_digest(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path, standin: StandIn
) -> None:
    blue, red = str(image_dir / "blue.jpg"), str(image_dir / "red.jpg")
    row = items.add("alice", blue)
    other = items.add("alice", str(image_dir / "green.jpg"))
    assert run_cli(["--user-id", "alice"])[0] == 0
    before = items.row(row)["metadata"]
    assert before["caption_image_digest"] == md5(blue)
    untouched = items.row(other)
    calls = good_chat_calls(standin)

    change_image(items, row, red)
    code, report = run_cli(["--user-id", "alice"])

    assert code == 0, report
    assert "Pending items: 0" in report
    assert (
        "Stale items: 1 (image changed since captioned; ENRICH_ON_IMAGE_CHANGE=recaption" in report
    )
    assert (stat(report, "Total"), stat(report, "Succeeded")) == ("1", "1")
    assert good_chat_calls(standin) == calls + 1
    after = items.row(row)["metadata"]
    assert after["caption_image_digest"] == md5(red)
    assert after["caption_content_sha256"] != before["caption_content_sha256"]
    assert after["caption_generated_at"] > before["caption_generated_at"]
    assert after["dominant_colors"] != before["dominant_colors"]
    assert items.row(other) == untouched
    # Nothing stale is left: a second run has nothing to do.
    code, report = run_cli(["--user-id", "alice"])
    assert "No pending items" in report and "Stale items" not in report


def test_the_same_bytes_at_a_new_url_cost_no_call_only_a_new_digest(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path, standin: StandIn, tmp_path: Path
) -> None:
    first = str(image_dir / "blue.jpg")
    moved = tmp_path / "moved-blue.jpg"
    shutil.copy(first, moved)
    row = items.add("alice", first)
    assert run_cli(["--user-id", "alice"])[0] == 0
    before = items.row(row)["metadata"]
    calls = good_chat_calls(standin)

    change_image(items, row, str(moved))
    code, report = run_cli(["--user-id", "alice"])

    assert code == 0, report
    assert stat(report, "Succeeded") == "1"
    assert good_chat_calls(standin) == calls  # the answer cache, by the image's content
    after = items.row(row)["metadata"]
    assert after["caption_image_digest"] == md5(str(moved))
    assert after["caption_content_sha256"] == before["caption_content_sha256"]
    assert (after["caption"], after["dominant_colors"]) == (
        before["caption"],
        before["dominant_colors"],
    )


def test_captions_written_by_people_are_never_replaced(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path, standin: StandIn
) -> None:
    by_hand = items.add("alice", str(image_dir / "blue.jpg"), metadata={"caption": "Mine."})
    # A person's caption on a row the pipeline had captioned before image digests.
    legacy = items.add(
        "alice",
        str(image_dir / "green.jpg"),
        metadata={"caption": "Old.", "caption_model": "qwen-vl-old"},
    )
    change_image(items, by_hand, str(image_dir / "red.jpg"))
    change_image(items, legacy, str(image_dir / "yellow.jpg"))
    code, report = run_cli(["--user-id", "alice"])
    assert code == 0 and "No pending items" in report and "Stale" not in report
    assert items.row(by_hand)["metadata"] == {"caption": "Mine."}
    assert items.row(legacy)["metadata"] == {"caption": "Old.", "caption_model": "qwen-vl-old"}
    assert good_chat_calls(standin) == 0


def test_someone_elses_caption_written_meanwhile_wins(store: Store, items: Items) -> None:
    first = "https://img.example.test/1.jpg"
    ids = [
        items.add(
            "alice",
            "https://img.example.test/2.jpg",
            metadata={"caption": "Old caption.", "caption_image_digest": md5(first)},
        )
        for _ in range(3)
    ]
    claimed, skipped = store.items.claim(
        "alice", ids, worker="w", lease_seconds=60, max_attempts=3, stale="recaption"
    )
    assert sorted(i.id for i in claimed) == sorted(ids) and skipped == []
    by_person, by_other_run, free = sorted(claimed, key=lambda i: int(i.id))
    # Meanwhile a person writes a caption, and another writer records a new digest with the
    # same caption text (an answer from the cache reads the same).
    items.write_by_hand(by_person.id, caption="Written by a person.")
    items.write_by_hand(by_other_run.id, caption_image_digest=md5(by_other_run.image))

    outcome = store.items.write_chunk(
        "alice",
        worker="w",
        successes=[
            SuccessRow(
                i.id,
                i.image,
                {"caption": "New caption.", "caption_image_digest": md5(i.image)},
                **replacing(i.metadata),
            )
            for i in (by_person, by_other_run, free)
        ],
        failures=[],
    )

    assert outcome.written == [free.id]
    assert sorted(outcome.skipped) == sorted([by_person.id, by_other_run.id])
    assert items.row(by_person.id)["metadata"]["caption"] == "Written by a person."
    assert items.row(by_other_run.id)["metadata"]["caption"] == "Old caption."
    assert items.row(free.id)["metadata"] == {
        "caption": "New caption.",
        "caption_image_digest": md5(free.image),
    }


def test_flag_mode_marks_stale_rows_without_a_call_and_a_recaption_clears_the_mark(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path, standin: StandIn
) -> None:
    row = items.add("alice", str(image_dir / "blue.jpg"))
    assert run_cli(["--user-id", "alice"])[0] == 0
    before = items.row(row)["metadata"]
    calls = good_chat_calls(standin)
    change_image(items, row, str(image_dir / "red.jpg"))

    env.setenv("ENRICH_ON_IMAGE_CHANGE", "flag")
    code, report = run_cli(["--user-id", "alice"])
    assert code == 0, report
    assert "Stale items: 1 (image changed since captioned, 1 flagged;" in report
    assert "No pending items" in report
    assert good_chat_calls(standin) == calls
    flagged = items.row(row)["metadata"]
    assert flagged == {**before, "caption_stale": True}
    # Flagging again changes nothing.
    stamp = items.row(row)["updated_at"]
    assert run_cli(["--user-id", "alice"])[0] == 0
    assert items.row(row)["updated_at"] == stamp

    env.setenv("ENRICH_ON_IMAGE_CHANGE", "recaption")
    code, report = run_cli(["--user-id", "alice"])
    assert code == 0 and stat(report, "Succeeded") == "1", report
    after = items.row(row)["metadata"]
    assert "caption_stale" not in after
    assert after["caption_image_digest"] == md5(str(image_dir / "red.jpg"))


def test_a_flag_comes_off_when_the_image_changes_back(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path
) -> None:
    blue = str(image_dir / "blue.jpg")
    row = items.add("alice", blue)
    assert run_cli(["--user-id", "alice"])[0] == 0
    env.setenv("ENRICH_ON_IMAGE_CHANGE", "flag")
    change_image(items, row, str(image_dir / "red.jpg"))
    assert run_cli(["--user-id", "alice"])[0] == 0
    assert items.row(row)["metadata"]["caption_stale"] is True
    change_image(items, row, blue)
    assert run_cli(["--user-id", "alice"])[0] == 0
    assert "caption_stale" not in items.row(row)["metadata"]


def test_ignore_mode_leaves_stale_rows_alone_but_counts_them(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path, standin: StandIn, store: Store
) -> None:
    row = items.add("alice", str(image_dir / "blue.jpg"))
    assert run_cli([])[0] == 0
    before = items.row(row)
    calls = good_chat_calls(standin)
    change_image(items, row, str(image_dir / "red.jpg"))

    env.setenv("ENRICH_ON_IMAGE_CHANGE", "ignore")
    code, report = run_cli([])
    assert code == 0
    assert "Stale items: 1 (image changed since captioned; ENRICH_ON_IMAGE_CHANGE=ignore" in report
    assert "No pending items for any user" in report
    assert good_chat_calls(standin) == calls
    assert items.row(row)["metadata"] == before["metadata"]
    assert store.items.count_stale("alice").stale == 1
    assert store.summary.user_items(["alice"], max_attempts=3)["alice"].stale == 1
    # The command-line flag sets the same thing for one run.
    env.delenv("ENRICH_ON_IMAGE_CHANGE")
    code, report = run_cli(["--on-image-change", "recaption"])
    assert code == 0 and stat(report, "Succeeded") == "1"
    assert store.summary.user_items(["alice"], max_attempts=3)["alice"].stale == 0


def test_captions_from_before_digests_are_adopted_without_a_call(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path, standin: StandIn, store: Store
) -> None:
    old = {"caption": "Old.", "caption_model": "qwen-vl-old", "caption_prompt_version": "v1"}
    alice = [
        items.add("alice", f"https://img.example.test/a{n}.jpg", metadata=old) for n in range(3)
    ]
    bob = items.add("bob", "https://img.example.test/b.jpg", metadata=old)
    by_hand = items.add("alice", "https://img.example.test/h.jpg", metadata={"caption": "Mine."})

    code, report = run_cli(["--adopt", "--user-id", "alice"])
    assert code == 0, report
    assert "Adopted 3 caption(s) of user 'alice'" in report
    for item in alice:
        row = items.row(item)
        assert row["metadata"] == {
            **old,
            "caption_image_digest": md5(row["image"]),
            "caption_text_digest": md5("Old."),
        }
    assert items.row(bob)["metadata"] == old
    assert items.row(by_hand)["metadata"] == {"caption": "Mine."}

    # Every user, in small batches; what is adopted already is not counted again.
    assert store.items.adopt_captions(batch=1).images == 1
    assert items.row(bob)["metadata"]["caption_image_digest"] == md5(items.row(bob)["image"])
    code, report = run_cli(["--adopt"])
    assert "Adopted 0 caption(s) of every user" in report
    assert good_chat_calls(standin) == 0
    # Adopted rows now follow their image.
    change_image(items, alice[0], "https://img.example.test/new.jpg")
    assert store.items.count_stale("alice").stale == 1


def test_forgetting_cached_answers_marks_the_rows_they_fed_stale_and_they_are_recaptioned(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path, standin: StandIn, store: Store
) -> None:
    blue, red = str(image_dir / "blue.jpg"), str(image_dir / "red.jpg")
    rows = [items.add("alice", blue), items.add("bob", blue), items.add("bob", red)]
    assert run_cli([])[0] == 0
    model = items.row(rows[0])["metadata"]["caption_model"]
    blue_sha = items.row(rows[0])["metadata"]["caption_content_sha256"]
    calls = good_chat_calls(standin)

    code, report = run_cli(["--forget-cache", "--content-sha256", blue_sha])
    assert code == 0, report
    assert (
        f"Forgot 1 cached answer(s) of content sha256 {blue_sha!r}; marked 2 row(s) of 2 "
        "user(s) captioned from them stale (ENRICH_ON_IMAGE_CHANGE=recaption" in report
    )
    assert [items.row(r)["metadata"]["caption_image_digest"] for r in rows] == [
        FORGOTTEN,
        FORGOTTEN,
        md5(red),
    ]
    assert store.items.count_stale().stale == 2
    assert good_chat_calls(standin) == calls

    code, report = run_cli([])
    assert code == 0 and stat(report, "Succeeded") == "2", report
    # Both rows show the one image: one call, the second served by the new answer.
    assert good_chat_calls(standin) == calls + 1
    assert [items.row(r)["metadata"]["caption_image_digest"] for r in rows[:2]] == [md5(blue)] * 2
    assert store.items.count_stale().stale == 0

    # By model: every answer of it, and every row it captioned.
    code, report = run_cli(["--forget-cache", "--model", model])
    assert f"Forgot 2 cached answer(s) of model {model!r}; marked 3 row(s)" in report
    assert items.execute("SELECT count(*) FROM {ns}.enrich_answer_cache") == [(0,)]


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--forget-cache"], "--forget-cache needs --model, --prompt-version or --content-sha256"),
        (["--model", "m"], "go with --forget-cache"),
        (["--forget-cache", "--model", "m", "--user-id", "a"], "the cache is shared"),
        (["--adopt", "--forget-cache", "--model", "m"], "two commands"),
    ],
)
def test_forget_cache_refuses_what_it_cannot_mean(
    env: pytest.MonkeyPatch, items: Items, capsys: pytest.CaptureFixture, argv: list[str], says: str
) -> None:
    code, _ = run_cli(argv)
    assert code == 2 and says in capsys.readouterr().err
