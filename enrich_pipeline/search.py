"""Caption search: a user's items by text, ranked by caption-embedding similarity.

A small Python API (``search_captions``) and the ``enrich-search`` command. The query is
embedded with the same model as the captions; ranking uses pgvector when the extension is
installed and plain SQL on ``real[]`` otherwise, with the same results.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from enrich_pipeline import embedded
from enrich_pipeline.api.dashscope import Provider, ProviderError
from enrich_pipeline.api.providers import build_provider
from enrich_pipeline.db.store import ItemStore
from enrich_pipeline.settings import ConfigError, DashScopeSettings, DbSettings

Method = Literal["auto", "pgvector", "sql"]


@dataclass(frozen=True)
class SearchHit:
    item_id: str
    score: float
    caption: str
    dominant_colors: list[str]
    style_tags: list[str]
    object_tags: list[str]


def search_captions(
    store: ItemStore,
    provider: Provider,
    user_id: str,
    query: str,
    *,
    top_k: int = 10,
    colors: Sequence[str] = (),
    tags: Sequence[str] = (),
    method: Method = "auto",
) -> list[SearchHit]:
    if not query.strip():
        raise ConfigError("the search text is empty")
    (vector,) = provider.embed([query])
    use_pgvector = store.has_pgvector() if method == "auto" else method == "pgvector"
    if use_pgvector and method == "pgvector" and not store.has_pgvector():
        raise ConfigError("the pgvector extension is not installed in this database")
    rows = store.search_captions(
        user_id, vector, top_k=top_k, colors=colors, tags=tags, use_pgvector=use_pgvector
    )
    return [
        SearchHit(
            item_id,
            score,
            str(md.get("caption", "")),
            list(md.get("dominant_colors") or []),
            list(md.get("style_tags") or []),
            list(md.get("object_tags") or []),
        )
        for item_id, score, md in rows
    ]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="enrich-search", description=__doc__.splitlines()[0])
    p.add_argument("query", help="text to look for")
    p.add_argument("--user-id", required=True)
    p.add_argument("--color", action="append", default=[], help="dominant color (repeatable)")
    p.add_argument("--tag", action="append", default=[], help="style or object tag (repeatable)")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--method", choices=["auto", "pgvector", "sql"], default="auto")
    p.add_argument("--offline", action="store_true", help="embed the query offline")
    args = p.parse_args(argv)
    try:
        db = DbSettings.from_env()
        api = DashScopeSettings.from_env()
        if args.offline:
            from dataclasses import replace

            api = replace(api, offline=True)
        provider = build_provider(api, embedded_db=db.embedded)
        with ItemStore(embedded.resolve(db, seed=False)) as store:
            store.setup()
            hits = search_captions(
                store,
                provider,
                args.user_id,
                args.query,
                top_k=args.top_k,
                colors=args.color,
                tags=args.tag,
                method=args.method,
            )
    except (ConfigError, ProviderError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not hits:
        print("No matching items.")
    for rank, hit in enumerate(hits, start=1):
        print(f"{rank:>2}. item {hit.item_id}  score {hit.score:.3f}  {hit.caption}")
        print(
            f"    colors: {', '.join(hit.dominant_colors) or '-'}; "
            f"tags: {', '.join(hit.style_tags + hit.object_tags) or '-'}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
