"""A smoke run of the benchmark (``python -m benchmarks.bench``) at tiny sizes, so it cannot rot.

Only that every figure is produced and sane is checked, never a timing: the figures of a run
this small (and on a shared CI machine) say nothing about the pipeline's speed.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from benchmarks.bench.cli import main as bench_main
from enrich_pipeline.db.pending_index import INDEX_SUFFIX

TINY = [
    "--n", "20",
    "--latency", "0.01",
    "--embedding-latency", "0.01",
    "--batch-size", "10",
    "--legacy-defaults-n", "20",
    "--memory-n", "20,40",
    "--memory-latency", "0.01",
    "--ratelimit-rpm", "600",
    "--ratelimit-seconds", "2",
    "--sensor-rows", "1000",
    "--sensor-ticks", "2",
    "--cpu-images", "2",
    "--cpu-rounds", "1",
    "--worker-timeout", "120",
    "--preload",
]  # fmt: skip

TARGETS = {
    "CLI items/s (N=20)": "throughput",
    "Dagster job items/s (N=20)": "throughput",
    "CLI / legacy, both at legacy defaults": "legacy defaults",
    "CLI at C=16, batch 10 / legacy at defaults": "legacy defaults",
    "peak RSS at N=40": "memory",
    "calls answered 429": "rate limit",
    "4000x3000 photo sent as": "image tokens",
    "load + colors + downscale + tags": "local CPU",
    "tick, no cursor (all users requested), median": "sensor",
    f"partial index items{INDEX_SUFFIX} in the plan": "sensor",
}


def test_benchmark_produces_every_figure(pg_conninfo: str, tmp_path: Path) -> None:
    out = io.StringIO()
    target = tmp_path / "bench.json"
    code = bench_main([*TINY, "--database-url", pg_conninfo, "--json", str(target)], out=out)
    text = out.getvalue()
    assert code == 0, text
    doc = json.loads(target.read_text())
    figures = doc["figures"]

    # Every target is there, in its section, with a ratio and a verdict.
    for name, section in TARGETS.items():
        found = [f for f in figures if f["name"].startswith(name) and f["verdict"]]
        assert len(found) == 1, (name, text)
        (figure,) = found
        assert section in figure["section"], (figure, section)
        assert figure["verdict"] in ("PASS", "MISS"), figure
        if figure["unit"] != "yes/no":
            assert figure["ratio"] is not None and math.isfinite(figure["ratio"]), figure
            assert figure["ratio"] >= 0, figure
    assert sum(f["verdict"] in ("PASS", "MISS") for f in figures) == len(TARGETS)

    # Every figure is a finite number; rates, CPU, memory and tokens are positive.
    for f in figures:
        assert f["value"] is not None and math.isfinite(f["value"]), f
        assert f["value"] >= 0, f
        if f["unit"] in ("/s", "ms", "MB", "tokens", "x") and "growth" not in f["name"]:
            assert f["value"] > 0, f
        if f["bound"] is not None and f["unit"] == "/s":
            assert f["ratio"] == f["value"] / f["bound"], f

    results = doc["results"]
    for key in (
        "cli",
        "legacy_same",
        "dagster",
        "legacy_defaults",
        "cli_defaults",
        "memory_small",
        "memory_large",
        "ratelimit",
    ):
        run = results[key]
        assert run["complete"] and run["exit_code"] == 0, (key, run)
        assert run["calls"]["chat_ok"] == run["n"], (key, run["calls"])
        assert run["image_tokens_per_item_server"] > 0, key
    assert results["sensor"]["pending_rows"] == 10 and results["sensor"]["index_used"]
    assert "PASS" in text or "MISS" in text
