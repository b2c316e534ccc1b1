"""A smoke run of the memory benchmark (``python -m benchmarks.memory``) at a tiny size, so it
cannot rot: every cell is measured and every row captioned. No figure is judged: at this size
the peak is the interpreter's own."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.memory import main


def test_memory_benchmark_measures_every_cell(pg_conninfo: str, tmp_path: Path) -> None:
    target = tmp_path / "memory.json"
    argv = ["--concurrent", "2", "--megapixels", "1", "--budgets", "0:malloc,1500000"]
    argv += ["--latency", "0.01", "--images", str(tmp_path / "images")]
    argv += ["--database-url", pg_conninfo, "--json", str(target)]
    assert main(argv) == 0
    results = json.loads(target.read_text())
    cells = {(r["concurrent"], r["budget"]) for r in results}
    assert cells == {(2, "0:malloc"), (2, "1500000")}
    for r in results:
        assert r["captioned"] == r["rows"] == 8, r
        assert 50 < r["peak_rss_mb"] < 2000, r
        assert r["elapsed_s"] > 0, r
