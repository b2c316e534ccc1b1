"""A smoke run of the stale-rows sensor benchmark (``python -m benchmarks.stale_tick``) at a tiny
size, so it cannot rot: every mode is ticked and its work counted. No timing is judged: at this
size, on a shared machine, the figures say nothing about the 200 ms bound."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.stale_tick import main
from enrich_pipeline.db.pending_index import INDEX_SUFFIX


def test_stale_tick_benchmark_measures_every_mode(pg_conninfo: str, tmp_path: Path) -> None:
    target = tmp_path / "stale_tick.json"
    argv = ["--rows", "4000", "--users", "20", "--ticks", "2", "--stale-share", "0.05"]
    argv += ["--pending-share", "0.01", "--database-url", pg_conninfo, "--json", str(target)]
    assert main(argv) == 0
    result = json.loads(target.read_text())
    assert result["index_name"] == f"items{INDEX_SUFFIX}"
    assert result["stale_rows"] > 0 and result["pending_rows"] > 0
    work = {m["mode"]: m["work_rows"] for m in result["modes"]}
    both = result["stale_rows"] + result["pending_rows"]
    assert work == {"recaption": both, "flag": both, "ignore": result["pending_rows"]}
    for m in result["modes"]:
        assert len(m["steady_tick_ms"]) == len(m["requesting_tick_ms"]) == 2, m
        assert m["runs_requested"] >= 1 and "items" in m["plan"], m
        assert m["index"] in ("none", f"items{INDEX_SUFFIX}", "items_enrich_pending_idx")
