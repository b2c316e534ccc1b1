"""How good search is, measured: a labelled query set over the demo's sample drawings, run in
every ranking mode, scored by recall@5 and MRR.

The set (``enrichment/data/relevance_set.json``) names the drawings by title (``01_alice_chair``,
as the demo names its files), so it holds whatever ids the rows get. Text queries are in English
and Chinese; "like" entries ask for the items most like one drawing (``--like``), whose relevant
items are the other drawings of the same subject. Each query runs in each mode the provider can
rank by (caption vectors, image vectors, both fused) over the set's own user only.

recall@5: the share of a query's relevant items among its first five hits, averaged over the
queries. MRR: the mean over the queries of 1/rank of the first relevant hit in the first ten
(0 when none is there), so a mode that puts the right drawing first scores 1.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from enrich_pipeline.db.store import Store
from enrich_pipeline.pipeline.search import Mode, SearchQuery, search
from enrich_pipeline.providers.base import Provider

RECALL_AT = 5
MRR_DEPTH = 10
# The user the set's rows belong to, in the set's own namespace (cli/relevance.py).
SET_USER = "relevance"


@dataclass(frozen=True)
class Query:
    """One labelled query: a text (and its language) or a drawing to find more like."""

    relevant: frozenset[str]
    text: str | None = None
    language: str | None = None
    like: str | None = None

    @property
    def kind(self) -> str:
        return f"text {self.language}" if self.text is not None else "like"

    @property
    def label(self) -> str:
        return self.text if self.text is not None else f"like {self.like}"


def load_set(path: str | None = None) -> list[Query]:
    """The labelled queries: the project's set, or a file of the same shape."""
    if path is None:
        raw = resources.files("enrich_pipeline.enrichment") / "data" / "relevance_set.json"
        doc: Any = json.loads(raw.read_text(encoding="utf-8"))
    else:
        with open(path, encoding="utf-8") as handle:
            doc = json.load(handle)
    queries = [
        Query(frozenset(q["relevant"]), text=q["text"], language=q.get("language"))
        for q in doc.get("queries", [])
    ]
    queries += [Query(frozenset(q["relevant"]), like=q["like"]) for q in doc.get("like", [])]
    if not queries or any(not q.relevant for q in queries):
        raise ValueError("a relevance set needs queries, each with at least one relevant title")
    return queries


def recall_at(ranked: Sequence[str], relevant: frozenset[str], k: int = RECALL_AT) -> float:
    return len(relevant.intersection(ranked[:k])) / len(relevant)


def reciprocal_rank(
    ranked: Sequence[str], relevant: frozenset[str], depth: int = MRR_DEPTH
) -> float:
    for rank, title in enumerate(ranked[:depth], start=1):
        if title in relevant:
            return 1.0 / rank
    return 0.0


@dataclass
class Figures:
    """One mode's scores over a group of queries."""

    recalls: list[float] = field(default_factory=list)
    reciprocal_ranks: list[float] = field(default_factory=list)

    def add(self, ranked: Sequence[str], relevant: frozenset[str]) -> None:
        self.recalls.append(recall_at(ranked, relevant))
        self.reciprocal_ranks.append(reciprocal_rank(ranked, relevant))

    @property
    def queries(self) -> int:
        return len(self.recalls)

    @property
    def recall(self) -> float:
        return sum(self.recalls) / len(self.recalls) if self.recalls else 0.0

    @property
    def mrr(self) -> float:
        rr = self.reciprocal_ranks
        return sum(rr) / len(rr) if rr else 0.0


@dataclass
class Evaluation:
    """Each mode's figures over every query, and by kind of query (text en, text zh, like)."""

    overall: dict[Mode, Figures] = field(default_factory=dict)
    by_kind: dict[tuple[Mode, str], Figures] = field(default_factory=dict)
    # (mode, query) -> the titles ranked, for a reader who wants to see a miss.
    rankings: dict[tuple[Mode, str], list[str]] = field(default_factory=dict)


def evaluate(
    store: Store,
    provider: Provider,
    queries: Sequence[Query],
    ids: dict[str, str],
    modes: Sequence[Mode],
    *,
    on_query: Callable[[], None] | None = None,
) -> Evaluation:
    """Run every query in every mode over the set's rows (``ids``: title -> item id) and score
    the rankings. A "like" query whose drawing has no row is an error: the set and the rows
    disagree."""
    titles = {item_id: title for title, item_id in ids.items()}
    result = Evaluation()
    for mode in modes:
        for query in queries:
            if query.like is not None and query.like not in ids:
                raise ValueError(f"the relevance set's {query.like!r} has no row")
            found = search(
                store,
                provider,
                SearchQuery(
                    text=query.text,
                    like_id=ids[query.like] if query.like is not None else None,
                    users=(SET_USER,),
                    mode=mode,
                    top_k=MRR_DEPTH,
                ),
            )
            ranked = [titles.get(hit.item_id, hit.item_id) for hit in found.hits]
            result.overall.setdefault(mode, Figures()).add(ranked, query.relevant)
            result.by_kind.setdefault((mode, query.kind), Figures()).add(ranked, query.relevant)
            result.rankings[(mode, query.label)] = ranked
            if on_query is not None:
                on_query()
    return result
