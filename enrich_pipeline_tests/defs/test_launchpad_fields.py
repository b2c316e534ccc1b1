"""The launchpad shows only fields that say what they do: every config field of every job
(resources and ops) has a description, and no field of Dagster's default IO manager
(``io_manager.base_dir``) appears, since no output is stored (``defs/io_managers.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from dagster import DagsterInstance, materialize
from dagster._config import ConfigType, ConfigTypeKind

from enrich_pipeline.defs.assets import enriched_items
from enrich_pipeline.defs.definitions import defs
from enrich_pipeline.defs.resources import DashScopeResource
from enrich_pipeline_tests.defs.test_asset import resources
from enrich_pipeline_tests.helpers import Items


def _fields(config: ConfigType, path: str = "") -> list[tuple[str, str | None]]:
    """(path, description) of every field below ``config``, depth first."""
    out: list[tuple[str, str | None]] = []
    if config.kind in (
        ConfigTypeKind.STRICT_SHAPE,
        ConfigTypeKind.PERMISSIVE_SHAPE,
    ):
        for name, field in config.fields.items():  # type: ignore[attr-defined]
            here = f"{path}.{name}" if path else name
            out.append((here, field.description))
            out += _fields(field.config_type, here)
    elif config.kind in (ConfigTypeKind.NONEABLE, ConfigTypeKind.ARRAY):
        out += _fields(config.inner_type, path)  # type: ignore[attr-defined]
    return out


def test_every_launchpad_field_is_described_and_no_io_manager_base_dir() -> None:
    jobs = list(defs.resolve_all_job_defs())
    assert {"enrich_job", "batch_submit_job", "batch_collect_job"} <= {j.name for j in jobs}
    for job in jobs:
        fields = _fields(job.run_config_schema.config_type)
        paths = [p for p, _ in fields]
        assert not [p for p in paths if p.startswith("resources.io_manager.config.")], job.name
        resources = [
            (p, d)
            for p, d in fields
            if p.startswith("resources.") and p.count(".") == 3  # resources.<key>.config.<field>
        ]
        assert any(p == "resources.dashscope.config.offline" for p, _ in resources)
        undescribed = [p for p, d in resources if not d]
        assert not undescribed, (job.name, undescribed)
        offline = dict(resources)["resources.dashscope.config.offline"] or ""
        assert "DASHSCOPE_API_KEY" in offline and "embedded" in offline


def test_offline_false_means_dashscope_only_and_a_missing_key_stops_the_run_in_one_line(
    env: pytest.MonkeyPatch, items: Items, image_dir: Path
) -> None:
    """The launchpad's ``offline`` says what a run does: unset is decided at run start from the
    run's environment; ``false`` asked for DashScope, so no key is a stop before any call, and
    the row is left as it was."""
    item = items.add("alice", str(image_dir / "blue.jpg"))
    env.delenv("DASHSCOPE_API_KEY")
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("users", ["alice"])

    result = materialize(
        [enriched_items],
        partition_key="alice",
        instance=instance,
        resources={**resources(), "dashscope": DashScopeResource(offline=False)},
        raise_on_error=False,
    )

    assert not result.success
    failures = [e for e in result.all_events if e.is_failure]
    assert any(
        "dashscope.offline is false but DASHSCOPE_API_KEY is not set" in str(e.event_specific_data)
        for e in failures
    )
    # Stopped before the store was opened: the row as it was, not even the pipeline's tables.
    assert items.row(item)["metadata"] == {}
    assert items.execute("SELECT to_regclass('{ns}.enrich_failures') IS NULL") == [(True,)]
