"""``enrich-search``: a user's items by text, ranked by caption-embedding similarity."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import psycopg
from psycopg_pool import PoolTimeout

from enrich_pipeline.bootstrap import Runtime, open_runtime, open_store
from enrich_pipeline.cli import search_page
from enrich_pipeline.cli.flags import Parser
from enrich_pipeline.cli.stopping import stops_cleanly
from enrich_pipeline.pipeline.search import (
    describe_not_compared,
    reembed,
    search_captions,
    vectors_not_compared,
)
from enrich_pipeline.providers.base import ProviderError
from enrich_pipeline.redaction import scrub_secrets
from enrich_pipeline.settings import ConfigError, Settings

MAX_TOP_K = 1000
# text-embedding-v4 takes up to 8,192 tokens; a search text is a phrase, not a document.
MAX_QUERY_CHARS = 2000
MAX_FILTERS, MAX_FILTER_CHARS = 20, 100


def check_args(args: argparse.Namespace) -> None:
    """Every flag within its bounds, or one line naming it."""
    if not 1 <= args.top_k <= MAX_TOP_K:
        raise ConfigError(f"--top-k: must be between 1 and {MAX_TOP_K}, got {args.top_k}")
    if args.create_ann_index:
        return
    if args.reembed:
        if args.query:
            raise ConfigError("--reembed takes no search text (only --user-id, or every user)")
        return
    if not args.query or not args.query.strip() or not args.user_id:
        raise ConfigError("a search needs the text and --user-id")
    if len(args.query) > MAX_QUERY_CHARS:
        raise ConfigError(
            f"the search text is {len(args.query)} characters, more than {MAX_QUERY_CHARS}"
        )
    for flag, values in (("--color", args.color), ("--tag", args.tag)):
        if len(values) > MAX_FILTERS:
            raise ConfigError(f"{flag}: at most {MAX_FILTERS} of them, got {len(values)}")
        for value in values:
            if not value.strip() or len(value) > MAX_FILTER_CHARS:
                raise ConfigError(
                    f"{flag}: must be 1 to {MAX_FILTER_CHARS} characters, got {value[:40]!r}"
                )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = Parser(prog="enrich-search", description=__doc__.splitlines()[0])
    p.add_argument("query", nargs="?", help="text to look for")
    p.add_argument("--user-id")
    p.add_argument(
        "--create-ann-index",
        action="store_true",
        help="AnalyticDB: create the FastANN index on the caption embeddings, and exit",
    )
    p.add_argument(
        "--reembed",
        action="store_true",
        help="embed again the captions whose stored vector holds NaN or an infinity (an older "
        "version's) or was made by another embedding model or length (search compares only "
        "the configured model's), of --user-id or every user, and exit",
    )
    p.add_argument("--color", action="append", default=[], help="dominant color (repeatable)")
    p.add_argument("--tag", action="append", default=[], help="style or object tag (repeatable)")
    p.add_argument("--top-k", type=int, default=10, help=f"hits to show, 1 to {MAX_TOP_K}")
    p.add_argument("--method", choices=["auto", "fastann", "pgvector", "sql"], default="auto")
    p.add_argument("--offline", action="store_true", help="embed the query offline")
    search_page.add_flags(p)
    return p.parse_args(argv)


@stops_cleanly
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        return search_page.serve(args)
    runtime: Runtime | None = None
    settings: Settings | None = None
    try:
        check_args(args)
        settings = Settings.from_env()
        if args.offline:
            settings = settings.with_(dashscope=settings.dashscope.with_(offline=True))
        if args.create_ann_index:
            with open_store(settings, seed=False) as store:
                name = store.search.create_ann_index(settings.dashscope.embedding_dimensions)
            print(f"created FastANN index {name}")
            return 0
        runtime = open_runtime(settings, seed=False)
        if args.reembed:
            if runtime.provider.offline:  # hashed words would replace a model's vectors
                raise ConfigError("--reembed needs the embedding model: not offline")
            api = settings.dashscope
            done = reembed(
                runtime.store,
                runtime.provider,
                args.user_id,
                dimensions=api.embedding_dimensions,
                languages=api.languages,
            )
            model = f"{runtime.provider.embedding_model} ({api.embedding_dimensions} dims)"
            said = [
                f"re-embedded {done.replaced} stored vector(s) that held NaN or an infinity",
                f"re-embedded {done.other_model} made by another model or length with {model}"
                if done.other_model
                else "",
                f"labelled {done.relabelled} vector(s) of offline captions as the offline "
                "model's (an earlier version labelled them as the embedding model's)"
                if done.relabelled
                else "",
                f"{done.no_caption} left: their item has no caption" if done.no_caption else "",
                f"{done.refused} left: the new vector was unusable too" if done.refused else "",
            ]
            print("; ".join(text for text in said if text))
            return 0
        hits = search_captions(
            runtime.store,
            runtime.provider,
            args.user_id,
            args.query,
            top_k=args.top_k,
            colors=args.color,
            tags=args.tag,
            method=args.method,
        )
        dimensions = settings.dashscope.embedding_dimensions
        others = vectors_not_compared(
            runtime.store,
            args.user_id,
            model=runtime.provider.embedding_model,
            dimensions=dimensions,
            offline=runtime.provider.offline,
        )
    except (ConfigError, ProviderError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (psycopg.OperationalError, PoolTimeout) as exc:
        where = settings.db.redacted() if settings is not None else "the database"
        reason = scrub_secrets(
            str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        )
        print(f"error: cannot reach the database {where}: {reason}", file=sys.stderr)
        return 2
    except psycopg.Error as exc:  # refused by the server: rights, a missing table...
        where = settings.db.redacted() if settings is not None else "the database"
        reason = scrub_secrets(
            str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        )
        print(f"error: the database {where} refused the search: {reason}", file=sys.stderr)
        return 2
    finally:
        if runtime is not None:
            runtime.close()
    if others:
        # Said first, and on stdout: it is the answer when nothing could be compared.
        note = describe_not_compared(
            others,
            user_id=args.user_id,
            model=runtime.provider.embedding_model,
            dimensions=dimensions,
            hits=len(hits),
        )
        print(("No matching items: " if not hits else "Note: ") + note)
    elif not hits:
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
