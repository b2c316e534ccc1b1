"""The connection pool and what every table module shares: quoted identifiers, the id column's
type, the retry of transient database failures.

Identifiers from configuration (namespace, table) are only ever composed with
``psycopg.sql.Identifier``; values are always parameters.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import tenacity
from psycopg import sql
from psycopg_pool import ConnectionPool, PoolTimeout

from enrich_pipeline.db.dialect import Dialect
from enrich_pipeline.redaction import DB_LOGGERS, hide_in_logs, scrub_secrets
from enrich_pipeline.settings import ConfigError, DbSettings

# Column types we can compare ids in natively (so the primary key index is used); anything
# else is compared as text.
NATIVE_ID_TYPES = {"bigint", "integer", "smallint", "text", "uuid"}

log = logging.getLogger(__name__)


def _outage_over(state: tenacity.RetryCallState) -> bool:
    db: Database = state.args[0].db
    return state.seconds_since_start >= db.settings.failover_seconds


def _note_outage(state: tenacity.RetryCallState) -> None:
    state.args[0].db.note_outage(state.outcome.exception() if state.outcome else None)


# Transient database failures (dropped connection, server restart or failover, statement
# timeout, deadlock): the statements so wrapped are idempotent, so they are tried again on a
# fresh connection for up to ADBPG_FAILOVER_SECONDS (AnalyticDB drops connections for up to
# about 30 s on a failover or upgrade).
retry_db = tenacity.retry(
    retry=tenacity.retry_if_exception_type(psycopg.OperationalError),
    stop=tenacity.stop_any(tenacity.stop_after_attempt(1000), _outage_over),
    wait=tenacity.wait_exponential_jitter(multiplier=0.5, max=5),
    before_sleep=_note_outage,
    reraise=True,
)

# Set-up statements are retried when they meet another process's set-up (a deadlock, a lock
# timeout), not when the database is unreachable: then the command says so at once.
retry_setup = tenacity.retry(
    retry=tenacity.retry_if_exception_type(
        (psycopg.errors.DeadlockDetected, psycopg.errors.LockNotAvailable)
    ),
    stop=tenacity.stop_after_attempt(5),
    wait=tenacity.wait_exponential_jitter(multiplier=0.2, max=3),
    reraise=True,
)


class _PoolLog(logging.Filter):
    """Watches the pool's "error connecting" warnings: keeps the last reason of each pool, so
    that a timeout can say why (in one line), and drops the warning when no logging is set up
    at all (a command line), where Python would print each attempt, libpq's multi-line
    message included, to stderr before the command's own one-line error."""

    _ERROR = re.compile(r"error connecting in '(?P<pool>[^']*)': (?P<reason>.*)", re.S)

    def __init__(self) -> None:
        super().__init__()
        self.last: dict[str, str] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            match = self._ERROR.match(record.getMessage())
        except Exception:  # noqa: BLE001 - a broken record is the logging module's business
            return True
        if match is None:
            return True
        reason = (match["reason"].strip().splitlines() or ["?"])[0]
        self.last[match["pool"]] = scrub_secrets(reason)
        return _someone_listens(logging.getLogger(record.name))


def _someone_listens(logger: logging.Logger) -> bool:
    current: logging.Logger | None = logger
    while current is not None:
        if current.handlers:
            return True
        if not current.propagate:
            return False
        current = current.parent
    return False


_POOL_LOG = _PoolLog()


def _watch_pool_log(secrets: tuple[str, ...]) -> None:
    pool_logger = logging.getLogger("psycopg.pool")
    if _POOL_LOG not in pool_logger.filters:
        # First, so that it reads the record before the secrets are replaced in it.
        pool_logger.filters.insert(0, _POOL_LOG)
    # libpq's messages may quote what it was given (a token of a URL it cannot parse), and the
    # pool logs them: the password is replaced in every record of these loggers.
    hide_in_logs(secrets, DB_LOGGERS)


class Database:
    """A psycopg 3 pool on one items table's database, and the names of its tables."""

    def __init__(self, settings: DbSettings) -> None:
        if not settings.conninfo.get_secret_value():
            raise ConfigError(
                "no database configured: set ADBPG_HOST/ADBPG_URL or use the embedded one"
            )
        self.settings = settings
        self.namespace = settings.namespace
        # Rows of the pipeline's tables carry the items table they belong to.
        self.source_table = f"{settings.namespace}.{settings.table}"
        self.items = sql.Identifier(settings.namespace, settings.table)
        _watch_pool_log(settings.secrets())
        self.pool = ConnectionPool(
            settings.conninfo.get_secret_value(),
            min_size=1,
            max_size=settings.max_connections,
            kwargs={
                "application_name": "enrich-pipeline",
                "connect_timeout": settings.connect_timeout,
                "options": f"-c statement_timeout={settings.statement_timeout_ms}",
            },
            # A connection the server dropped (restart, terminated backend) is replaced on
            # checkout instead of failing the next statement.
            check=ConnectionPool.check_connection,
            open=True,
            name="enrich-pipeline",
            # Fail within seconds, not the pool's default 30 s, when the server is down.
            timeout=settings.connect_timeout,
        )
        self.id_type: str | None = None
        self.dialect = Dialect(version="", server_version_num=0)
        self._outage_since: float | None = None
        self._outage_lock = threading.Lock()

    def note_outage(self, exc: BaseException | None) -> None:
        """One log line per outage, however many statements wait it out."""
        with self._outage_lock:
            if self._outage_since is not None:
                return
            self._outage_since = time.monotonic()
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0] if exc else "?"
        log.warning(
            "database %s unavailable (%s); waiting up to %s s for it to come back "
            "(a failover takes about 30 s)",
            self.settings.redacted(),
            reason,
            self.settings.failover_seconds,
        )

    def note_back(self) -> None:
        with self._outage_lock:
            since, self._outage_since = self._outage_since, None
        if since is not None:
            log.warning("database back after %.0f s; the run goes on", time.monotonic() - since)

    def close(self) -> None:
        self.pool.close()

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        try:
            with self.pool.connection() as conn:
                if self._outage_since is not None:
                    self.note_back()
                yield conn
        except PoolTimeout as exc:
            last = _POOL_LOG.last.get(self.pool.name)
            if last and "last error" not in str(exc):
                raise PoolTimeout(f"{exc}; last error: {last}") from None
            raise

    def t(self, name: str) -> sql.Identifier:
        """One of the pipeline's own tables, in the items table's namespace."""
        return sql.Identifier(self.namespace, name)

    def introspect_id_type(self, conn: psycopg.Connection) -> str:
        qualified = self.items.as_string(conn)
        row = conn.execute(
            "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a"
            " WHERE a.attrelid = to_regclass(%s) AND a.attname = 'id' AND NOT a.attisdropped",
            (qualified,),
        ).fetchone()
        conn.commit()
        if row is None:
            raise ConfigError(f"items table {qualified} does not exist (or has no id column)")
        found = str(row[0])
        self.id_type = found if found in NATIVE_ID_TYPES else "text"
        return self.id_type

    @property
    def id_cast(self) -> sql.Composable:
        """The id column's type for casting parameters; ids travel as text otherwise."""
        if self.id_type is None:
            raise RuntimeError("Store.setup() must run before queries")
        return sql.SQL(self.id_type)

    @property
    def i_id(self) -> sql.Composable:
        """``i.id`` as compared with parameters: natively (so the key index is used) or as text."""
        return sql.SQL("i.id" if self.id_type != "text" else "i.id::text")

    def id_match(self, param: str) -> sql.Composable:
        return sql.SQL("{} = ANY({}::{}[])").format(self.i_id, sql.Placeholder(param), self.id_cast)
