"""What a materialization of one user partition says: the user's items as they now are, and
what this run did for them.

Rules: figures describe the asset (the user's items), not only the run; the run's counters
and rates are shown only where the run attempted or skipped something for the user (a run with
nothing pending says so in ``this_run``, so plots do not dip to zero); a zero is shown only
where zero is true (the offline provider calls no model, so it shows no tokens and no cost); no
``dagster/row_count`` (the UI would show one user's rows as the asset's: the whole table's
count is on the ``items_table`` asset); nothing about storage (the summary is not stored).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dagster import MetadataValue

from enrich_pipeline.db.ledger import LedgerEntry
from enrich_pipeline.db.summary import UserItems
from enrich_pipeline.pipeline.stats import RunStats

OFFLINE_PROVIDER = "offline (no model was called; captions say only what is known without one)"
USAGE_KEYS = (
    "prompt_tokens",
    "completion_tokens",
    "embedding_tokens",
    "image_tokens",
    "vision_calls",
    "embedding_calls",
    "retries",
    "unknown_token_calls",
)


@dataclass
class UserRun:
    """What one run did for one user."""

    stats: RunStats = field(default_factory=RunStats)
    skipped_reasons: dict[str, int] = field(default_factory=dict)
    # (item id, code, message) of the first failures, for the run log and the metadata.
    failures: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def attempted(self) -> int:
        return self.stats.succeeded + self.stats.failed

    def merge(self, other: UserRun) -> None:
        self.stats.merge(other.stats)
        for reason, n in other.skipped_reasons.items():
            self.skipped_reasons[reason] = self.skipped_reasons.get(reason, 0) + n
        self.failures.extend(other.failures[: max(0, 20 - len(self.failures))])


def share_usage(usage: Mapping[str, int], runs: Mapping[str, UserRun]) -> dict[str, dict[str, int]]:
    """The run's usage apportioned to its users by the rows each had captioned or failed
    without the cache (exact for a run of one user)."""
    weights = {
        u: max(0, r.stats.succeeded - r.stats.cache_hits) + r.stats.failed for u, r in runs.items()
    }
    total = sum(weights.values())
    out: dict[str, dict[str, int]] = {}
    for user, weight in weights.items():
        share = weight / total if total else (1.0 if len(runs) == 1 else 0.0)
        out[user] = {k: round(usage.get(k, 0) * share) for k in USAGE_KEYS}
    return out


def partition_metadata(
    *,
    user: str,
    items: UserItems,
    run: UserRun,
    usage: Mapping[str, int] | None,
    cost: float | None,
    offline: bool,
    model: str,
    embedding_model: str | None,
    database: str,
    ledger: Sequence[LedgerEntry] | None,
    run_users: int,
    other_runs: Sequence[str] = (),
    answer_format: str | None = None,
    languages: Sequence[str] = (),
) -> dict[str, Any]:
    """The metadata of one partition's materialization (``usage`` is this user's share)."""
    s = run.stats
    md: dict[str, Any] = {
        "user_id": user,
        # The asset: the user's enriched items, as they are now.
        "items": MetadataValue.int(items.items),
        "items_captioned": items.captioned,
        "items_pending": items.pending,
        # Captioned by the pipeline from an image the row no longer has (ENRICH_ON_IMAGE_CHANGE
        # says what is done with them; counted in every mode).
        "items_stale": items.stale,
        "items_given_up": items.given_up,
        "items_embedded": items.embedded,
    }
    if items.stale_flagged:
        md["items_stale_flagged"] = items.stale_flagged
    if items.failed_retrying:
        md["items_failing_retried"] = items.failed_retrying
    if items.failure_share is not None:
        md["failure_share"] = MetadataValue.float(round(items.failure_share, 4))
    md["database"] = database
    md["provider"] = OFFLINE_PROVIDER if offline else "dashscope"
    md["model"] = model
    if embedding_model:
        md["embedding_model"] = embedding_model
    # How the model was asked: the format the run ended in (a refusal or malformed answers step
    # it down) and the caption languages, first one in ``caption``.
    if answer_format:
        md["answer_format"] = answer_format
    if languages:
        md["caption_languages"] = ",".join(languages)
    # What this run did: counters only where it attempted or skipped something for the user.
    if s.total:
        md["total"] = s.total
        md["succeeded"] = s.succeeded
        md["failed"] = s.failed
        md["skipped"] = s.skipped
    if run.attempted:
        md["success_rate"] = MetadataValue.float(round(s.succeeded / run.attempted, 4))
    if run.skipped_reasons:
        md["skipped_because"] = MetadataValue.json(dict(sorted(run.skipped_reasons.items())))
    if s.total == 0:
        md["this_run"] = "nothing pending for this user: no row was read, claimed or written"
    if s.errors:
        md["errors"] = MetadataValue.json(dict(sorted(s.errors.items())))
    if embedding_model and s.succeeded:
        md["embedded"] = s.embedded
        if s.embedding_failed:
            md["embedding_failed"] = s.embedding_failed
    if s.tags_dropped:
        md["tags_dropped"] = s.tags_dropped
    if s.succeeded:
        md["cache_hits"] = s.cache_hits
        md["cache_hit_rate"] = MetadataValue.float(round(s.cache_hits / s.succeeded, 4))
    if not offline and usage is not None and (s.total or any(usage.values())):
        md["tokens_used"] = (
            usage.get("prompt_tokens", 0)
            + usage.get("completion_tokens", 0)
            + usage.get("embedding_tokens", 0)
        )
        for key in ("prompt_tokens", "completion_tokens", "embedding_tokens", "image_tokens"):
            md[key] = usage.get(key, 0)
        md["api_retries"] = usage.get("retries", 0)
        unknown = usage.get("unknown_token_calls", 0)
        if unknown:
            # Answers without a believable count: the figures above are a floor.
            md["calls_with_unknown_tokens"] = unknown
        if cost is not None:
            # A number, so the UI plots spend per partition across runs.
            md["estimated_cost_usd"] = MetadataValue.float(round(cost, 6))
            if unknown:
                md["estimated_cost_is"] = "at least: tokens unknown for some calls"
    if run_users > 1:
        md["run_users"] = MetadataValue.int(run_users)
        if not offline and usage is not None:
            md["usage_note"] = (
                f"this run served {run_users} users; tokens and cost are this user's share, "
                "by the rows it captioned or failed without the cache"
            )
    if other_runs:
        md["other_runs_in_flight"] = ", ".join(other_runs)
    if s.samples:
        md["sample_captions"] = MetadataValue.md("\n".join(f"- {c}" for c in s.samples))
    if ledger is not None:  # read when the user has failed rows; otherwise there are none
        md["failures_recorded"] = len(ledger)
    if ledger:
        md["failure_ledger"] = ledger_table(ledger)
    return md


def ledger_table(ledger: Sequence[LedgerEntry], shown: int = 20) -> MetadataValue:
    """The first ``shown`` entries of a user's failure ledger, as a markdown table."""
    rows = "\n".join(
        f"| {e.item_id} | {e.attempts} | {'yes' if e.permanent else 'no'} | {e.error_code} |"
        f" {e.last_error[:120].replace('|', '/').replace(chr(10), ' ')} |"
        for e in ledger[:shown]
    )
    more = f"\n\n({len(ledger) - shown} more)" if len(ledger) > shown else ""
    return MetadataValue.md(
        "| item | attempts | permanent | code | last error |\n|---|---|---|---|---|\n" + rows + more
    )
