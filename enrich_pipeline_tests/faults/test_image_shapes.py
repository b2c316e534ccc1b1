"""Images of extreme shape through the command line, against the stand-in (which refuses what
DashScope refuses: a side of 10 px or less, a ratio beyond 200:1) and a real PostgreSQL.

Within the ratio, a side the downscale would take under the minimum is padded and the row is
captioned by one answered call; beyond it the row fails as its permanent ``too_small``, with no
call paid, its row untouched, and no later run trying it again.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

from enrich_pipeline_tests.helpers import Items, run_cli, stat
from enrich_pipeline_tests.standin import StandIn

_ITEM = re.compile(r"^\[\d+\] item (\S+) \(user .*\): (OK|FAILED|SKIPPED)$")


def report_items(report: str) -> dict[str, tuple[str, str]]:
    """item id -> (OK/FAILED/SKIPPED, reason) from the per-item report."""
    found: dict[str, tuple[str, str]] = {}
    current: str | None = None
    for line in report.splitlines():
        match = _ITEM.match(line)
        if match:
            current = match.group(1)
            found[current] = (match.group(2), "")
        elif current and line.startswith("    Reason:  "):
            found[current] = (found[current][0], line.removeprefix("    Reason:  "))
    return found


def picture(folder: Path, name: str, size: tuple[int, int]) -> str:
    path = folder / f"{name}.png"
    Image.new("RGB", size, (180, 60, 40)).save(path)
    return str(path)


def test_extreme_shapes_are_padded_or_refused_before_any_call(
    env: pytest.MonkeyPatch, items: Items, standin: StandIn, tmp_path: Path
) -> None:
    padded = {
        items.add("alice", picture(tmp_path, "wide", (2000, 10)), metadata={"n": 1}): "2000x10",
        items.add("alice", picture(tmp_path, "tall", (10, 2000)), metadata={"n": 2}): "10x2000",
        items.add("alice", picture(tmp_path, "icon", (5, 5)), metadata={"n": 3}): "5x5",
        items.add("alice", picture(tmp_path, "photo", (320, 240)), metadata={"n": 4}): "320x240",
    }
    refused = {
        items.add("alice", picture(tmp_path, "strip", (1, 100000)), metadata={"k": 1}): "1x100000",
        items.add("alice", picture(tmp_path, "line", (2010, 10)), metadata={"k": 2}): "2010x10",
    }
    before = {i: items.row(i) for i in refused}

    code, report = run_cli(["--user-id", "alice", "--no-caption-embedding"])

    assert code == 0, report
    assert stat(report, "Succeeded") == "4" and stat(report, "Failed") == "2", report
    shown = report_items(report)
    for item_id, size in refused.items():
        mark, reason = shown[item_id]
        assert mark == "FAILED", report
        assert f"image too narrow for the model: {size} is longer than 200:1" in reason
    # One call per captioned row, every one answered: nothing refused by the service, nothing
    # sent for the refused rows.
    assert standin.count("chat") == len(padded)
    assert standin.count("chat", status=200) == len(padded)
    for item_id, size in padded.items():
        md = items.row(item_id)["metadata"]
        assert md["caption"] and md["n"], size

    # The database: the refused rows untouched, in the ledger as permanent too_small.
    ledger = {
        r[0]: r[1:]
        for r in items.execute(
            "SELECT item_id, error_code, permanent, attempts, last_error FROM {ns}.enrich_failures"
        )
    }
    assert set(ledger) == set(refused)
    for item_id, size in refused.items():
        assert items.row(item_id) == before[item_id]
        error_code, permanent, attempts, last_error = ledger[item_id]
        assert (error_code, permanent, attempts) == ("too_small", True, 1)
        assert size in last_error and "200:1" in last_error
    assert items.execute("SELECT count(*) FROM {ns}.enrich_claims") == [(0,)]

    # A later run has nothing to do for them: no call, attempts unchanged.
    code, report = run_cli(["--user-id", "alice", "--no-caption-embedding"])
    assert code == 0, report
    assert "No pending items for user 'alice': nothing to do." in report
    assert standin.count("chat") == len(padded)
    assert items.execute("SELECT sum(attempts) FROM {ns}.enrich_failures") == [(2,)]
