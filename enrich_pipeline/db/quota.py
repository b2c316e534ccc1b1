"""The shared rate budget: one row per account and model in ``enrich_rate_budget``.

Every process that paces calls through it (``providers/quota.py``) reserves each call's send
time with one statement: the row is the account's schedule, spaced so that no second holds more
than RPM/60 requests or TPM/60 tokens, whoever sends them. The UPDATE is atomic (the row lock
serialises concurrent reservations) and portable: plain arithmetic on ``double precision``
columns, no SKIP LOCKED, no jsonb, no LATERAL. Times are the database server's clock
(``clock_timestamp()``), and the statement returns how long to wait measured on that same clock,
so the processes' own clocks never need to agree.

The budget keeps its own connection (autocommit, short timeouts) apart from the store's pool:
a slow or lost database must cost a call at most ``timeout`` seconds before the caller falls
back to pacing alone, never a stuck pool.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import psycopg
from psycopg import sql

from enrich_pipeline.redaction import DB_LOGGERS, hide_in_logs
from enrich_pipeline.settings import DbSettings

TIMEOUT = 2.0
"""Seconds a reservation may take (connect, lock wait and statement) before it counts as
failed."""

# The server's clock unless the caller gives its own (tests: a fake clock, exact and instant).
_NOW = "COALESCE(%(now)s::double precision, date_part('epoch', clock_timestamp()))"
_SLOT = f"GREATEST({_NOW} + %(not_before)s, next_request, next_token)"


class BudgetUnavailable(Exception):
    """The shared budget could not be reached in time."""


class RateBudgetTable:
    """``reserve`` one send slot of an account's model; thread-safe, one connection."""

    def __init__(
        self,
        settings: DbSettings,
        *,
        timeout: float = TIMEOUT,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.settings = settings
        self.timeout = timeout
        # Its own connections, apart from the pool's: the password is hidden in the driver's
        # log lines before the first one.
        hide_in_logs(settings.secrets(), DB_LOGGERS)
        self._clock = clock  # None: the database server's clock
        self._table = sql.Identifier(settings.namespace, "enrich_rate_budget")
        self._lock = threading.Lock()
        self._conn: psycopg.Connection | None = None
        self._reserve = sql.SQL(
            "UPDATE {t} SET"
            f" last_slot = {_SLOT},"
            f" next_request = {_SLOT} + %(request_spacing)s,"
            f" next_token = {_SLOT} + %(token_spacing)s,"
            " reservations = reservations + 1,"
            " updated_at = now()"
            " WHERE account = %(account)s AND model = %(model)s"
            f" RETURNING last_slot - {_NOW}, reservations"
        ).format(t=self._table)
        self._insert = sql.SQL(
            "INSERT INTO {t} (account, model) SELECT %(account)s, %(model)s"
            " WHERE NOT EXISTS (SELECT 1 FROM {t} WHERE account = %(account)s"
            " AND model = %(model)s)"
        ).format(t=self._table)

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(
                self.settings.conninfo.get_secret_value(),
                autocommit=True,
                application_name="enrich-pipeline-rate-budget",
                connect_timeout=max(1, round(self.timeout)),
                options=f"-c statement_timeout={int(self.timeout * 1000)}",
            )
        return self._conn

    def reserve(
        self,
        account: str,
        model: str,
        *,
        request_spacing: float,
        token_spacing: float,
        not_before: float = 0.0,
    ) -> tuple[float, int]:
        """Reserve the next send slot of ``model`` on ``account``: returns the seconds to wait
        before sending (0 when the slot is now) and the row's reservation count so far.

        The next request of anyone may go ``request_spacing`` seconds after this one, and
        ``token_spacing`` seconds after it for this one's tokens; the slot is at least
        ``not_before`` seconds from now. Raises BudgetUnavailable when the database does not
        answer within ``timeout``."""
        params = {
            "account": account,
            "model": model,
            "request_spacing": float(request_spacing),
            "token_spacing": float(token_spacing),
            "not_before": max(0.0, float(not_before)),
            "now": self._clock() if self._clock is not None else None,
        }
        if not self._lock.acquire(timeout=self.timeout):
            raise BudgetUnavailable("the shared rate budget is busy (another call is waiting)")
        try:
            for _ in range(2):
                conn = self._connection()
                row = conn.execute(self._reserve, params).fetchone()
                if row is not None:
                    return max(0.0, float(row[0])), int(row[1])
                try:
                    conn.execute(self._insert, params)
                except psycopg.errors.UniqueViolation:
                    pass  # another process created the row first: reserve in it
            raise BudgetUnavailable(f"no budget row for {account}/{model}")
        except psycopg.Error as exc:
            self._drop()
            raise BudgetUnavailable(f"{type(exc).__name__}: {exc}".splitlines()[0]) from exc
        finally:
            self._lock.release()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:
                pass

    def close(self) -> None:
        with self._lock:
            self._drop()
