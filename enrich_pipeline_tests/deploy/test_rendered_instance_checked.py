"""The dagster.yaml that the chart renders (ConfigMap dagster-instance, mounted into the
webserver, the daemon and every run) passes Dagster's own instance validation, each class in it
accepts its config (the Kubernetes run launcher's included), and it keeps the shipped
dagster.yaml's settings wherever the chart does not replace them."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster import DagsterInvalidConfigError
from dagster._config import process_config, resolve_to_config_type
from dagster._core.instance.config import dagster_instance_config
from dagster._serdes.config_class import ConfigurableClassData, class_from_code_pointer

from enrich_pipeline.defs.instance.run_coordinator import UserRunCoordinator
from enrich_pipeline.settings.automation import AutomationSettings
from enrich_pipeline_tests.deploy.files import rendered_instance, shipped_instance

CLASSES = (
    "scheduler",
    "schedule_storage",
    "run_storage",
    "event_log_storage",
    "run_launcher",
    "run_coordinator",
    "compute_logs",
)


def class_errors(entry: dict[str, Any]) -> list[str]:
    """What the class named by ``entry`` says of its config: Dagster's check before it builds
    the class (ConfigurableClassData.rehydrate), without building it (the Kubernetes launcher
    would look for a cluster)."""
    data = ConfigurableClassData(entry["module"], entry["class"], yaml.safe_dump(entry["config"]))
    cls = class_from_code_pointer(data.module_name, data.class_name)
    result = process_config(resolve_to_config_type(cls.config_type()), data.config_dict)  # type: ignore[attr-defined]
    return [error.message for error in result.errors or []]


def validated(config: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(config))
    checked, _ = dagster_instance_config(str(tmp_path))
    return dict(checked)


@pytest.fixture(autouse=True)
def storage_password(monkeypatch: pytest.MonkeyPatch) -> None:
    # Where the chart puts it (secret enrich-dagster-postgresql), for the env: sources to resolve.
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "from-the-secret")


def test_the_rendered_instance_passes_dagsters_validation(tmp_path: Path) -> None:
    checked = validated(rendered_instance(), tmp_path)
    assert set(CLASSES) <= set(checked)
    for key in CLASSES:
        assert class_errors({"config": {}, **checked[key]}) == [], key
    assert checked["run_launcher"]["class"] == "K8sRunLauncher"


def test_a_wrong_setting_in_the_instance_is_rejected(tmp_path: Path) -> None:
    wrong = copy.deepcopy(rendered_instance())
    wrong["run_monitoring"]["poll_interval_seconds"] = "soon"
    with pytest.raises(DagsterInvalidConfigError, match="poll_interval_seconds"):
        validated(wrong, tmp_path)
    launcher = rendered_instance()["run_launcher"]
    launcher["config"]["env_secret"] = ["enrich-pipeline-secrets"]
    assert any("env_secret" in error for error in class_errors(launcher))


def test_the_daemon_builds_the_shipped_run_queue_from_it() -> None:
    rendered = rendered_instance()["run_coordinator"]
    shipped = shipped_instance()["run_coordinator"]
    coordinator = ConfigurableClassData(
        rendered["module"], rendered["class"], yaml.safe_dump(rendered["config"])
    ).rehydrate(UserRunCoordinator)
    assert isinstance(coordinator, UserRunCoordinator)
    # The shipped file reads the run limit from ENRICH_MAX_CONCURRENT_RUNS; the chart states it.
    assert shipped["config"].pop("max_concurrent_runs") == {"env": "ENRICH_MAX_CONCURRENT_RUNS"}
    limit = rendered["config"].pop("max_concurrent_runs")
    assert limit == AutomationSettings.model_fields["max_concurrent_runs"].default == 4
    assert rendered == shipped


def test_the_chart_keeps_the_shipped_settings_it_does_not_replace() -> None:
    rendered, shipped = rendered_instance(), shipped_instance()
    for key in ("run_monitoring", "python_logs", "sensors", "telemetry", "nux"):
        assert rendered[key] == shipped[key], key
    # Replaced: the launcher (a Kubernetes Job per run, health from the Job's pod, instead of a
    # local process with a heartbeat) and the storage (the same PostgreSQL, given by parts).
    assert shipped["run_launcher"]["class"] == "HeartbeatRunLauncher"
    assert rendered["run_launcher"]["module"] == "dagster_k8s"
    assert "storage" not in rendered and shipped["storage"]["postgres"]
    for key in ("run_storage", "event_log_storage", "schedule_storage"):
        database = rendered[key]["config"]["postgres_db"]
        assert database["scheme"] == "postgresql+psycopg2", key
        assert database["password"] == {"env": "DAGSTER_PG_PASSWORD"}, key
    # Added by the chart: the scheduler, which the daemon runs anyway, and the run retries
    # daemon with Dagster's default of no retry (none on one machine either); compute logs are
    # not kept (NoOpComputeLogManager): a step's stdout/stderr is not in the UI, its events are.
    assert rendered["run_retries"] == {"enabled": True}
    assert rendered["compute_logs"]["class"] == "NoOpComputeLogManager"
