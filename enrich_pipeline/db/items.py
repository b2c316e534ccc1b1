"""The items table, the claims on its rows and the failure ledger: what a run reads, claims,
writes back and records, as one object (``Store.items``) assembled from one module per concern:

- :mod:`.pending_index`: the partial index on pending rows (the one change to the items table);
- :mod:`.pending`: which rows are pending or stale, and the queries that list and count them;
- :mod:`.stale`: stale rows counted and flagged, old captions adopted, cached answers forgotten;
- :mod:`.claims`: claims on rows and their leases (``enrich_claims``);
- :mod:`.writes`: a chunk's results written back in one transaction;
- :mod:`.image_vectors`: image vectors known and written (``enrich_image_embeddings``);
- :mod:`.ledger`: the failure ledger read and reset (``enrich_failures``);
- :mod:`.checks`: the figures of the asset checks.
"""

from __future__ import annotations

from enrich_pipeline.db.checks import PartitionFigures
from enrich_pipeline.db.claims import ClaimRows
from enrich_pipeline.db.database import Database
from enrich_pipeline.db.image_vectors import ImageVectorRows
from enrich_pipeline.db.leases import LeaseKeeper
from enrich_pipeline.db.ledger import FailureLedger
from enrich_pipeline.db.pending import PendingRows
from enrich_pipeline.db.pending_index import PendingIndex
from enrich_pipeline.db.stale import StaleRows
from enrich_pipeline.db.writes import ChunkWrites


class ItemRows(
    PendingIndex,
    PendingRows,
    StaleRows,
    PartitionFigures,
    ClaimRows,
    ChunkWrites,
    ImageVectorRows,
    FailureLedger,
):
    """Statements on the items table, ``enrich_claims`` and ``enrich_failures``."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.leases = LeaseKeeper(self._renew_claims)

    def close(self) -> None:
        self.leases.close()
