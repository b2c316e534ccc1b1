"""``enrich-search``: rows by text, like a row or like a picture, ranked by caption vectors, image
vectors or both, with color, tag, language and user filters; and the vector indexes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import astuple, replace

import psycopg
from psycopg_pool import PoolTimeout

from enrich_pipeline.bootstrap import Runtime, open_runtime, open_store
from enrich_pipeline.cli import relevance, search_page
from enrich_pipeline.cli.flags import Parser
from enrich_pipeline.cli.stopping import stops_cleanly
from enrich_pipeline.db.search_rank import Signal
from enrich_pipeline.db.store import Store
from enrich_pipeline.pipeline.search import (
    MAX_FILTER_CHARS,
    MAX_FILTERS,
    MAX_QUERY_CHARS,
    Reembedded,
    SearchQuery,
    SearchResult,
    reembed,
    search,
)
from enrich_pipeline.providers.base import ProviderError
from enrich_pipeline.providers.offline import (
    OFFLINE_EMBEDDING_MODEL,
    OFFLINE_IMAGE_EMBEDDING_MODEL,
)
from enrich_pipeline.redaction import scrub_secrets
from enrich_pipeline.settings import ConfigError, DashScopeSettings, Settings

MAX_TOP_K = 1000


def check_args(args: argparse.Namespace) -> None:
    """Every flag within its bounds, or one line naming it."""
    if not 1 <= args.top_k <= MAX_TOP_K:
        raise ConfigError(f"--top-k: must be between 1 and {MAX_TOP_K}, got {args.top_k}")
    if args.create_index or args.create_ann_index or args.relevance:
        return
    if args.reembed:
        if args.query:
            raise ConfigError("--reembed takes no search text (only --user-id, or every user)")
        return
    asked = [args.query is not None, args.like is not None, args.like_image is not None]
    if sum(asked) != 1:
        raise ConfigError("a search needs one of: the text, --like ID, --like-image URL|PATH")
    if args.query is not None:
        if not args.query.strip():
            raise ConfigError("the search text is empty")
        if len(args.query) > MAX_QUERY_CHARS:
            raise ConfigError(
                f"the search text is {len(args.query)} characters, more than {MAX_QUERY_CHARS}"
            )
    for flag, value in (("--like", args.like), ("--like-image", args.like_image)):
        if value is not None and not 1 <= len(value.strip()) <= MAX_QUERY_CHARS:
            raise ConfigError(f"{flag}: must be 1 to {MAX_QUERY_CHARS} characters")
    if args.like_image is not None and args.by == "caption":
        raise ConfigError("--like-image searches by image (a picture has no caption vector)")
    for flag, values in (
        ("--color", args.color),
        ("--tag", args.tag),
        ("--lang", args.lang),
        ("--user-id", args.user_id),
    ):
        if len(values) > MAX_FILTERS:
            raise ConfigError(f"{flag}: at most {MAX_FILTERS} of them, got {len(values)}")
        for value in values:
            if not value.strip() or len(value) > MAX_FILTER_CHARS:
                raise ConfigError(
                    f"{flag}: must be 1 to {MAX_FILTER_CHARS} characters, got {value[:40]!r}"
                )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = Parser(prog="enrich-search", description=__doc__.splitlines()[0])
    p.add_argument("query", nargs="?", help="text to look for, in any caption language")
    p.add_argument(
        "--user-id",
        action="append",
        default=[],
        help="a user's rows (repeatable; none: every user's)",
    )
    p.add_argument(
        "--by",
        choices=["caption", "image", "both"],
        default=None,
        help="rank by caption vectors, image vectors, or both fused by reciprocal rank fusion "
        "(default: both when ENRICH_IMAGE_EMBEDDING_MODEL is set, else caption)",
    )
    p.add_argument("--like", metavar="ID", help="rows like this item (its stored vectors)")
    p.add_argument(
        "--like-image", metavar="URL|PATH", help="rows like this picture (by image vectors)"
    )
    p.add_argument(
        "--lang", action="append", default=[], help="has a caption in this language (repeatable)"
    )
    p.add_argument("--color", action="append", default=[], help="dominant color (repeatable)")
    p.add_argument("--tag", action="append", default=[], help="style or object tag (repeatable)")
    p.add_argument("--top-k", type=int, default=10, help=f"hits to show, 1 to {MAX_TOP_K}")
    p.add_argument("--method", choices=["auto", "fastann", "pgvector", "sql"], default="auto")
    p.add_argument("--offline", action="store_true", help="embed the query offline")
    p.add_argument(
        "--create-index",
        action="store_true",
        help="create the vector index this server can have on the configured models' caption "
        "and image vectors (FastANN on AnalyticDB, HNSW with pgvector; none elsewhere, and "
        "it says so), and exit",
    )
    p.add_argument(
        "--create-ann-index",
        action="store_true",
        help="as --create-index, refused where AnalyticDB's FastANN is absent",
    )
    p.add_argument(
        "--reembed",
        action="store_true",
        help="embed again the captions whose stored vector holds NaN or an infinity (an older "
        "version's) or was made by another embedding model or length (search compares only "
        "the configured model's), of --user-id or every user, and exit",
    )
    search_page.add_flags(p)
    relevance.add_flags(p)
    return p.parse_args(argv)


def image_settings(api: DashScopeSettings) -> tuple[str, int] | None:
    """The image embedding model and its dimensions, None when image embeddings are off."""
    if not api.image_embedding_model or api.image_embedding_dimensions is None:
        return None
    model = OFFLINE_IMAGE_EMBEDDING_MODEL if api.offline else api.image_embedding_model
    return model, api.image_embedding_dimensions


def create_indexes(store: Store, settings: Settings, *, fastann_only: bool) -> list[str]:
    """The index of each configured model's vectors, as this server can have it: one line
    each."""
    if fastann_only and not store.dialect.fastann:
        raise ConfigError(
            "this server has no FastANN index method (pg_am 'ann'): enable AnalyticDB's "
            "vector search engine optimization first; search works without the index"
        )
    api = settings.dashscope
    caption_model = OFFLINE_EMBEDDING_MODEL if api.offline else api.embedding_model
    wanted: list[tuple[Signal, str, int]] = [("caption", caption_model, api.embedding_dimensions)]
    image = image_settings(api)
    if image is not None:
        wanted.append(("image", *image))
    return [
        store.search.indexes.create(signal, model=model, dimensions=dims).describe()
        for signal, model, dims in wanted
    ]


def print_result(result: SearchResult) -> None:
    hits = result.hits
    for n, note in enumerate(result.notes):
        # Said first, and on stdout: it is the answer when nothing could be compared.
        print(("No matching items: " if not hits and n == 0 else "Note: ") + note)
    if not hits and not result.notes:
        print("No matching items.")
    fused = result.mode == "both"
    for rank, hit in enumerate(hits, start=1):
        score = f"{hit.score:.4f} (fused)" if fused else f"{hit.score:.3f}"
        print(f"{rank:>2}. item {hit.item_id}  score {score}  user {hit.user_id}  {hit.caption}")
        translations = {k: v for k, v in hit.captions.items() if v != hit.caption}
        if translations:
            print("    " + "; ".join(f"{k}: {v}" for k, v in sorted(translations.items())))
        print(
            "    "
            + "; ".join(
                f"{s.signal}: similarity {s.similarity:.3f}, rank {s.rank}"
                f" ({s.model}, {s.dimensions} dims)"
                for s in hit.signals
            )
        )
        print(
            f"    colors: {', '.join(hit.dominant_colors) or '-'}; "
            f"tags: {', '.join(hit.style_tags + hit.object_tags) or '-'}"
            + (f"; filters met: {', '.join(hit.filters_met)}" if hit.filters_met else "")
        )


def run_reembed(runtime: Runtime, settings: Settings, users: Sequence[str]) -> str:
    if runtime.provider.offline:  # hashed words would replace a model's vectors
        raise ConfigError("--reembed needs the embedding model: not offline")
    api = settings.dashscope
    done = Reembedded()
    for user in users or [None]:
        more = reembed(
            runtime.store,
            runtime.provider,
            user,
            dimensions=api.embedding_dimensions,
            languages=api.languages,
        )
        done = Reembedded(*(a + b for a, b in zip(astuple(done), astuple(more), strict=True)))
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
    return "; ".join(text for text in said if text)


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
        if args.create_index or args.create_ann_index:
            with open_store(settings, seed=False) as store:
                said = create_indexes(store, settings, fastann_only=args.create_ann_index)
            print("\n".join(said))
            return 0
        if args.relevance:
            return relevance.run(
                settings,
                sys.stdout,
                set_path=args.relevance_set,
                namespace=args.relevance_namespace,
            )
        runtime = open_runtime(settings, seed=False)
        if args.reembed:
            print(run_reembed(runtime, settings, args.user_id))
            return 0
        query = SearchQuery(
            text=args.query,
            like_id=args.like,
            like_image=args.like_image,
            users=tuple(args.user_id),
            mode=args.by,
            colors=tuple(args.color),
            tags=tuple(args.tag),
            languages=tuple(args.lang),
            top_k=args.top_k,
            method=args.method,
        )
        result = search(
            runtime.store,
            runtime.provider,
            query,
            # Whoever runs the command may name a file of theirs; the page's visitors may not.
            image_policy=replace(runtime.image_policy, allow_local_files=True),
            max_image_side=settings.dashscope.max_image_side,
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
    print_result(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
