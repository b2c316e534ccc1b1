"""Re-captioning on a model or prompt change: explicit, per user, old caption kept until
the new one is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from enrich_pipeline_tests.helpers import Items, mean_of, run_cli, stat
from enrich_pipeline_tests.standin import StandIn


def test_recaption_replaces_only_pipeline_captions_of_the_chosen_user(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path, standin: StandIn
) -> None:
    env.setenv("DASHSCOPE_VISION_MODEL", "qwen-vl-old")
    mine = [items.add("alice", str(image_dir / f"{c}.jpg")) for c in ("blue", "red", "green")]
    theirs = items.add("bob", str(image_dir / "yellow.jpg"))
    assert run_cli([])[0] == 0
    by_hand = items.add("alice", str(image_dir / "cyan.jpg"), metadata={"caption": "Mine."})
    before = {i: items.row(i)["metadata"] for i in mine}
    assert {md["caption_model"] for md in before.values()} == {"qwen-vl-old"}

    env.setenv("DASHSCOPE_VISION_MODEL", "qwen-vl-new")
    # Never by surprise: a plain run with the new model leaves captioned rows alone.
    code, report = run_cli(["--user-id", "alice"])
    assert code == 0 and "No pending items" in report
    # The red image is rejected by the new model: its old caption must survive.
    standin.add_rule("moderation", color=mean_of(image_dir / "red.jpg"), tolerance=12)
    code, report = run_cli(["--user-id", "alice", "--recaption"])
    assert code == 0, report
    assert (stat(report, "Total"), stat(report, "Succeeded"), stat(report, "Failed")) == (
        "3",
        "2",
        "1",
    )
    after = {i: items.row(i)["metadata"] for i in mine}
    blue, red, green = mine
    for item in (blue, green):
        assert after[item]["caption_model"] == "qwen-vl-new"
        assert after[item]["caption_generated_at"] > before[item]["caption_generated_at"]
    assert after[red] == before[red]
    assert items.row(by_hand)["metadata"] == {"caption": "Mine."}
    assert items.row(theirs)["metadata"]["caption_model"] == "qwen-vl-old"
    # Nothing left to re-caption but the rejected row, which is in the ledger.
    code, report = run_cli(["--user-id", "alice", "--recaption"])
    assert "No pending items" in report


def test_recaption_requires_a_user(env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    code, _ = run_cli(["--recaption"])
    assert code == 2 and "--recaption needs --user-id" in capsys.readouterr().err
