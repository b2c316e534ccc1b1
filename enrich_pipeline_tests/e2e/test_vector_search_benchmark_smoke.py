"""A smoke run of the vector search benchmark (``python -m benchmarks.vector_search``) at a tiny
size, so it cannot rot: every case is timed, the HNSW cases (where pgvector is there) use their
index and find most of what exact ranking finds. No timing is judged: at this size, on a shared
machine, they say nothing about a million vectors."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.vector_search import main
from enrich_pipeline.db.search_rank import EF_SEARCH_FILTERED


def test_vector_search_benchmark_times_every_case(pg_conninfo: str, tmp_path: Path) -> None:
    target = tmp_path / "vector_search.json"
    argv = ["--rows", "3000", "--users", "10", "--dims", "16", "--queries", "5"]
    assert main([*argv, "--exact-queries", "3", "--database-url", pg_conninfo, "--json",
                 str(target)]) == 0  # fmt: skip
    result = json.loads(target.read_text())
    assert 2900 < result["vectors"] <= 3000
    cases = {(c["method"], c["filter"], c["ef_search"]): c for c in result["cases"]}
    for key in (("sql", "none", None), ("sql", "color", None), ("sql", "user", None)):
        assert key in cases
    for (method, _, _), case in cases.items():
        assert len(case["ms"]) == case["queries"] and all(ms > 0 for ms in case["ms"])
        assert case["hits"] == 10 * case["queries"], case
        assert case["p95_ms"] >= case["p50_ms"] > 0
        if method == "pgvector-hnsw":
            assert case["uses_index"] is True, case
            assert case["recall_at_10"] >= 0.5, case
            # No answer nearer than the exact 10th (but for float4 against float8 rounding).
            assert case["distance_ratio"] >= 0.999, case
    if result["index"] is not None:
        assert ("pgvector-hnsw", "none", 40) in cases
        assert {ef for m, f, ef in cases if (m, f) == ("pgvector-hnsw", "color")} == {
            40,
            100,
            EF_SEARCH_FILTERED,
        }
