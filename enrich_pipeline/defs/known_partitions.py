"""The users partitions as the sensor last read them, read again only where they grew.

Every tick needs every partition in Dagster's order (to add new users' partitions, to resolve
the ranges of runs in flight and to plan shared ranges): 100,000 partitions take a tick about
half a second to read whole (``benchmarks/scale.py``), so the sensor keeps them between ticks
in the process that evaluates it (the code server lives across ticks) and reads only those
added since (Dagster's storage ids only grow). A partition removed elsewhere (``enrich-dagster
partitions --remove``) is not seen that way: the whole list is read again every
``FULL_READ_S``, and the sensor checks that the partitions its runs name exist (``missing``),
reading everything again when one does not.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from dagster import DagsterInstance
from dagster._serdes import serialize_value

from enrich_pipeline.defs.partitions import users_partitions
from enrich_pipeline.defs.runs import PartitionOrder

# A whole read costs a tick about 0.6 s at 100,000 partitions; removals are rare, and one that
# matters to a run is caught at once (``missing``).
FULL_READ_S = 1800.0
_PAGE = 100_000


@dataclass
class _Known:
    order: PartitionOrder
    cursor: str
    read_whole_at: float


# Per instance storage (a fresh DagsterInstance is made for each tick from the same reference).
_KNOWN: dict[str, _Known] = {}


def _where(instance: DagsterInstance) -> str | None:
    """The instance's storage as a stable name, or None where it has none across ticks (an
    ephemeral instance: always read whole)."""
    if not instance.is_persistent:
        return None
    try:
        return serialize_value(instance.get_ref())
    except Exception:  # an instance without a reference: never kept
        return None


def _read(instance: DagsterInstance, cursor: str | None) -> tuple[list[str], str]:
    keys: list[str] = []
    while True:
        page = instance.get_paginated_dynamic_partitions(
            users_partitions.name, limit=_PAGE, ascending=True, cursor=cursor
        )
        keys.extend(page.results)
        cursor = page.cursor
        if not page.has_more:
            return keys, cursor


def known_order(instance: DagsterInstance) -> PartitionOrder:
    """The users partitions in Dagster's order: those read before, plus any added since."""
    where = _where(instance)
    now = time.monotonic()
    known = _KNOWN.get(where) if where else None
    if known is None or now - known.read_whole_at > FULL_READ_S:
        keys, cursor = _read(instance, None)
        known = _Known(PartitionOrder(keys), cursor, now)
        if where:
            _KNOWN[where] = known
    else:
        added, known.cursor = _read(instance, known.cursor)
        if added:
            known.order = PartitionOrder(known.order.keys + added)
    return known.order


def missing(instance: DagsterInstance, keys: Iterable[str]) -> set[str]:
    """Which of ``keys`` no longer exist (removed elsewhere); where any is, the list is read
    whole at the next ``known_order``. The sensor asks about the partitions its runs name (a
    single-user run's, a range's two ends): Dagster refuses a run naming one that is gone, while
    a removed partition inside a range is only left out of it until the next whole read."""
    wanted = set(keys)
    if not wanted:
        return set()
    found = instance.get_existing_dynamic_partitions(users_partitions.name, list(wanted))
    gone = wanted - set(found)
    if gone:
        where = _where(instance)
        if where:
            _KNOWN.pop(where, None)
    return gone
