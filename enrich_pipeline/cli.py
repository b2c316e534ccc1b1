"""The legacy-compatible command line: ``batch_enrich_captions.py``'s flags and report.

It runs the same stages as the Dagster job, against the configured database or, when
``ADBPG_HOST`` is unset, the embedded one with its sample items.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TextIO

import psycopg
from psycopg_pool import PoolTimeout

from enrich_pipeline import embedded
from enrich_pipeline.api.dashscope import FatalProviderError
from enrich_pipeline.api.pricing import estimate_cost, load_prices
from enrich_pipeline.api.providers import build_provider
from enrich_pipeline.db.store import ItemStore
from enrich_pipeline.enrichment.images import redact_source
from enrich_pipeline.runner import Engine
from enrich_pipeline.settings import (
    ConfigError,
    DashScopeSettings,
    DbSettings,
    RunSettings,
    image_policy_from_env,
)
from enrich_pipeline.stages import ItemOutcome, RunStats

RULE = "=" * 64


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="enrich-captions",
        description="Caption pending images with Qwen-VL and write captions, colors and tags back.",
    )
    p.add_argument("--user-id", help="only this user's items (default: every user)")
    p.add_argument("--batch-size", type=int, default=10, help="items per chunk (default 10)")
    p.add_argument(
        "--max-items",
        type=int,
        default=100,
        help="items to process at most, 0 for no limit (default 100)",
    )
    p.add_argument(
        "--concurrent", type=int, default=5, help="model calls in flight at once (default 5)"
    )
    p.add_argument("--no-caption-embedding", action="store_true", help="do not embed the captions")
    p.add_argument(
        "--offline",
        action="store_true",
        help="use the offline provider on purpose (labelled in metadata)",
    )
    p.add_argument("--namespace", help="schema of the items table (ADBPG_NAMESPACE, cleantab)")
    p.add_argument("--table", help="items table (ADBPG_TABLE, items)")
    p.add_argument(
        "--max-attempts",
        type=int,
        default=3,
        help="attempts before a failing row is left out (default 3)",
    )
    p.add_argument(
        "--retry-failed",
        action="store_true",
        help="forget recorded failures (of --user-id, or all) before running",
    )
    p.add_argument(
        "--lease-seconds",
        type=int,
        default=120,
        help="claim lease: rows of a run that died come back after it (default 120; live runs "
        "renew theirs)",
    )
    p.add_argument(
        "--recaption",
        action="store_true",
        help="re-caption --user-id's rows captioned with another model or prompt version "
        "(DASHSCOPE_VISION_MODEL, ENRICH_PROMPT_VERSION); old captions stay until replaced",
    )
    p.add_argument("--quiet", action="store_true", help="only the configuration and statistics")
    return p.parse_args(argv)


class Report:
    """The legacy report: configuration block, per-item progress, final statistics."""

    def __init__(self, out: TextIO, quiet: bool = False) -> None:
        self.out = out
        self.quiet = quiet
        self.count = 0

    def line(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def configuration(self, pairs: Sequence[tuple[str, str]]) -> None:
        self.line(RULE)
        self.line("Batch caption enrichment")
        self.line(RULE)
        self.line("Configuration:")
        for key, value in pairs:
            self.line(f"  {key + ':':<18}{value}")
        self.line(RULE)

    def item(self, user_id: str, o: ItemOutcome) -> None:
        self.count += 1
        if self.quiet:
            return
        mark = {"succeeded": "OK", "failed": "FAILED", "skipped": "SKIPPED"}[o.status]
        self.line(f"[{self.count}] item {o.item_id} (user {user_id!r}): {mark}")
        if o.status == "succeeded":
            self.line(f"    Caption: {o.caption}")
            self.line(f"    Colors:  {', '.join(o.dominant_colors) or '-'}")
            self.line(f"    Styles:  {', '.join(o.style_tags) or '-'}")
            self.line(f"    Objects: {', '.join(o.object_tags) or '-'}")
        elif o.error:
            self.line(f"    Reason:  {o.error}")

    def statistics(
        self, stats: RunStats, usage: dict[str, int], elapsed: float, cost: float | None = None
    ) -> None:
        self.line(RULE)
        self.line("Statistics:")
        self.line(f"  {'Total:':<18}{stats.total}")
        self.line(f"  {'Succeeded:':<18}{stats.succeeded}")
        self.line(f"  {'Failed:':<18}{stats.failed}")
        self.line(f"  {'Skipped:':<18}{stats.skipped}")
        self.line(f"  {'Success rate:':<18}{stats.success_rate * 100:.1f}%")
        self.line(
            f"  {'Cache hits:':<18}{stats.cache_hits} "
            f"({stats.cache_hit_rate * 100:.1f}% of succeeded, no API call)"
        )
        if stats.errors:
            errors = ", ".join(f"{k} {v}" for k, v in sorted(stats.errors.items()))
            self.line(f"  {'Errors:':<18}{errors}")
        self.line(
            f"  {'Embedded:':<18}{stats.embedded}"
            + (f" ({stats.embedding_failed} without embedding)" if stats.embedding_failed else "")
        )
        self.line(
            f"  {'Tokens used:':<18}{usage['total_tokens']} (prompt {usage['prompt_tokens']}, "
            f"completion {usage['completion_tokens']}, embedding {usage['embedding_tokens']})"
        )
        self.line(
            f"  {'API calls:':<18}{usage['vision_calls']} vision, "
            f"{usage['embedding_calls']} embedding, {usage['retries']} retries"
        )
        if cost is not None:
            self.line(f"  {'Estimated cost:':<18}{cost:.6f} USD (ENRICH_PRICES)")
        self.line(f"  {'Elapsed:':<18}{elapsed:.1f} s")
        self.line(RULE)


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    args = parse_args(argv)
    report = Report(out, args.quiet)
    store = None
    db: DbSettings | None = None
    started: float | None = None
    try:
        run = RunSettings(
            batch_size=args.batch_size,
            max_items=args.max_items or None,
            concurrent=args.concurrent,
            caption_embedding=not args.no_caption_embedding,
            max_attempts=args.max_attempts,
            lease_seconds=args.lease_seconds,
            recaption=args.recaption,
        )
        if args.recaption and args.user_id is None:
            raise ConfigError("--recaption needs --user-id: re-captioning is chosen per user")
        db = DbSettings.from_env()
        if args.namespace or args.table:
            db = DbSettings(db.conninfo, args.namespace or db.namespace, args.table or db.table)
        api = DashScopeSettings.from_env()
        if args.offline:
            api = replace(api, offline=True)
        # The key is checked before anything else so a missing one costs nothing.
        provider = build_provider(api, embedded_db=db.embedded)
        db = embedded.resolve(db)
        # Every call slot touches the cache: a connection each keeps them from queueing.
        store = ItemStore(db, max_connections=max(4, min(run.concurrent + 2, 24)))
        store.setup()
        engine = Engine(
            store, provider, api, run, image_policy=image_policy_from_env(local_files=db.embedded)
        )
        provider_label = (
            f"{provider.model_label} (OFFLINE: no DashScope call is made; "
            "captions are synthetic and labelled caption_source=offline)"
            if provider.offline
            else f"{api.vision_model} at {redact_source(api.base_url)}"
        )
        report.configuration(
            [
                ("Database", f"{db.redacted()} ({db.namespace}.{db.table})"),
                ("Vision model", provider_label),
                (
                    "Embedding",
                    f"{api.embedding_model} ({api.embedding_dimensions} dims)"
                    if run.caption_embedding
                    else "disabled (--no-caption-embedding)",
                ),
                ("User", args.user_id if args.user_id is not None else "all users"),
                ("Batch size", str(run.batch_size)),
                ("Max items", str(run.max_items or "no limit")),
                ("Concurrent", str(run.concurrent)),
            ]
        )
        if args.retry_failed:
            n = store.reset_failures(args.user_id)
            report.line(f"Retrying failed rows: {n} recorded failure(s) cleared.")
        if args.user_id is not None:
            pending = store.count_pending(
                args.user_id, max_attempts=run.max_attempts, recaption=engine.recaption
            )
        else:
            pending = sum(n for _, n in store.users_with_pending(run.max_attempts))
        if pending == 0:
            who = f"user {args.user_id!r}" if args.user_id is not None else "any user"
            report.line(f"No pending items for {who}: nothing to do.")
            return 0
        report.line(
            f"Pending items: {pending}"
            + (f" (processing at most {run.max_items})" if run.max_items else "")
        )
        started = time.monotonic()
        stats = engine.enrich(args.user_id, on_outcome=report.item)
        usage = provider.usage.as_dict()
        cost = estimate_cost(
            usage,
            vision_model=provider.model_label,
            embedding_model=api.embedding_model,
            prices=load_prices(),
        )
        report.statistics(stats, usage, time.monotonic() - started, cost)
        return 0
    except (psycopg.OperationalError, PoolTimeout) as exc:
        where = db.redacted() if db is not None else "the database"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if started is None:
            print(f"error: cannot connect to {where}: {reason}", file=sys.stderr)
        else:
            print(
                f"error: the database ({where}) failed mid-run: {reason}; every chunk written "
                "so far is kept, run again to finish the rest",
                file=sys.stderr,
            )
        return 2
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FatalProviderError as exc:
        print(f"error: run stopped: {exc}", file=sys.stderr)
        return 3
    finally:
        if store is not None:
            store.close()


if __name__ == "__main__":
    raise SystemExit(main())
