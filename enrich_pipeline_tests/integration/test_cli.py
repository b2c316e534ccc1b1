"""The legacy-compatible command line against the real database and the stand-in server."""

from __future__ import annotations

from pathlib import Path

import pytest

from enrich_pipeline.cli import captions as cli
from enrich_pipeline_tests.helpers import Items, run_cli, stat
from enrich_pipeline_tests.standin import StandIn


def test_legacy_flags_have_legacy_defaults() -> None:
    args = cli.parse_args([])
    assert (
        args.user_id,
        args.batch_size,
        args.max_items,
        args.concurrent,
        args.no_caption_embedding,
    ) == (None, 10, 100, 5, False)


def test_report_numbers_match_the_database(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path, standin: StandIn
) -> None:
    for color in ("blue", "red", "green"):
        items.add("alice", str(image_dir / f"{color}.jpg"), metadata={"src": color})
    items.add("alice", str(image_dir / "broken.jpg"))
    items.add("bob", str(image_dir / "yellow.jpg"))

    code, report = run_cli(["--user-id", "alice", "--batch-size", "2"])

    assert code == 0, report
    assert "Configuration:" in report and "Batch size:       2" in report
    assert "Caption:" in report and "Colors:" in report and "Styles:" in report
    captioned = items.execute(
        "SELECT count(*) FROM {items} WHERE user_id = 'alice'"
        " AND coalesce(metadata->>'caption', '') <> ''"
    )[0][0]
    failed = items.execute("SELECT count(*) FROM {ns}.enrich_failures")[0][0]
    assert stat(report, "Total") == "4"
    assert stat(report, "Succeeded") == str(captioned) == "3"
    assert stat(report, "Failed") == str(failed) == "1"
    assert stat(report, "Skipped") == "0"
    assert stat(report, "Success rate") == "75.0%"
    assert items.execute(
        "SELECT count(*) FROM {items} WHERE user_id = 'bob' AND metadata ? 'caption'"
    ) == [(0,)]
    tokens = int(stat(report, "Tokens used"))
    assert tokens > 0


def test_without_user_id_all_users_are_processed_within_max_items(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path
) -> None:
    for user in ("alice", "bob", "carol"):
        for color in ("blue", "red"):
            items.add(user, str(image_dir / f"{color}.jpg"))
    code, report = run_cli(["--max-items", "5", "--no-caption-embedding"])
    assert code == 0, report
    assert "User:             all users" in report
    assert stat(report, "Total") == "5"
    left = items.execute("SELECT count(*) FROM {items} WHERE NOT metadata ? 'caption'")
    assert left == [(1,)]


def test_missing_api_key_is_one_clear_line(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    items.add("alice", str(image_dir / "blue.jpg"))
    env.delenv("DASHSCOPE_API_KEY")
    code, report = run_cli([])
    err = capsys.readouterr().err
    assert code == 2 and report == ""
    assert err.strip().count("\n") == 0 and "DASHSCOPE_API_KEY" in err
    assert items.execute("SELECT count(*) FROM {items} WHERE metadata ? 'caption'") == [(0,)]


def test_nothing_pending_says_so(env: pytest.MonkeyPatch, items: Items) -> None:
    code, report = run_cli(["--user-id", "nobody"])
    assert code == 0
    assert "No pending items for user 'nobody'" in report


def test_offline_flag_labels_rows(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path, standin: StandIn
) -> None:
    item = items.add("alice", str(image_dir / "blue.jpg"))
    code, report = run_cli(["--offline"])
    assert code == 0 and "OFFLINE" in report
    md = items.row(item)["metadata"]
    assert md["caption_source"] == "offline" and md["caption_model"] == "offline-synthetic"
    assert standin.count() == 0
    # No tokens, calls or cost of zero, which would read as a free model: no call at all.
    assert "API calls:        none (offline provider: no model was called)" in report
    assert "Tokens used" not in report and "Estimated cost" not in report
