"""The relevance figures: recall@5 and MRR as defined, and the labelled set consistent with the
sample drawings it names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from enrich_pipeline.db.embedded import SAMPLES, sample_title
from enrich_pipeline.pipeline.relevance import (
    Figures,
    load_set,
    recall_at,
    reciprocal_rank,
)


def test_recall_at_five_counts_the_relevant_among_the_first_five() -> None:
    ranked = ["a", "b", "c", "d", "e", "f"]
    assert recall_at(ranked, frozenset({"a"})) == 1.0
    assert recall_at(ranked, frozenset({"a", "f"})) == 0.5  # f is sixth
    assert recall_at([], frozenset({"a"})) == 0.0


def test_reciprocal_rank_is_of_the_first_relevant_hit_within_ten() -> None:
    ranked = [str(n) for n in range(12)]
    assert reciprocal_rank(ranked, frozenset({"0"})) == 1.0
    assert reciprocal_rank(ranked, frozenset({"2", "5"})) == pytest.approx(1 / 3)
    assert reciprocal_rank(ranked, frozenset({"11"})) == 0.0  # beyond the first ten


def test_a_mode_s_figures_are_the_means_over_its_queries() -> None:
    figures = Figures()
    figures.add(["x", "y"], frozenset({"x"}))
    figures.add(["y", "x"], frozenset({"x"}))
    figures.add(["y", "z"], frozenset({"x"}))
    assert figures.queries == 3
    assert figures.recall == pytest.approx(2 / 3)
    assert figures.mrr == pytest.approx((1 + 0.5 + 0) / 3)


def test_the_project_set_names_only_sample_drawings_in_both_languages() -> None:
    titles = {sample_title(n, u, s) for n, (u, s, _, _) in enumerate(SAMPLES, start=1)}
    queries = load_set()
    assert {q.language for q in queries if q.text} == {"en", "zh"}
    assert any(q.like for q in queries)
    for query in queries:
        assert query.relevant <= titles, query
        assert query.like is None or query.like in titles


def test_a_set_with_a_query_and_no_relevant_item_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "set.json"
    path.write_text(json.dumps({"queries": [{"text": "chair", "relevant": []}]}))
    with pytest.raises(ValueError, match="at least one relevant"):
        load_set(str(path))
