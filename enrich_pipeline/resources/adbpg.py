"""The ADBPG resource: builds the project's ``ItemStore`` (pool + all SQL) once per run.

Connection details come from the environment (``ADBPG_*`` or ``ADBPG_URL``) so that the
password never appears in run config or the UI; namespace and table are Dagster config.
"""

from __future__ import annotations

from dagster import ConfigurableResource, InitResourceContext
from pydantic import PrivateAttr

from enrich_pipeline import embedded
from enrich_pipeline.db.store import ItemStore
from enrich_pipeline.settings import DbSettings


class AdbpgResource(ConfigurableResource):
    """AnalyticDB for PostgreSQL (or any PostgreSQL): the items table and the pipeline's tables."""

    namespace: str | None = None
    table: str | None = None
    max_connections: int = 8
    statement_timeout_ms: int = 120_000

    _store: ItemStore | None = PrivateAttr(default=None)

    def db_settings(self) -> DbSettings:
        base = DbSettings.from_env()
        return DbSettings(
            base.conninfo,
            self.namespace or base.namespace,
            self.table or base.table,
        )

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    @property
    def store(self) -> ItemStore:
        """The store, connected on first use so a sensor can turn "database down" into a skip."""
        if self._store is None:
            settings = embedded.resolve(self.db_settings())
            store = ItemStore(
                settings,
                max_connections=self.max_connections,
                statement_timeout_ms=self.statement_timeout_ms,
            )
            try:
                store.setup()
            except BaseException:
                store.close()
                raise
            self._store = store
        return self._store
