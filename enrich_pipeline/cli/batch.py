"""``enrich-batch``: large backfills through DashScope's Batch API (half price, results within
24 h): ``submit``, then ``poll``/``collect`` later (or let the Dagster sensor do it), ``cancel``,
``status``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from functools import partial
from typing import TextIO

import psycopg
from psycopg_pool import PoolTimeout

from enrich_pipeline.bootstrap import Runtime, open_runtime, open_store
from enrich_pipeline.cli.flags import FlagMap, Parser, add_setting, given
from enrich_pipeline.cli.stopping import stops_cleanly
from enrich_pipeline.db.batches import BatchRecord
from enrich_pipeline.db.store import Store
from enrich_pipeline.pipeline.batch.collect import CollectResult, collect_batch
from enrich_pipeline.pipeline.batch.poll import cancel_batch, open_batches, poll_batches
from enrich_pipeline.pipeline.batch.state import batch_api
from enrich_pipeline.pipeline.batch.submit import SubmitResult, submit_batch
from enrich_pipeline.providers.base import FatalProviderError, ProviderError
from enrich_pipeline.providers.batch_api import BatchError
from enrich_pipeline.redaction import scrub_secrets
from enrich_pipeline.settings import (
    BatchSettings,
    ConfigError,
    DbSettings,
    RunSettings,
    Settings,
    bounds,
)

MAX_ITEMS = bounds(BatchSettings.model_fields["max_items"])["le"]

DB_FLAGS: FlagMap = {}
RUN_FLAGS: FlagMap = {}
BATCH_FLAGS: FlagMap = {}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = Parser(
        prog="enrich-batch",
        description=(
            "Caption large backfills through DashScope's Batch API (half price, results "
            "within 24 h). submit, then poll/collect later (or let the Dagster sensor do it)."
        ),
    )
    add_setting(parser, "--namespace", DbSettings, "namespace", flags=DB_FLAGS)
    add_setting(parser, "--table", DbSettings, "table", flags=DB_FLAGS)
    sub = parser.add_subparsers(dest="command", required=True)
    submit = sub.add_parser(
        "submit",
        help="claim a user's pending rows (and stale ones, ENRICH_ON_IMAGE_CHANGE=recaption) "
        "and submit batches",
    )
    submit.add_argument("--user-id", required=True)
    submit.add_argument(
        "--max-items",
        type=int,
        default=None,
        help=f"rows to submit at most, up to {MAX_ITEMS} (0: every pending row, the default)",
    )
    add_setting(submit, "--max-attempts", RunSettings, "max_attempts", flags=RUN_FLAGS)
    add_setting(submit, "--concurrent", RunSettings, "concurrent", flags=RUN_FLAGS)
    add_setting(
        submit,
        "--on-image-change",
        RunSettings,
        "on_image_change",
        flags=RUN_FLAGS,
        choices=["recaption", "flag", "ignore"],
    )
    submit.add_argument("--no-caption-embedding", action="store_true")
    add_setting(submit, "--max-lines", BatchSettings, "max_lines", flags=BATCH_FLAGS)
    add_setting(submit, "--max-bytes", BatchSettings, "max_bytes", flags=BATCH_FLAGS)
    poll = sub.add_parser("poll", help="refresh the status of open batches")
    poll.add_argument("--user-id", default=None)
    collect = sub.add_parser("collect", help="write back every ended batch (or one)")
    collect.add_argument("--user-id", default=None)
    collect.add_argument("--batch", default=None, help="batch id (DashScope's or ours)")
    cancel = sub.add_parser("cancel", help="cancel an open batch")
    cancel.add_argument("--batch", required=True)
    status = sub.add_parser("status", help="list batches not yet collected")
    status.add_argument("--user-id", default=None)
    return parser.parse_args(argv)


def _describe(record: BatchRecord) -> str:
    counts = record.request_counts or {}
    done = (
        f" {counts.get('completed', 0)}/{counts.get('total', 0)} done"
        f"{', ' + str(counts.get('failed')) + ' failed' if counts.get('failed') else ''}"
        if counts
        else ""
    )
    return (
        f"{record.ref}  user={record.user_id}  lines={record.lines}  "
        f"state={record.state}  status={record.status or '-'}{done}"
        + (f"  error: {record.error}" if record.error else "")
    )


def _print_collected(out: TextIO, result: CollectResult) -> None:
    if result.already:
        out.write(f"{result.batch.ref}: already {result.batch.state}, nothing to do\n")
        return
    if result.busy:
        out.write(f"{result.batch.ref}: another collector is at work on it\n")
        return
    s = result.stats
    out.write(
        f"{result.batch.ref} ({result.batch.status}, user {result.batch.user_id}): "
        f"total {s.total}, succeeded {s.succeeded}, failed {s.failed}, skipped {s.skipped}, "
        f"success rate {s.success_rate:.1%}; embedded {s.embedded}; "
        f"batch tokens {result.prompt_tokens} prompt + {result.completion_tokens} completion"
        + (
            f" (at least: unknown for {result.unknown_token_lines} line(s))"
            if result.unknown_token_lines
            else ""
        )
        + (f"; {result.released} released ({result.batch.error})" if result.released else "")
        + "\n"
    )
    if result.format_step:
        out.write(f"  {result.format_step}\n")


def _print_submitted(out: TextIO, user_id: str, result: SubmitResult) -> None:
    d = result.direct
    if result.format_note:
        out.write(f"{result.format_note}\n")
    out.write(
        f"Submission {result.submission_id} for user {user_id!r}: "
        f"{result.queued} item(s) in {len(result.parts)} batch(es) "
        f"({result.lines} distinct image(s), {result.answer_format or '-'} answers), "
        f"{result.stale} of them stale (image changed since captioned); written at once: "
        f"{d.succeeded} from the caption cache"
        + (f" ({result.stale_direct} stale)" if result.stale_direct else "")
        + f", {d.failed} failed; {len(result.skipped)} skipped"
        + (f"; {result.flagged} stale row(s) flagged caption_stale" if result.flagged else "")
        + "\n"
    )


def submit_settings(args: argparse.Namespace) -> tuple[BatchSettings, RunSettings]:
    """``submit``'s flags as settings; a bad value is one line naming its flag."""
    run_values, run_sources = given(args, RUN_FLAGS)
    run_values["caption_embedding"] = not args.no_caption_embedding
    batch_values, batch_sources = given(args, BATCH_FLAGS)
    if args.max_items is not None and not 0 <= args.max_items <= MAX_ITEMS:
        raise ConfigError(
            f"--max-items: must be 0 (every pending row) or a number up to {MAX_ITEMS}, "
            f"got {args.max_items}"
        )
    batch_values["max_items"] = args.max_items or None
    batch_sources["max_items"] = "--max-items"
    return (
        BatchSettings.from_env(None, batch_values, batch_sources),
        RunSettings.from_env(None, run_values, run_sources),
    )


# DashScope documents no Batch API for any multimodal embedding model (its batch pages list
# Qwen chat/VL and text-embedding models only: https://www.alibabacloud.com/help/en/
# model-studio/batch-interfaces-compatible-with-openai). Batch mode is chosen for deferred,
# half-price calls; an online full-price image call per row at submit would be neither, so it
# makes no image vector and says so; --embed-images makes them when wanted.
NO_BATCH_IMAGE_VECTORS = (
    "Image vectors: not made in batch mode (DashScope offers no Batch API for multimodal "
    "embedding); after collecting, run enrich-captions --embed-images (online, full price)"
)


@stops_cleanly
def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """``enrich-batch submit|poll|collect|cancel|status``.

    Exit codes as ``enrich-captions``: 0 done, 2 configuration error (batch mode not offered
    for the model or region included), 3 the provider stopped the run (bad key, or DashScope
    still failing after the retries).
    """
    out = out or sys.stdout
    args = parse_args(argv)
    runtime: Runtime | None = None
    store: Store | None = None
    db: DbSettings | None = None
    try:
        db = DbSettings.from_env(None, *given(args, DB_FLAGS))
        settings = Settings.from_env(given={"db": db})
        api = settings.dashscope
        # Every flag is checked before anything is opened, claimed or paid for.
        if args.command == "submit":
            batch, run = submit_settings(args)
        if args.command == "status":
            store = open_store(settings)
        else:
            batch_api(api)  # the key and the offline switch are checked before anything else
            runtime = open_runtime(settings)
            store = runtime.store
        db = store.settings
        if args.command == "submit" and runtime is not None:
            result = submit_batch(
                store,
                api,
                args.user_id,
                provider=runtime.provider,
                policy=runtime.image_policy,
                vocabulary=runtime.vocabulary,
                batch=batch,
                run=run,
            )
            _print_submitted(out, args.user_id, result)
            for record in result.parts:
                out.write(f"  {_describe(record)}\n")
            if api.image_embedding_model:
                out.write(f"{NO_BATCH_IMAGE_VECTORS}\n")
        elif args.command == "poll":
            ready = poll_batches(store, api, user_id=args.user_id)
            for record in open_batches(store, args.user_id):
                out.write(f"{_describe(record)}\n")
            out.write(f"{len(ready)} batch(es) ready to collect\n")
        elif args.command == "collect" and runtime is not None:
            collect = partial(
                collect_batch, provider=runtime.provider, vocabulary=runtime.vocabulary
            )
            if args.batch:
                _print_collected(out, collect(store, api, args.batch))
            else:
                ready = poll_batches(store, api, user_id=args.user_id)
                for record in ready:
                    _print_collected(out, collect(store, api, record))
                if not ready:
                    out.write("no batch has ended yet: nothing to collect\n")
        elif args.command == "cancel":
            out.write(f"{_describe(cancel_batch(store, api, args.batch))}\n")
        else:
            records = open_batches(store, args.user_id)
            for record in records:
                out.write(f"{_describe(record)}\n")
            if not records:
                out.write("no open batch\n")
        return 0
    except (ConfigError, BatchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (psycopg.OperationalError, PoolTimeout) as exc:
        where = db.redacted() if db is not None else "the database"
        reason = scrub_secrets(
            str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        )
        if store is None:
            print(f"error: cannot connect to {where}: {reason}", file=sys.stderr)
        else:
            print(
                f"error: the database ({where}) failed: {reason}; what was done is recorded, "
                "run the command again",
                file=sys.stderr,
            )
        return 2
    except psycopg.Error as exc:  # refused by the server: rights, a missing table...
        where = db.redacted() if db is not None else "the database"
        reason = scrub_secrets(
            str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        )
        print(f"error: the database ({where}) refused: {reason}", file=sys.stderr)
        return 2
    except FatalProviderError as exc:
        print(f"error: run stopped: {exc}", file=sys.stderr)
        return 3
    except ProviderError as exc:  # DashScope away after retries; a half-submitted part is
        # resolved by a later poll, its rows are never lost
        print(f"error: DashScope did not answer: {exc}", file=sys.stderr)
        return 3
    finally:
        if runtime is not None:
            runtime.close()
        elif store is not None:
            store.close()


if __name__ == "__main__":
    raise SystemExit(main())
