"""Stale rows in batch mode, through ``enrich-batch`` against the stand-in's Batch API: under
ENRICH_ON_IMAGE_CHANGE=recaption a row whose image changed since the pipeline captioned it is
submitted with the pending ones and re-captioned at collect time, recording its new image's
digest; a caption someone writes while the batch is out wins; people's captions are never
taken; ``flag`` and ``ignore`` submit pending rows only; the same bytes at a new URL are
written from the answer cache at submit time, without a line."""

from __future__ import annotations

import hashlib
import io
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from enrich_pipeline.cli import batch as batch_mode
from enrich_pipeline.db.store import Store
from enrich_pipeline_tests.helpers import Items, run_cli
from enrich_pipeline_tests.standin import StandIn

OLD_CAPTION = "A red panel on a pale wall."


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def captioned_from(image: str, **extra: Any) -> dict[str, Any]:
    """Metadata as the pipeline wrote it for ``image`` (its digest recorded)."""
    return {
        "caption": OLD_CAPTION,
        "caption_i18n": {"en": OLD_CAPTION},
        "dominant_colors": ["#c82828"],
        "style_tags": ["minimalist"],
        "object_tags": ["panel"],
        "caption_model": "qwen3-vl-plus",
        "caption_prompt_version": "v1",
        "caption_generated_at": "2026-01-01T00:00:00Z",
        "caption_image_digest": md5(image),
        **extra,
    }


def change_image(items: Items, item_id: str, image: str) -> None:
    """The app replaces the item's picture: only ``image`` changes."""
    items.execute("UPDATE {items} SET image = %s WHERE id::text = %s", (image, item_id))


def batch_cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = batch_mode.main(list(argv), out=out)
    return code, out.getvalue()


def collect_when_ended(timeout: float = 20.0) -> str:
    """``enrich-batch collect`` (which polls first) until it has collected something."""
    deadline = time.monotonic() + timeout
    while True:
        code, out = batch_cli("collect", "--user-id", "alice")
        assert code == 0, out
        if "nothing to collect" not in out:
            return out
        assert time.monotonic() < deadline, out
        time.sleep(0.05)


@pytest.fixture
def server(standin: StandIn) -> Any:
    standin.reset_batches()
    yield standin
    standin.reset_batches()


def test_a_stale_row_submitted_in_batch_is_recaptioned_and_records_the_new_digest(
    env: pytest.MonkeyPatch, items: Items, store: Store, image_dir: Path, server: StandIn
) -> None:
    blue, red = str(image_dir / "blue.jpg"), str(image_dir / "red.jpg")
    stale = items.add("alice", blue, metadata=captioned_from(red, sku="s-1"))
    pending = items.add("alice", str(image_dir / "green.jpg"))
    # A person's caption records no digest: never stale, whatever the image.
    by_hand = items.add("alice", str(image_dir / "yellow.jpg"), metadata={"caption": "mine"})
    cyan = str(image_dir / "cyan.jpg")
    current = items.add("alice", cyan, metadata=captioned_from(cyan))
    untouched = {i: items.row(i) for i in (by_hand, current)}

    code, out = batch_cli("submit", "--user-id", "alice")

    assert code == 0, out
    assert "2 item(s) in 1 batch(es)" in out and "1 of them stale" in out
    recorded = dict(items.execute("SELECT item_id, replaces_digest FROM {ns}.enrich_batch_items"))
    assert recorded == {stale: md5(red), pending: None}

    out = collect_when_ended()

    assert "total 2, succeeded 2, failed 0, skipped 0" in out, out
    md = items.row(stale)["metadata"]
    assert md["caption"] != OLD_CAPTION and md["caption_i18n"] == {"en": md["caption"]}
    assert md["caption_image_digest"] == md5(blue)
    assert md["dominant_colors"] != ["#c82828"] and md["object_tags"] != ["panel"]
    assert md["caption_generated_at"] > "2026-01-01" and md["sku"] == "s-1"
    assert items.row(pending)["metadata"]["caption_image_digest"] == md5(
        str(image_dir / "green.jpg")
    )
    assert {i: items.row(i) for i in untouched} == untouched
    assert store.items.failures("alice") == []
    # Nothing pending or stale is left.
    code, out = batch_cli("submit", "--user-id", "alice")
    assert code == 0 and "0 item(s) in 0 batch(es)" in out, out


def test_someones_caption_written_while_the_batch_was_out_wins(
    env: pytest.MonkeyPatch, items: Items, store: Store, image_dir: Path, server: StandIn
) -> None:
    blue, red = str(image_dir / "blue.jpg"), str(image_dir / "red.jpg")
    stale = items.add("alice", blue, metadata=captioned_from(red))
    server.batch_delay = 0.5  # the batch is still out when the person writes
    code, out = batch_cli("submit", "--user-id", "alice")
    assert code == 0 and "1 of them stale" in out, out

    items.write_by_hand(stale, caption="a blue door, by hand")
    out = collect_when_ended()

    assert "total 1, succeeded 0, failed 0, skipped 1" in out, out
    md = items.row(stale)["metadata"]
    assert md["caption"] == "a blue door, by hand"
    assert md["caption_image_digest"] == md5(red)  # the new caption's, untouched
    assert store.items.failures("alice") == []
    assert items.execute("SELECT count(*) FROM {ns}.enrich_claims") == [(0,)]


@pytest.mark.parametrize("mode", ["flag", "ignore"])
def test_flag_and_ignore_submit_pending_rows_only(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path, server: StandIn, mode: str
) -> None:
    blue, red = str(image_dir / "blue.jpg"), str(image_dir / "red.jpg")
    stale = items.add("alice", blue, metadata=captioned_from(red))
    pending = items.add("alice", str(image_dir / "green.jpg"))

    code, out = batch_cli("submit", "--user-id", "alice", "--on-image-change", mode)

    assert code == 0, out
    assert "1 item(s) in 1 batch(es)" in out and "0 of them stale" in out
    assert items.execute("SELECT item_id FROM {ns}.enrich_batch_items") == [(pending,)]
    md = items.row(stale)["metadata"]
    assert md["caption"] == OLD_CAPTION
    if mode == "flag":
        assert md["caption_stale"] is True and "1 stale row(s) flagged" in out
    else:
        assert "caption_stale" not in md and "flagged" not in out


def test_the_same_bytes_at_a_new_url_are_written_at_submit_without_a_line(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path, server: StandIn, tmp_path: Path
) -> None:
    first = str(image_dir / "blue.jpg")
    moved = tmp_path / "moved-blue.jpg"
    shutil.copy(first, moved)
    row = items.add("alice", first)
    assert run_cli(["--user-id", "alice"])[0] == 0  # captioned online: the answer is cached
    before = items.row(row)["metadata"]

    change_image(items, row, str(moved))
    code, out = batch_cli("submit", "--user-id", "alice")

    assert code == 0, out
    assert "0 item(s) in 0 batch(es)" in out
    assert "written at once: 1 from the caption cache (1 stale)" in out
    assert not server.files  # nothing uploaded
    after = items.row(row)["metadata"]
    assert after["caption_image_digest"] == md5(str(moved))
    assert after["caption"] == before["caption"]
