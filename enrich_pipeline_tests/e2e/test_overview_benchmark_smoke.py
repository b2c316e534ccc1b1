"""A smoke run of the items_table overview benchmark (``python -m benchmarks.overview``) at a
tiny size, so it cannot rot: the seeded table's figures come back and every statement is timed.
No timing is judged: at this size, on a shared machine, they say nothing about a million rows."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.overview import main


def test_overview_benchmark_times_every_statement(pg_conninfo: str, tmp_path: Path) -> None:
    target = tmp_path / "overview.json"
    argv = ["--rows", "3000", "--users", "10", "--repeats", "2", "--spend", "20"]
    assert main([*argv, "--database-url", pg_conninfo, "--json", str(target)]) == 0
    result = json.loads(target.read_text())
    assert 0 < result["pending"] < result["captioned"] < result["items"] <= result["rows"]
    assert result["stale"] > 0 and result["given_up"] > 0
    # Two caption models, the second language on a third of the rows.
    assert result["groups"] == 4
    for key in ("figures_ms", "spend_ms", "observation_ms"):
        assert len(result[key]) == 2 and all(ms > 0 for ms in result[key]), key
