"""The sensor's back-off after runs that left their users' rows, and what its cursor keeps."""

from __future__ import annotations

import json

from enrich_pipeline.defs.reruns import Hold, Reruns, Retry, settings_fingerprint
from enrich_pipeline.settings import AutomationSettings, DashScopeSettings


def test_the_wait_doubles_after_each_unfinished_run_up_to_the_cap() -> None:
    defaults = AutomationSettings.from_env({})
    assert [defaults.rerun_wait(n) for n in range(8)] == [0, 60, 120, 240, 480, 960, 1800, 1800]
    assert defaults.rerun_wait(10_000) == 1800
    tuned = AutomationSettings.from_env(
        {"ENRICH_RERUN_BACKOFF": "5", "ENRICH_RERUN_BACKOFF_MAX": "12"}
    )
    assert [tuned.rerun_wait(n) for n in (1, 2, 3)] == [5, 10, 12]


def test_the_cursor_keeps_streaks_and_the_hold_and_reads_older_cursors() -> None:
    reruns = Reruns(
        watermark=1_700_000_000.5,
        recent=["run-a"],
        hold=Hold("0123456789abcdef", "invalid_api_key", "run-b", 1_700_000_000.0),
        generation=7,
    )
    reruns.retry[b"\x01" * 6] = Retry(3, 1_700_000_240)
    data = {"v": 3, "seen": "", **reruns.to_json()}
    back = Reruns.parse(json.dumps(data))
    assert back.retry == reruns.retry and back.hold == reruns.hold
    assert (back.watermark, back.recent, back.generation) == (1_700_000_000.5, {"run-a"}, 7)
    # 11 bytes a user in back-off.
    assert len(data["retry"]) == 16
    # A cursor of the previous version (seen digests only) starts with nothing waiting.
    older = Reruns.parse(json.dumps({"v": 2, "seen": ""}))
    assert older.retry == {} and older.hold is None and older.watermark is None


def test_the_settings_digest_changes_with_the_key_and_shows_none_of_it() -> None:
    key = "sk-0123456789abcdef0123"
    one = settings_fingerprint(DashScopeSettings.from_env({"DASHSCOPE_API_KEY": key}))
    other = settings_fingerprint(DashScopeSettings.from_env({"DASHSCOPE_API_KEY": key + "x"}))
    model = settings_fingerprint(
        DashScopeSettings.from_env(
            {"DASHSCOPE_API_KEY": key, "DASHSCOPE_VISION_MODEL": "qwen-vl-max"}
        )
    )
    assert len({one, other, model}) == 3
    assert one == settings_fingerprint(DashScopeSettings.from_env({"DASHSCOPE_API_KEY": key}))
    for digest in (one, other, model):
        assert len(digest) == 16 and key[-4:] not in digest and key[3:9] not in digest
