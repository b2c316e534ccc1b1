"""``enrich-captions``: the legacy-compatible command line, ``batch_enrich_captions.py``'s
flags and report.

It runs the same stages as the Dagster job, against the configured database or, when
``ADBPG_HOST`` is unset, the embedded one with its sample items.

Exit codes: 0 the run completed (rows that failed are in the ledger and the report); 2 a
configuration or database problem; 3 the provider stopped the run for a reason someone must fix
(the account, the key, the model or the request itself: one ``error:`` line says what); 4 the
provider was unavailable (throttled, unreachable or failing past the retries): run again later.
On 3 and 4 no row was charged (but those whose paid answers had no usable caption, when the
model answered call after call without one), the unwritten rows are released, and the statistics
of what was done before the stop are still printed. SIGINT (Ctrl-C), SIGHUP and SIGTERM stop the
same way (see ``cli/stopping.py``): the calls in flight finish and their captions are cached, the
chunks they complete are written, the other claims are released, the statistics are printed, one
``stopped by`` line follows, and the exit code is 128 + the signal (130, 129, 143).
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Sequence
from typing import TextIO

import psycopg
from psycopg_pool import PoolTimeout

from enrich_pipeline.bootstrap import Runtime, open_runtime, open_store
from enrich_pipeline.cli import stale
from enrich_pipeline.cli.embed_images import embed_images
from enrich_pipeline.cli.flags import FlagMap, Parser, add_setting, given
from enrich_pipeline.cli.report import Report
from enrich_pipeline.cli.stopping import exit_code, stop_line, stops_cleanly
from enrich_pipeline.db.pending import FLAG, IGNORE, RECAPTION, OnImageChange
from enrich_pipeline.db.preflight import grants
from enrich_pipeline.db.spend import CAPTIONS, paid_row
from enrich_pipeline.db.store import Store
from enrich_pipeline.pipeline.stats import RunStats
from enrich_pipeline.providers.base import FatalProviderError, ProviderUnavailable
from enrich_pipeline.providers.pricing import estimate_cost, price_table
from enrich_pipeline.redaction import scrub_secrets
from enrich_pipeline.settings import ConfigError, DbSettings, RunSettings, Settings

RUN_FLAGS: FlagMap = {}
DB_FLAGS: FlagMap = {}

EXIT_OK, EXIT_CONFIG, EXIT_PROVIDER_STOP, EXIT_PROVIDER_UNAVAILABLE = 0, 2, 3, 4


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = Parser(
        prog="enrich-captions",
        description="Caption pending images with Qwen-VL and write captions, colors and tags back.",
    )
    p.add_argument("--user-id", help="only this user's items (default: every user)")
    add_setting(p, "--batch-size", RunSettings, "batch_size", flags=RUN_FLAGS)
    p.add_argument(
        "--max-items",
        type=int,
        default=RunSettings().max_items,
        help=f"items to process at most, 0 for no limit (default {RunSettings().max_items})",
    )
    add_setting(p, "--concurrent", RunSettings, "concurrent", flags=RUN_FLAGS)
    p.add_argument("--no-caption-embedding", action="store_true", help="do not embed the captions")
    p.add_argument(
        "--embed-images",
        action="store_true",
        help="only make the missing image vectors (ENRICH_IMAGE_EMBEDDING_MODEL) of captioned "
        "rows, of --user-id or every user: images loaded and embedded, no caption call",
    )
    p.add_argument(
        "--offline",
        action="store_true",
        help="use the offline provider on purpose (labelled in metadata)",
    )
    add_setting(p, "--namespace", DbSettings, "namespace", flags=DB_FLAGS)
    add_setting(p, "--table", DbSettings, "table", flags=DB_FLAGS)
    add_setting(p, "--max-attempts", RunSettings, "max_attempts", flags=RUN_FLAGS)
    p.add_argument(
        "--retry-failed",
        action="store_true",
        help="forget recorded failures (of --user-id, or all) before running",
    )
    add_setting(p, "--lease-seconds", RunSettings, "lease_seconds", flags=RUN_FLAGS)
    p.add_argument(
        "--recaption",
        action="store_true",
        help="re-caption --user-id's rows captioned with another model or prompt version "
        "(DASHSCOPE_VISION_MODEL, ENRICH_PROMPT_VERSION); old captions stay until replaced",
    )
    add_setting(
        p,
        "--on-image-change",
        RunSettings,
        "on_image_change",
        flags=RUN_FLAGS,
        choices=["recaption", "flag", "ignore"],
    )
    stale.add_flags(p)
    p.add_argument("--quiet", action="store_true", help="only the configuration and statistics")
    p.add_argument(
        "--setup",
        action="store_true",
        help="administrator: create the pipeline's tables and the pending-rows index, print the "
        "grants a least-privilege role needs, and exit (no model call)",
    )
    p.add_argument(
        "--grant-to", metavar="ROLE", help="with --setup: the role the grants are printed for"
    )
    return p.parse_args(argv)


def setup(settings: Settings, role: str | None, out: TextIO) -> int:
    """``--setup``: what needs more rights than a run has, done once by an administrator."""
    store = open_store(settings, admin=True)
    try:
        readiness = store.readiness
        assert readiness is not None
        db = store.settings
        print(f"Database:       {db.redacted()} ({db.namespace}.{db.table})", file=out)
        print(f"Server:         {readiness.dialect.label}", file=out)
        print(f"Pending index:  {'present' if readiness.pending_index else 'NOT built'}", file=out)
        for note in readiness.notes:
            print(f"Note:           {note}", file=out)
        print(f"Grants for {role or 'the role that runs the pipeline'}:", file=out)
        for line in grants(db.namespace, db.table, role or "ROLE"):
            print(f"  {line}", file=out)
        return 0
    finally:
        store.close()


def settings_from(args: argparse.Namespace) -> Settings:
    """The environment's settings with the flags the user gave on top."""
    run_values, run_sources = given(args, RUN_FLAGS)
    if args.max_items is not None:
        # The legacy script's 0: no limit.
        run_values["max_items"] = args.max_items or None
        run_sources["max_items"] = "--max-items"
    run_values["caption_embedding"] = not args.no_caption_embedding
    run_values["recaption"] = args.recaption
    run = RunSettings.from_env(None, run_values, run_sources)
    db = DbSettings.from_env(None, *given(args, DB_FLAGS))
    settings = Settings.from_env(given={"run": run, "db": db})
    if args.offline:
        settings = settings.with_(dashscope=settings.dashscope.with_(offline=True))
    return settings


def answers_label(answer_format: str, languages: Sequence[str]) -> str:
    """How the run asks: the answer format, where the tags come from, the caption languages."""
    tags = "tags by keyword rules" if answer_format == "text" else "tags by the model"
    return f"{answer_format} ({tags}), captions in {', '.join(languages)}"


def configuration(runtime: Runtime, user_id: str | None) -> list[tuple[str, str]]:
    settings, provider = runtime.settings, runtime.provider
    api, run, db = settings.dashscope, settings.run, settings.db
    provider_label = (
        f"{provider.model_label} (OFFLINE: no DashScope call is made; "
        "captions are synthetic and labelled caption_source=offline)"
        if provider.offline
        else f"{api.vision_model} at {api.base_url_shown}"
    )
    return [
        ("Database", f"{db.redacted()} ({db.namespace}.{db.table})"),
        ("Vision model", provider_label),
        ("Answers", answers_label(provider.answer_format, api.languages)),
        (
            "Embedding",
            f"{provider.embedding_model} ({api.embedding_dimensions} dims)"
            if run.caption_embedding
            else "disabled (--no-caption-embedding)",
        ),
        (
            "Image model",
            f"{provider.image_embedding_model} ({provider.image_embedding_dimensions} dims)"
            if getattr(provider, "image_embedding_model", None)
            else "off (ENRICH_IMAGE_EMBEDDING_MODEL)",
        ),
        ("User", user_id if user_id is not None else "all users"),
        ("Batch size", str(run.batch_size)),
        ("Max items", str(run.max_items or "no limit")),
        ("Concurrent", str(run.concurrent)),
        ("Server", runtime.store.dialect.label),
    ]


def _statistics(
    report: Report, runtime: Runtime, stats: RunStats, started: float, user_id: str | None
) -> None:
    usage = runtime.provider.usage.as_dict()
    api = runtime.settings.dashscope
    prices = price_table(api.url, api.prices)
    cost = estimate_cost(
        usage,
        vision_model=runtime.provider.model_label,
        embedding_model=runtime.provider.embedding_model,
        prices=prices,
        image_embedding_model=getattr(runtime.provider, "image_embedding_model", None),
    )
    elapsed = time.monotonic() - started
    offline = runtime.provider.offline
    report.statistics(stats, usage, elapsed, cost, prices.currency, offline=offline)
    _record_spend(runtime, usage, cost, prices.currency, user_id)


def _record_spend(
    runtime: Runtime, usage: dict[str, int], cost: float | None, currency: str, user: str | None
) -> None:
    """The run's spend in the ledger (the overview's spend to date), where a model was called;
    a database that fails here only loses the ledger line, never the report."""
    provider = runtime.provider
    if provider.offline:
        return
    row = paid_row(
        f"{CAPTIONS}:{uuid.uuid4().hex[:16]}",
        user or "",
        CAPTIONS,
        usage,
        vision_model=provider.model_label,
        embedding_model=provider.embedding_model,
        cost=cost,
        currency=currency,
    )
    if row is None:
        return
    try:
        runtime.store.spend.record([row])
    except psycopg.Error as exc:
        first = scrub_secrets(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        print(f"warning: this run's spend was not recorded: {first}", file=sys.stderr)


def _pending(
    store: Store, user_id: str | None, run: RunSettings, recaption: tuple[str, str] | None
) -> tuple[int, int]:
    """(pending rows, rows this run works on: stale ones too with ENRICH_ON_IMAGE_CHANGE=
    recaption); with flag, the stale rows are flagged first (no call: that is the whole of
    what flag mode does with them)."""
    max_attempts = run.max_attempts
    if recaption is not None:
        assert user_id is not None
        n = store.items.count_pending(user_id, max_attempts=max_attempts, recaption=recaption)
        return n, n
    mode = run.on_image_change
    if mode == FLAG:
        users = (
            [user_id]
            if user_id is not None
            else [u for u, _ in store.items.users_with_pending(max_attempts, stale=FLAG)]
        )
        for user in users:
            store.items.flag_stale(user)

    def count(stale: OnImageChange) -> int:
        if user_id is not None:
            return store.items.count_pending(user_id, max_attempts=max_attempts, stale=stale)
        return sum(n for _, n in store.items.users_with_pending(max_attempts, stale=stale))

    pending = count(IGNORE)
    return pending, count(RECAPTION) if mode == RECAPTION else pending


def _maintenance(settings: Settings, args: argparse.Namespace, out: TextIO) -> int:
    """``--adopt`` or ``--forget-cache``: statements on the database only, no model call."""
    store = open_store(settings)
    try:
        if args.adopt:
            return stale.adopt(store, args.user_id, out)
        return stale.forget(store, args, settings.run.on_image_change, out)
    finally:
        store.close()


@stops_cleanly
def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    args = parse_args(argv)
    report = Report(out, args.quiet)
    runtime: Runtime | None = None
    db: DbSettings | None = None
    started: float | None = None
    try:
        settings = settings_from(args)
        if args.setup:
            return setup(settings, args.grant_to, out)
        stale.check_flags(args)
        if args.adopt or args.forget_cache:
            return _maintenance(settings, args, out)
        if args.recaption and args.user_id is None:
            raise ConfigError("--recaption needs --user-id: re-captioning is chosen per user")
        db = settings.db
        run = settings.run
        # Every call slot touches the cache: a connection each keeps them from queueing.
        settings = settings.with_(db=db.with_(max_connections=max(4, min(run.concurrent + 2, 24))))
        runtime = open_runtime(settings)
        db = runtime.settings.db
        engine = runtime.engine()
        store = runtime.store
        report.configuration(configuration(runtime, args.user_id))
        for note in store.readiness.notes if store.readiness else ():
            report.line(f"Note: {note}")
        if args.embed_images:
            started = time.monotonic()
            return embed_images(runtime, args.user_id, report)
        if args.retry_failed:
            n = store.items.reset_failures(args.user_id)
            report.line(f"Retrying failed rows: {n} recorded failure(s) cleared.")
        pending, work = _pending(store, args.user_id, run, engine.recaption)
        stale_line = stale.stale_line(store.items.count_stale(args.user_id), run.on_image_change)
        if work == 0:
            if stale_line:
                report.line(stale_line)
            who = f"user {args.user_id!r}" if args.user_id is not None else "any user"
            report.line(f"No pending items for {who}: nothing to do.")
            return 0
        report.line(
            f"Pending items: {pending}"
            + (f" (processing at most {run.max_items})" if run.max_items else "")
        )
        if stale_line and engine.recaption is None:
            report.line(stale_line)
        started = time.monotonic()
        stats = engine.enrich(args.user_id, on_outcome=report.item)
        _statistics(report, runtime, stats, started, args.user_id)
        return EXIT_OK
    except (psycopg.OperationalError, PoolTimeout) as exc:
        where = db.redacted() if db is not None else "the database"
        reason = scrub_secrets(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        if isinstance(exc, psycopg.errors.DeadlockDetected | psycopg.errors.LockNotAvailable):
            print(
                f"error: the database ({where}) refused a lock ({type(exc).__name__}: {reason});"
                " another process was setting up or writing the same rows: run again",
                file=sys.stderr,
            )
        elif started is None:
            print(f"error: cannot connect to {where}: {reason}", file=sys.stderr)
        else:
            print(
                f"error: the database ({where}) failed mid-run: {reason}; every chunk written "
                "so far is kept, run again to finish the rest",
                file=sys.stderr,
            )
        return 2
    except ConfigError as exc:
        for line in str(exc).splitlines() or [""]:
            print(f"error: {line}", file=sys.stderr)
        return 2
    except FatalProviderError as exc:
        if runtime is not None and started is not None:
            done = exc.stats if isinstance(exc.stats, RunStats) else RunStats()
            _statistics(report, runtime, done, started, args.user_id)
        print(f"error: run stopped: {exc}", file=sys.stderr)
        if isinstance(exc, ProviderUnavailable):
            return EXIT_PROVIDER_UNAVAILABLE
        return EXIT_PROVIDER_STOP
    except KeyboardInterrupt as exc:  # Ctrl-C or a stop signal: the engine has drained
        done = getattr(exc, "stats", None)
        done = done if isinstance(done, RunStats) else RunStats()
        if runtime is not None and started is not None:
            _statistics(report, runtime, done, started, args.user_id)
        print(
            stop_line(
                exc,
                f"{done.succeeded + done.failed} row(s) written, the others' claims released, "
                "paid captions kept in the cache; run again to continue",
            ),
            file=sys.stderr,
        )
        return exit_code(exc)
    finally:
        if runtime is not None:
            runtime.close()


if __name__ == "__main__":
    raise SystemExit(main())
