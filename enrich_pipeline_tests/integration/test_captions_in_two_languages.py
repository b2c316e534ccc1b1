"""A run asked for Chinese and English captions, end to end through the command lines.

``enrich-captions`` with ``ENRICH_CAPTION_LANGUAGES=zh,en`` asks the stand-in once per image
for a structured answer (json_object, as DashScope documents for Qwen3-VL); each row then holds
the Chinese caption in ``caption``, both in ``caption_i18n`` and the model's tags; and
``enrich-search`` finds a row from a query in either language, because the one vector per row
embeds both captions.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from enrich_pipeline.cli.search import main as search_main
from enrich_pipeline_tests.helpers import Items, run_cli
from enrich_pipeline_tests.standin import StandIn

COLORS = ("blue", "red", "green", "yellow")


def test_a_zh_en_run_writes_both_captions_and_either_language_finds_the_row(
    env: pytest.MonkeyPatch,
    items: Items,
    image_dir: Path,
    standin: StandIn,
    capsys: pytest.CaptureFixture[str],
) -> None:
    env.setenv("ENRICH_CAPTION_LANGUAGES", "zh,en")
    env.setenv("ENRICH_ANSWER_FORMAT", "json_object")
    ids = {c: items.add("alice", str(image_dir / f"{c}.jpg")) for c in COLORS}
    code, report = run_cli(["--user-id", "alice", "--max-items", "0"])
    assert code == 0, report
    # One call per image, whatever the number of languages.
    assert standin.count("chat") == len(COLORS)

    stored = {c: items.row(i)["metadata"] for c, i in ids.items()}
    for color, metadata in stored.items():
        assert set(metadata["caption_i18n"]) == {"zh", "en"}, color
        assert metadata["caption"] == metadata["caption_i18n"]["zh"], color
        assert any("\u4e00" <= ch <= "\u9fff" for ch in metadata["caption_i18n"]["zh"]), color
        assert metadata["tags_source"] == "model" and metadata["answer_format"] == "json_object"
        assert metadata["object_tags"], color

    for language in ("zh", "en"):
        query = stored["blue"]["caption_i18n"][language]
        capsys.readouterr()
        assert search_main(["--user-id", "alice", "--top-k", "1", query]) == 0
        out = capsys.readouterr().out
        # The one hit's line names its item (the lines below it name models and lengths).
        assert f" 1. item {ids['blue']} " in out, (language, out)
        assert not any(f" item {ids[c]} " in out for c in COLORS if c != "blue"), (language, out)
