"""A smoke run of the cost benchmark (``python -m benchmarks.cost``) at a tiny size, so it cannot
rot: every row is measured and priced where the price table has the model. The figures are not
judged beyond their order: structured answers cost more output than a plain caption, two
languages more than one, and a model left thinking far more than either."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from benchmarks.cost import main


def test_cost_benchmark_prices_every_row(tmp_path: Path) -> None:
    target = tmp_path / "cost.json"
    out = io.StringIO()
    argv = ["--n", "2", "--models", "qwen3-vl-plus,qwen3.5-plus,qwen3.6-flash"]
    assert main([*argv, "--json", str(target)], out=out) == 0
    rows = {(r["model"], r["answer"]): r for r in json.loads(target.read_text())}
    assert set(rows) == {
        (model, answer)
        for model in ("qwen3-vl-plus", "qwen3.5-plus", "qwen3.6-flash")
        for answer in ("text en", "structured en", "structured zh,en")
    } | {("qwen3.5-plus", "thinking on"), ("qwen3.6-flash", "thinking on")}
    for row in rows.values():
        assert row["images"] == 2
        assert row["input_tokens"] > 500, row  # a 1600x1200 photo is ~590 image tokens
        assert row["output_tokens"] > 0, row
    for model in ("qwen3-vl-plus", "qwen3.5-plus"):
        text, one, two = (rows[model, a] for a in ("text en", "structured en", "structured zh,en"))
        assert text["output_tokens"] < one["output_tokens"] < two["output_tokens"]
        assert 0 < text["usd_per_1000"] < one["usd_per_1000"] < two["usd_per_1000"]
        assert math.isfinite(two["cny_per_1000"])
    thinking = rows["qwen3.5-plus", "thinking on"]
    assert thinking["thinking_tokens"] > 5 * rows["qwen3.5-plus", "text en"]["output_tokens"]
    assert thinking["usd_per_1000"] > rows["qwen3.5-plus", "structured zh,en"]["usd_per_1000"]
    # No price found for qwen3.6-flash: measured, not priced.
    assert rows["qwen3.6-flash", "text en"]["usd_per_1000"] is None
    assert "qwen3.6-flash" in out.getvalue() and "x text" in out.getvalue()
