"""What ``enrich-dagster`` changes in the Dagster instance: the slots of the op pools, the
user partitions and their backfills. The instance is the one the environment names
(``DAGSTER_HOME``), as ``DagsterInstance.get()`` finds it; the command sets that environment
first."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from dagster import DagsterInstance

from enrich_pipeline.defs.partitions import users_partitions


def set_pool_slots(slots: Mapping[str, int]) -> None:
    """Slots of the op concurrency pools: how many caption / database steps run at once."""
    with DagsterInstance.get() as instance:
        for pool, n in slots.items():
            instance.event_log_storage.set_concurrency_slots(pool, n)


def user_partition_keys() -> list[str]:
    with DagsterInstance.get() as instance:
        return list(instance.get_dynamic_partitions(users_partitions.name))


def remove_user_partitions(keys: Iterable[str]) -> None:
    with DagsterInstance.get() as instance:
        for key in keys:
            instance.delete_dynamic_partition(users_partitions.name, key)


def backfill_partitions(job_name: str, keys: Sequence[str], target: Sequence[str]) -> str:
    """The partitions ``keys`` added, and one backfill of them, one queued run each
    (``backfill.py``); its id. One instance for both: opening one costs most of a second."""
    from enrich_pipeline.defs.instance.backfill import submit_backfill

    with DagsterInstance.get() as instance:
        instance.add_dynamic_partitions(users_partitions.name, list(keys))
        return submit_backfill(instance, job_name, keys, target)
