"""The store: one connection pool and the statements of every table the pipeline touches,
grouped by the tables they serve (``items``, ``cache``, ``search``, ``batches``), and
read-only figures by user (``summary``)."""

from __future__ import annotations

from enrich_pipeline.db.batches import BatchRows
from enrich_pipeline.db.cache import CaptionCacheRows
from enrich_pipeline.db.database import Database
from enrich_pipeline.db.items import ItemRows
from enrich_pipeline.db.migrate import migrate
from enrich_pipeline.db.search import SearchRows
from enrich_pipeline.db.summary import SummaryRows
from enrich_pipeline.settings import DbSettings


class Store:
    """The items table and the pipeline's own tables, behind one pool."""

    # Setup done once per process and target: sensor ticks and runs build a store often.
    _prepared: dict[tuple[str, str, str], str] = {}

    def __init__(self, settings: DbSettings, *, create_pending_index: bool = True) -> None:
        self.db = Database(settings)
        self.items = ItemRows(self.db)
        self.cache = CaptionCacheRows(self.db)
        self.search = SearchRows(self.db)
        self.batches = BatchRows(self.db)
        self.summary = SummaryRows(self.db)
        self._create_pending_index = create_pending_index

    @property
    def settings(self) -> DbSettings:
        return self.db.settings

    @property
    def source_table(self) -> str:
        return self.db.source_table

    def setup(self) -> list[int]:
        """Migrate the pipeline's tables, check the items table, add the pending-rows index."""
        key = (self.settings.conninfo, self.settings.namespace, self.settings.table)
        if key in self._prepared:
            self.db.id_type = self._prepared[key]
            return []
        with self.db.connection() as conn:
            applied = migrate(conn, self.settings.namespace)
            id_type = self.db.introspect_id_type(conn)
        if not self._create_pending_index or self.items.ensure_pending_index():
            # Not remembered when the index could not be built, so the next run tries again.
            self._prepared[key] = id_type
        return applied

    def close(self) -> None:
        self.items.close()
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
