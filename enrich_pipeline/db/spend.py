"""The spend ledger (table ``enrich_spend``): what each run paid the provider, as estimated when
it ended, one row per (run, user), and its sums by currency and by model for the overview.

Costs are given by the caller (the provider layer prices tokens; this floor only stores them).
A row is written once per key: a Dagster step re-executed, or a batch collected again, keeps the
first figures rather than counting the spend twice. Portable SQL (``ON CONFLICT`` on a heap
table exists on AnalyticDB 6.0 too).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from psycopg import sql

from enrich_pipeline.db.database import Database, retry_db

DAGSTER, CAPTIONS, BATCH = "dagster", "enrich-captions", "enrich-batch"
# Usage counts that mean a model was called (and may have been paid).
CALLED = ("prompt_tokens", "completion_tokens", "embedding_tokens", "vision_calls")


@dataclass(frozen=True)
class SpendRow:
    """One run's spend for one user ('' when the run covered every user and did not split)."""

    run_id: str
    user_id: str
    command: str
    models: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    embedding_tokens: int = 0
    # None: a model used has no price (no estimate, tokens still counted).
    cost: float | None = None
    currency: str | None = None


def paid_row(
    run_id: str,
    user_id: str,
    command: str,
    usage: Mapping[str, int],
    *,
    vision_model: str,
    embedding_model: str,
    cost: float | None,
    currency: str | None,
) -> SpendRow | None:
    """The ledger row of what ``usage`` paid, or None where no model was called (an offline or
    fully cached run pays nothing, so the ledger says nothing of it)."""
    if not any(usage.get(k, 0) for k in CALLED):
        return None
    embedded = bool(usage.get("embedding_tokens") or usage.get("embedding_calls"))
    return SpendRow(
        run_id,
        user_id,
        command,
        vision_model + (f", {embedding_model}" if embedded else ""),
        usage.get("prompt_tokens", 0),
        usage.get("completion_tokens", 0),
        usage.get("embedding_tokens", 0),
        cost,
        currency or None,
    )


@dataclass(frozen=True)
class SpendSum:
    """The ledger's sum for one currency (``None``: runs whose models had no price)."""

    currency: str | None
    runs: int
    tokens: int
    # The priced runs' sum (a floor when ``unpriced_runs``), None when no run had a price.
    cost: float | None
    unpriced_runs: int = 0


@dataclass(frozen=True)
class ModelSpend:
    models: str
    currency: str | None
    runs: int
    tokens: int
    cost: float | None
    unpriced_runs: int


@dataclass(frozen=True)
class Spend:
    """Spend to date: sums by currency and by model, and since when the ledger has records."""

    by_currency: tuple[SpendSum, ...] = ()
    by_model: tuple[ModelSpend, ...] = ()
    since: str | None = None

    @property
    def recorded(self) -> bool:
        return bool(self.by_currency)


class SpendRows:
    """Statements on ``enrich_spend``."""

    def __init__(self, db: Database) -> None:
        self.db = db

    @retry_db
    def record(self, rows: Sequence[SpendRow]) -> int:
        """Add the rows not recorded yet (by run and user); return how many were added."""
        if not rows:
            return 0
        query = sql.SQL(
            "INSERT INTO {t} (source_table, run_id, user_id, command, models, prompt_tokens,"
            " completion_tokens, embedding_tokens, cost, currency)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (source_table, run_id, user_id) DO NOTHING"
        ).format(t=self.db.t("enrich_spend"))
        added = 0
        with self.db.connection() as conn:
            with conn.cursor() as cur:
                for r in rows:
                    cur.execute(
                        query,
                        (
                            self.db.source_table,
                            r.run_id,
                            r.user_id,
                            r.command,
                            r.models,
                            r.prompt_tokens,
                            r.completion_tokens,
                            r.embedding_tokens,
                            r.cost,
                            r.currency or None,
                        ),
                    )
                    added += max(0, cur.rowcount)
        return added

    @retry_db
    def to_date(self) -> Spend:
        """Everything recorded for this items table, summed by currency and by model."""
        tokens = "prompt_tokens + completion_tokens + embedding_tokens"
        by_currency = sql.SQL(
            "SELECT currency, count(*), sum({tokens}), sum(cost),"
            " sum(CASE WHEN cost IS NULL THEN 1 ELSE 0 END)"
            " FROM {t} WHERE source_table = %(src)s GROUP BY currency"
        ).format(tokens=sql.SQL(tokens), t=self.db.t("enrich_spend"))
        by_model = sql.SQL(
            "SELECT models, currency, count(*), sum({tokens}), sum(cost),"
            " sum(CASE WHEN cost IS NULL THEN 1 ELSE 0 END)"
            " FROM {t} WHERE source_table = %(src)s GROUP BY models, currency"
            " ORDER BY models, currency"
        ).format(tokens=sql.SQL(tokens), t=self.db.t("enrich_spend"))
        since = sql.SQL("SELECT min(recorded_at) FROM {t} WHERE source_table = %(src)s").format(
            t=self.db.t("enrich_spend")
        )
        params = {"src": self.db.source_table}
        with self.db.connection() as conn:
            currencies = conn.execute(by_currency, params).fetchall()
            models = conn.execute(by_model, params).fetchall()
            first = conn.execute(since, params).fetchone()
        sums: list[SpendSum] = []
        for currency, runs, n, cost, unpriced in currencies:
            # A currency's runs that all lacked a price have no sum, not a zero one.
            priced = cost if int(unpriced or 0) < int(runs) else None
            sums.append(
                SpendSum(currency, int(runs), int(n or 0), _float(priced), int(unpriced or 0))
            )
        return Spend(
            by_currency=tuple(sorted(sums, key=lambda s: (s.currency is None, s.currency or ""))),
            by_model=tuple(
                ModelSpend(
                    str(m),
                    c,
                    int(r),
                    int(n or 0),
                    _float(cost if int(u or 0) < int(r) else None),
                    int(u or 0),
                )
                for m, c, r, n, cost, u in models
            ),
            since=first[0].isoformat(timespec="seconds") if first and first[0] else None,
        )


def _float(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]
