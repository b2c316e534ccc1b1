"""The store: one connection pool and the statements of every table the pipeline touches,
grouped by the tables they serve (``items``, ``cache``, ``search``, ``batches``, ``spend``), and
read-only figures by user (``summary``) and of the whole table (``overview``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import psycopg

from enrich_pipeline.db import preflight
from enrich_pipeline.db.batches import BatchRows
from enrich_pipeline.db.cache import CaptionCacheRows
from enrich_pipeline.db.database import Database, retry_setup
from enrich_pipeline.db.dialect import Dialect, probe
from enrich_pipeline.db.items import ItemRows
from enrich_pipeline.db.migrate import migrate, pending
from enrich_pipeline.db.overview import OverviewRows
from enrich_pipeline.db.search import SearchRows
from enrich_pipeline.db.spend import SpendRows
from enrich_pipeline.db.summary import SummaryRows
from enrich_pipeline.settings import ConfigError, DbSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Readiness:
    """What setup found, for the report: the server, the index, rows it must leave alone."""

    dialect: Dialect
    id_type: str
    pending_index: bool
    null_ids: int = 0
    shared_ids: int = 0
    notes: tuple[str, ...] = field(default=())


class Store:
    """The items table and the pipeline's own tables, behind one pool."""

    # Setup done once per process and target: sensor ticks and runs build a store often.
    _prepared: dict[tuple[str, str, str], Readiness] = {}

    def __init__(self, settings: DbSettings, *, create_pending_index: bool = True) -> None:
        self.db = Database(settings)
        self.items = ItemRows(self.db)
        self.cache = CaptionCacheRows(self.db)
        self.search = SearchRows(self.db)
        self.batches = BatchRows(self.db)
        self.summary = SummaryRows(self.db)
        self.overview = OverviewRows(self.db)
        self.spend = SpendRows(self.db)
        self._create_pending_index = create_pending_index
        self.readiness: Readiness | None = None

    @property
    def settings(self) -> DbSettings:
        return self.db.settings

    @property
    def source_table(self) -> str:
        return self.db.source_table

    @property
    def dialect(self) -> Dialect:
        return self.db.dialect

    def setup(self, *, admin: bool = False) -> list[int]:
        """Check the items table and the role's rights, migrate the pipeline's tables where the
        role may, add the pending-rows index where it may; every problem found before anything
        is paid for, as one line each (``ConfigError``).

        ``admin`` (``enrich-captions --setup``): create what needs more rights, and wait for the
        index to be built.
        """
        key = (
            self.settings.conninfo.get_secret_value(),
            self.settings.namespace,
            self.settings.table,
        )
        known = self._prepared.get(key)
        if known is not None and not admin:
            self._adopt(known)
            return []
        applied, readiness = self._prepare(admin)
        self._adopt(readiness)
        # Not remembered when the index could not be built, so the next run tries again.
        if readiness.pending_index or not self._create_pending_index:
            self._prepared[key] = readiness
        return applied

    def _adopt(self, readiness: Readiness) -> None:
        self.readiness = readiness
        self.db.dialect = readiness.dialect
        self.db.id_type = readiness.id_type

    @retry_setup
    def _prepare(self, admin: bool) -> tuple[list[int], Readiness]:
        try:
            return self._prepare_once(admin)
        except psycopg.errors.InsufficientPrivilege as exc:
            reason = (str(exc).strip().splitlines() or ["permission denied"])[0]
            raise ConfigError(
                f"this role lacks a right the pipeline needs ({reason}): an administrator runs "
                "`enrich-captions --setup --grant-to ROLE` to print the grants"
            ) from None

    def _prepare_once(self, admin: bool) -> tuple[list[int], Readiness]:
        ns = self.settings.namespace
        notes: list[str] = []
        with self.db.connection() as conn:
            self.db.dialect = probe(conn, self.db.items.as_string(conn))
            # The items table first: a mistyped namespace must not create a schema of tables.
            problems = preflight.items_problems(conn, self.db)
            if problems:
                raise ConfigError("\n".join(problems))
            todo = pending(conn, ns)
            applied: list[int] = []
            if todo:
                try:
                    applied = migrate(conn, ns, greenplum=self.db.dialect.greenplum)
                except psycopg.errors.InsufficientPrivilege as exc:
                    conn.rollback()
                    raise ConfigError(
                        f"the pipeline's tables in schema {ns} are missing or out of date "
                        f"({len(todo)} migration(s) to apply) and this role may not create them "
                        f"({str(exc).strip().splitlines()[0]}): an administrator runs "
                        "`enrich-captions --setup` once"
                    ) from None
            problems = preflight.pipeline_problems(conn, ns)
            if problems:
                raise ConfigError("\n".join(problems))
            id_type = self.db.introspect_id_type(conn)
            null_ids = shared_ids = 0
            if not self.db.dialect.ids_unique:
                null_ids, shared_ids = preflight.unaddressable(conn, self.db)
                if null_ids or shared_ids:
                    notes.append(
                        f"{null_ids} row(s) without an id and {shared_ids} id(s) shared by "
                        "several rows are left alone: the pipeline addresses rows by id"
                    )
            owner = preflight.owns_items(conn, self.db)
            has_index = self.items.has_pending_index(conn)
            conn.commit()
        if not has_index and self._create_pending_index:
            if owner or admin:
                has_index = self.items.ensure_pending_index(wait_seconds=600 if admin else 30)
            else:
                notes.append(
                    "the pending-rows index is missing and only the table's owner may add it: "
                    "each pending query and sensor tick scans the items table (an administrator "
                    "adds it with `enrich-captions --setup`)"
                )
        for note in notes:
            log.warning(note)
        return applied, Readiness(
            self.db.dialect, id_type, has_index, null_ids, shared_ids, tuple(notes)
        )

    def close(self) -> None:
        self.items.close()
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
