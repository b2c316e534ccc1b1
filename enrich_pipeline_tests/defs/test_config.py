"""The Dagster layer takes its config fields from the settings tree, and a junk environment
value never stops the code location from loading."""

from __future__ import annotations

import os
import subprocess
import sys

from enrich_pipeline.defs.config import EnrichConfig
from enrich_pipeline.defs.definitions import defs
from enrich_pipeline.defs.resources import AdbpgResource, DashScopeResource
from enrich_pipeline.settings import DAGSTER_BATCH_SIZE, RunSettings


def test_config_fields_describe_themselves_with_the_settings_bounds() -> None:
    fields = EnrichConfig.model_fields
    assert fields["batch_size"].default == DAGSTER_BATCH_SIZE
    for name, info in fields.items():
        assert info.description, name
    assert EnrichConfig(batch_size=7).run_settings().batch_size == 7
    assert fields["max_attempts"].default == RunSettings.from_env().max_attempts
    job = defs.resolve_job_def("enrich_job")
    assert job.description
    # The resources' fields and the sensors describe themselves too (the launchpad and the
    # automation page show these).
    for resource in (AdbpgResource, DashScopeResource):
        for name, info in resource.model_fields.items():
            assert info.description, (resource.__name__, name)
    for sensor in defs.sensors:
        assert sensor.description, sensor.name
    for check in defs.asset_checks:
        for spec in check.check_specs:
            assert spec.description, spec.name


def test_junk_environment_loads_with_one_error_line_naming_the_variable() -> None:
    env = {**os.environ, "ENRICH_SENSOR_INTERVAL": "1.5", "ENRICH_MAX_ATTEMPTS": "-2"}
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from enrich_pipeline.defs.definitions import defs;"
            "print(sorted(s.name for s in defs.sensors))",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pending_rows_sensor" in done.stdout
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert any("ENRICH_SENSOR_INTERVAL" in line for line in errors), done.stderr
    assert any("ENRICH_MAX_ATTEMPTS" in line for line in errors), done.stderr
