"""The chart values (deploy/helm/values.yaml) meet what Dagster's chart accepts: its JSON schema
(judging the values Helm computes from the chart's defaults and ours, as Helm itself does) and,
where that schema lets anything through, the keys the chart declares or documents."""

from __future__ import annotations

import copy

from enrich_pipeline_tests.deploy import chart_values
from enrich_pipeline_tests.deploy.files import computed_values, values


def test_the_values_meet_the_chart_schema() -> None:
    assert chart_values.schema_errors(computed_values()) == []


def test_every_key_of_the_values_is_one_the_chart_knows() -> None:
    assert chart_values.unknown_keys(values()) == []


def test_a_value_of_the_wrong_type_is_rejected_by_the_schema() -> None:
    wrong = copy.deepcopy(computed_values())
    wrong["dagsterWebserver"]["service"]["port"] = "http"
    wrong["runLauncher"]["type"] = "K8sRunLaunchr"
    errors = chart_values.schema_errors(wrong)
    assert any(e.startswith("dagsterWebserver.service.port:") for e in errors), errors
    assert any(e.startswith("runLauncher") for e in errors), errors


def test_a_misspelt_key_is_rejected_even_where_the_schema_lets_it_through() -> None:
    wrong = copy.deepcopy(values())
    wrong["dagsterDeamon"] = {"enabled": True}
    wrong["dagsterDaemon"]["runMonitoring"]["pollIntervalSecond"] = 20
    wrong["postgresql"]["postgresqlHots"] = "db"
    wrong["dagster-user-deployments"]["deployments"][0]["envSecret"] = []
    wrong["dagsterWebserver"]["readinessProbe"]["httpGett"] = {}
    # The schema itself accepts the first three: an open top level and open objects.
    merged = copy.deepcopy(computed_values())
    merged["dagsterDeamon"] = wrong["dagsterDeamon"]
    merged["dagsterDaemon"]["runMonitoring"]["pollIntervalSecond"] = 20
    merged["postgresql"]["postgresqlHots"] = "db"
    assert chart_values.schema_errors(merged) == []
    assert sorted(chart_values.unknown_keys(wrong)) == [
        "dagster-user-deployments.deployments[].envSecret",
        "dagsterDaemon.runMonitoring.pollIntervalSecond",
        "dagsterDeamon",
        "dagsterWebserver.readinessProbe.httpGett",
        "postgresql.postgresqlHots",
    ]


def test_free_form_values_take_any_key() -> None:
    """A custom class's config and an env list are the user's own: nothing to misspell."""
    free = copy.deepcopy(values())
    coordinator = free["dagsterDaemon"]["runCoordinator"]["config"]["customRunCoordinator"]
    coordinator["config"]["anything_the_class_takes"] = 1
    free["dagsterDaemon"]["labels"] = {"team": "enrich"}
    assert chart_values.unknown_keys(free) == []
