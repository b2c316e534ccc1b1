"""A job backfill submitted from this process: what ``dagster job backfill`` does, without the
code server it starts.

``dagster job backfill`` loads the workspace through a gRPC code server in a new process (the
definitions imported a second time, a server started and stopped: 7-17 s of the command's time
on a busy machine). The command line's backfill runs in a Python that has this code location
importable already, so it loads the location in this process instead, as Dagster's own CLI does
where it may (``allow_in_process``), under the workspace's location name: the daemon finds the
runs' code location by that name in its own workspace and launches them as any other run. The
backfill and its runs are the same as before: one backfill record, one queued run per partition
(``dagster/partition``, ``dagster/backfill``), each queued through the instance's run
coordinator (so ``enrich/user`` and the one-run-per-user limit apply).
"""

from __future__ import annotations

from collections.abc import Sequence

from dagster import DagsterInstance
from dagster import __version__ as dagster_version

# Dagster exports none of these: they are what its ``job backfill`` command is made of
# (dagster/_cli/job.py ``execute_backfill_command``), pinned with the version.
from dagster._cli.workspace.cli_target import (
    get_code_location_from_workspace,
    get_remote_job_from_remote_repo,
    get_remote_repository_from_code_location,
    get_workspace_from_cli_opts,
)
from dagster._core.execution.backfill import BulkActionStatus, PartitionBackfill
from dagster._core.execution.job_backfill import create_backfill_run
from dagster._core.remote_representation.external_data import PartitionSetExecutionParamSnap
from dagster._core.utils import make_new_backfill_id
from dagster._time import get_current_timestamp
from dagster_shared.cli import WorkspaceOpts


def workspace_opts(target: Sequence[str]) -> WorkspaceOpts:
    """The code location as ``dagster dev`` is given it (``enrich-dagster``'s ``-w FILE`` or
    ``-m MODULE``), so that both name it alike."""
    flag, value = target
    if flag == "-w":
        return WorkspaceOpts(workspace=[value])
    return WorkspaceOpts(module_name=[value])


def submit_backfill(
    instance: DagsterInstance, job_name: str, keys: Sequence[str], target: Sequence[str]
) -> str:
    """One backfill of ``job_name`` over the partitions ``keys`` (each already added), one run
    per partition, submitted to the run queue; the backfill's id."""
    with get_workspace_from_cli_opts(
        instance, dagster_version, workspace_opts(target), allow_in_process=True
    ) as workspace:
        location = get_code_location_from_workspace(workspace, None)
        repo = get_remote_repository_from_code_location(location, None)
        job = get_remote_job_from_remote_repo(repo, job_name)
        partition_set = next(p for p in repo.get_partition_sets() if p.job_name == job.name)
        backfill = PartitionBackfill(
            backfill_id=make_new_backfill_id(),
            partition_set_origin=partition_set.get_remote_origin(),
            status=BulkActionStatus.REQUESTED,
            partition_names=list(keys),
            from_failure=False,
            reexecution_steps=None,
            tags={},
            backfill_timestamp=get_current_timestamp(),
        )
        params = location.get_partition_set_execution_params(
            repository_handle=repo.handle,
            partition_set_name=partition_set.name,
            partition_names=list(keys),
            instance=instance,
        )
        assert isinstance(params, PartitionSetExecutionParamSnap), params
        for data in params.partition_data:
            run = create_backfill_run(
                workspace,
                instance,
                location,
                job,
                partition_set,
                backfill,
                data.name,
                data.tags,
                data.run_config,
            )
            if run is not None:
                instance.submit_run(run.run_id, workspace)
        instance.add_backfill(
            backfill.with_status(BulkActionStatus.COMPLETED).with_end_timestamp(
                get_current_timestamp()
            )
        )
        return backfill.backfill_id
