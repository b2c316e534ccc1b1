"""A smoke run of the 100,000-users benchmark (``python -m benchmarks.scale``) at a tiny size, so
it cannot rot: the sensor's ticks on a PostgreSQL instance and the per-partition costs are
measured and recorded. No timing is judged: at this size, on a shared machine, the figures say
nothing about the goals (the Chromium pages and the deployment part are left to the benchmark)."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import pytest

from benchmarks.scale import main


def test_scale_benchmark_measures_ticks_and_partition_costs(
    pg_conninfo: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One run at a time: no staggered first runs, so one tick can request every user.
    monkeypatch.setenv("ENRICH_MAX_CONCURRENT_RUNS", "1")
    target = tmp_path / "scale.json"
    argv = ["--users", "60", "--rows-per-user", "2", "--parts", "ticks,costs", "--no-pages"]
    argv += ["--sizes", "10,100", "--events", "3", "--requesting-ticks", "2", "--images", "8"]
    argv += ["--database-url", pg_conninfo, "--json", str(target)]
    assert main(argv) == 0
    result = json.loads(target.read_text())

    ticks = result["ticks"]
    first, requesting, every, steady = ticks[0], ticks[1:3], ticks[3], ticks[4:]
    # The first tick adds every user's partition and requests one shared run for all 60 (they
    # fit one run's rows); a tick with its cursor finds nothing changed.
    assert (first["runs"], first["users_requested"]) == (1, 60), first
    assert [t["runs"] for t in requesting] == [0, 0], requesting
    # With room for 10,000 runs, each user gets one of its own.
    assert (every["runs"], every["users_requested"]) == (60, 60), every
    assert [t["runs"] for t in steady] == [0, 0, 0, 0], steady
    assert all(t["ms"] > 0 and t["cursor_bytes"] > 0 for t in result["ticks"])

    costs = result["costs"]
    assert set(costs["add_s"]) == set(costs["read_ms"]) == {"10", "100"}
    assert costs["event_ms"] > 0 and costs["event_bytes"] > 100, costs
    # The benchmark's databases and namespace are gone from the shared server.
    with psycopg.connect(pg_conninfo) as conn:
        left = conn.execute(
            "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'scale\\_%'"
        ).fetchone()
    assert left == (0,)
