"""The whole items table as one asset, ``items_table``: observed, never materialized (the
pipeline does not make the table, it fills it in), after enrichment runs and by its own sensor,
so that its plots over time show the table's progress, every user's, with spend to date.

The partitioned ``enriched_items`` describes one user per materialization; this asset is the
answer to "how much of the table is captioned, what is left, what has it cost".

A pass over the table costs about 0.1 s per 10,000 rows here (seconds at a million:
``benchmarks/overview.py``). A run observes the table at its end while the last pass took at
most ``ENRICH_OVERVIEW_IN_RUN_MS`` (1 s); on a larger table that would add seconds to every
run, so the sensor observes it instead, once for all the runs that ended since. The sensor
(``ENRICH_OVERVIEW_INTERVAL`` s, 300) also catches what runs do not report (command-line runs,
batch collects, rows added or edited by others). It makes a pass only when a run ended, the
server's statistics count a change to the tables it reads, or an hour passed, and observes
only when a figure changed since the last observation, whoever made it, so idle ticks cost a
catalog read and add nothing to the event log.

Spend: each run records what it paid, per user, in the spend ledger (``db/spend.py``), priced
as the partition's ``estimated_cost_usd`` is; an offline run or one served from the cache calls
no model and records nothing, so the sum is a zero only where nothing was paid.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
from dagster import (
    AssetKey,
    AssetObservation,
    AssetSpec,
    DagsterInstance,
    DagsterRunStatus,
    DefaultSensorStatus,
    MetadataValue,
    OpExecutionContext,
    RunsFilter,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

# Dagster's own clock: what its daemon ticks by, and what its test tools can move.
from dagster._time import get_current_timestamp

from enrich_pipeline.db.overview import TableFigures
from enrich_pipeline.db.spend import Spend, SpendRow
from enrich_pipeline.db.store import Store
from enrich_pipeline.defs.config import AUTOMATION
from enrich_pipeline.defs.resources import AdbpgResource
from enrich_pipeline.defs.runs import retry_later
from enrich_pipeline.providers.pricing import load_prices
from enrich_pipeline.settings import AutomationSettings, ConfigError, RunSettings

ITEMS_TABLE = AssetKey("items_table")

items_table = AssetSpec(
    ITEMS_TABLE,
    group_name="enrichment",
    kinds={"postgres"},
    description=(
        "The whole items table, every user: items, captioned, pending, stale, given up, by "
        "caption model and languages, coverage, and the provider spend recorded to date. "
        "Observed at the end of enrichment runs while a pass over the table is cheap "
        "(ENRICH_OVERVIEW_IN_RUN_MS), and by items_table_sensor every ENRICH_OVERVIEW_INTERVAL "
        "seconds after runs or changes, only when a figure changed; never materialized (the "
        "pipeline fills the table in, it does not make it)."
    ),
)

PASS_MS_KEY = "observed_in_ms"
OBSERVED_AT = "observed_at"
# Changes the statistics do not count (Greenplum; an edit made without a write the server
# counts) are caught by observing again at least this often.
MAX_AGE_S = 3600


def record_and_observe(
    context: OpExecutionContext,
    adbpg: AdbpgResource,
    spend: Sequence[SpendRow],
    *,
    max_attempts: int,
) -> None:
    """At a run's end, after its writes: its spend per user (priced by the summary step, as
    the partitions' ``estimated_cost_usd``), then the table observed, while a
    pass over it is cheap (``ENRICH_OVERVIEW_IN_RUN_MS``, 1 s); a larger table is left to
    the sensor, which observes it once for every run that ended meanwhile, instead of each run
    paying seconds at its end. A database error here is a warning: the run's rows are
    written, only the report is late (the sensor observes the table at its next tick)."""
    try:
        adbpg.store.spend.record(spend)
        budget = AutomationSettings.from_env().overview_in_run_ms
        last = last_observed(context.instance)
        took = int((last or {}).get(PASS_MS_KEY) or 0)
        if budget == 0 or took > budget:
            context.log.info(
                f"items_table left to items_table_sensor: its last pass took {took} ms "
                f"(runs observe it themselves up to ENRICH_OVERVIEW_IN_RUN_MS={budget})"
            )
            return
        metadata = table_metadata(adbpg.store, max_attempts=max_attempts)
    except (psycopg.Error, ConfigError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        context.log.warning(
            f"items_table not observed ({type(exc).__name__}: {first}): the items_table sensor "
            "observes it at its next tick"
        )
        return
    context.log_event(AssetObservation(ITEMS_TABLE, metadata=metadata))


def table_metadata(store: Store, *, max_attempts: int) -> dict[str, Any]:
    """The observation's metadata: the table's figures now and the spend recorded to date, and
    how long reading them took (what decides whether runs observe the table themselves)."""
    started = time.perf_counter()
    figures = store.overview.figures(max_attempts=max_attempts)
    md = figures_metadata(figures)
    md.update(spend_metadata(store.spend.to_date(), load_prices().currency))
    md["database"] = store.dialect.label
    md["items_table"] = f"{store.settings.namespace}.{store.settings.table}"
    md[PASS_MS_KEY] = MetadataValue.int(round((time.perf_counter() - started) * 1000))
    return md


def figures_metadata(f: TableFigures) -> dict[str, Any]:
    """Counts as ints and shares as floats, so that the UI plots each over time."""
    md: dict[str, Any] = {
        # Dagster's row count: the rows the pipeline is for (active, with an image).
        "dagster/row_count": MetadataValue.int(f.items),
        "items": MetadataValue.int(f.items),
        "items_captioned": MetadataValue.int(f.captioned),
        "items_captioned_by_pipeline": MetadataValue.int(f.captioned_by_pipeline),
        "items_pending": MetadataValue.int(f.pending),
        "items_stale": MetadataValue.int(f.stale),
        "items_given_up": MetadataValue.int(f.given_up),
        "items_failing_retried": MetadataValue.int(f.failing_retried),
        "items_embedded": MetadataValue.int(f.embedded),
        "users": MetadataValue.int(f.users),
        "users_with_pending": MetadataValue.int(f.users_with_pending),
        # Every row, whatever its status or image: what the table holds besides.
        "table_rows": MetadataValue.int(f.rows),
    }
    if f.coverage is not None:  # a table without items has no coverage, not a zero one
        md["coverage"] = MetadataValue.float(round(f.coverage, 4))
    if f.by_model_language:
        lines = "\n".join(
            f"| {g.model} | {g.language} | {g.rows} |" for g in f.by_model_language[:50]
        )
        extra = len(f.by_model_language) - 50
        more = f"\n\n({extra} more)" if extra > 0 else ""
        md["by_model_language"] = MetadataValue.md(
            "| caption model | language | rows |\n|---|---|---:|\n" + lines + more
        )
    else:
        md["by_model_language"] = MetadataValue.md("no row captioned by the pipeline yet")
    return md


def spend_metadata(spend: Spend, configured_currency: str) -> dict[str, Any]:
    """Spend to date in one currency (sums are never added across currencies: the others are
    listed beside), a floor where a model had no price."""
    md: dict[str, Any] = {}
    priced = [s for s in spend.by_currency if s.currency]
    if not spend.recorded:
        # True: no paid call is recorded (offline runs and cached answers cost nothing).
        md["spend_to_date"] = MetadataValue.float(0.0)
        md["spend_currency"] = configured_currency or "none"
        md["spend_note"] = (
            "no model call recorded: offline runs and answers from the cache cost nothing"
        )
        return md
    main = next((s for s in priced if s.currency == configured_currency), None) or (
        max(priced, key=lambda s: s.runs) if priced else None
    )
    if main is not None and main.cost is not None:
        md["spend_to_date"] = MetadataValue.float(round(main.cost, 6))
        md["spend_currency"] = main.currency
    unpriced = sum(s.unpriced_runs for s in spend.by_currency)
    if unpriced:
        md["spend_unpriced_runs"] = MetadataValue.int(unpriced)
        md["spend_to_date_is"] = (
            f"at least: {unpriced} run share(s) used a model without a price (ENRICH_PRICES)"
        )
    if len(priced) > 1:
        md["spend_by_currency"] = MetadataValue.json(
            {s.currency: round(s.cost, 6) if s.cost is not None else None for s in priced}
        )
    rows = "\n".join(
        f"| {m.models} | {m.currency or '-'} | {m.runs} | {m.tokens} | "
        f"{'no price' if m.cost is None else f'{m.cost:.6f}'} |"
        for m in spend.by_model[:50]
    )
    md["spend_by_model"] = MetadataValue.md(
        "| models | currency | run shares | tokens | cost |\n|---|---|---:|---:|---:|\n" + rows
    )
    if spend.since:
        md["spend_since"] = spend.since
    return md


def _values(metadata: Mapping[str, Any]) -> dict[str, Any]:
    return {k: getattr(v, "value", v) for k, v in metadata.items()}


def _figures(values: Mapping[str, Any]) -> dict[str, Any]:
    """What the table states, without when and how fast it was read."""
    return {k: v for k, v in values.items() if k not in (PASS_MS_KEY, OBSERVED_AT)}


def last_observed(instance: DagsterInstance) -> dict[str, Any] | None:
    """The metadata values of the table's latest observation, a run's or the sensor's, with its
    time under ``OBSERVED_AT``."""
    records = instance.fetch_observations(ITEMS_TABLE, limit=1).records
    observation = records[0].asset_observation if records else None
    if observation is None:
        return None
    return {**_values(observation.metadata), OBSERVED_AT: records[0].timestamp}


def _runs_ended_since(instance: DagsterInstance, timestamp: float) -> bool:
    """Whether any run ended since ``timestamp`` (one indexed read of the run storage)."""
    finished = RunsFilter(
        statuses=[DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED],
        updated_after=datetime.fromtimestamp(timestamp, tz=UTC),
    )
    return bool(instance.get_run_records(filters=finished, limit=1))


@sensor(
    name="items_table_sensor",
    minimum_interval_seconds=AUTOMATION.overview_interval,
    default_status=DefaultSensorStatus.RUNNING,
    description=(
        "Every ENRICH_OVERVIEW_INTERVAL seconds: when a run ended, the tables changed or the "
        "last observation is an hour old, reads the whole items table's figures and spend to "
        "date, and observes the items_table asset when any of them changed since its last "
        "observation (a run's or this sensor's)."
    ),
)
def items_table_sensor(context: SensorEvaluationContext, adbpg: AdbpgResource):
    now = get_current_timestamp()
    cursor = json.loads(context.cursor or "{}")
    last = last_observed(context.instance)
    try:
        max_attempts = RunSettings.from_env().max_attempts
        changes = adbpg.store.overview.changes()
        # A pass costs seconds at a million rows: made only when something may have changed
        # since the last one (where the server counts no changes, runs and age tell).
        passed = max(float(cursor.get("passed") or 0), last[OBSERVED_AT] if last else 0.0)
        if (
            last is not None
            and (changes is None or cursor.get("changes") == changes)
            and not _runs_ended_since(context.instance, passed)
            and now - passed < MAX_AGE_S
        ):
            return SkipReason("the items table is unchanged since it was last read")
        metadata = table_metadata(adbpg.store, max_attempts=max_attempts)
    except (psycopg.Error, ConfigError) as exc:
        return retry_later("items table not read", exc)
    after = json.dumps({"changes": changes, "passed": now})
    if last is not None and _figures(last) == _figures(_values(metadata)):
        return SensorResult(
            cursor=after, skip_reason=SkipReason("the items table is as last observed")
        )
    return SensorResult(
        cursor=after, asset_events=[AssetObservation(ITEMS_TABLE, metadata=metadata)]
    )
