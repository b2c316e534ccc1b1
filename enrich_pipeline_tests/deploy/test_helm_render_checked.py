"""The manifests rendered from the chart values (deploy/helm/rendered/manifests.yaml) are what
these values give, and every one is a valid Kubernetes object (kubernetes-validate's offline
schemas, strict: no unknown field), the three Dagster processes on our image, run as a non-root
user, with secrets only by name."""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import kubernetes_validate
import pytest
import yaml

from enrich_pipeline_tests.deploy.files import (
    COMPUTED_VALUES,
    RERENDER,
    manifest,
    render,
    values,
    values_sha256,
)

SECRET_NAMES = {"enrich-pipeline-secrets", "enrich-dagster-postgresql"}
SECRET_VARIABLES = {"DASHSCOPE_API_KEY", "ADBPG_PASSWORD", "DAGSTER_PG_PASSWORD", "ADBPG_URL"}


def pods() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{doc['kind']} {doc['metadata']['name']}", doc["spec"]["template"]["spec"])
        for doc in render().documents
        if doc["kind"] in ("Deployment", "Job")
    ]


def our_image() -> str:
    image = values()["dagsterDaemon"]["image"]
    return f"{image['repository']}:{image['tag']}"


def test_the_render_is_fresh() -> None:
    assert render().values_sha256 == values_sha256(), (
        f"deploy/helm/values.yaml changed since the render: run {RERENDER}"
    )
    assert f"values-sha256: {values_sha256()}" in COMPUTED_VALUES.read_text(), (
        f"deploy/helm/rendered/values.computed.yaml is stale: run {RERENDER}"
    )


def test_every_rendered_manifest_is_a_valid_kubernetes_object() -> None:
    kinds = Counter(doc["kind"] for doc in render().documents)
    assert kinds["Deployment"] == 3 and kinds["Service"] == 2 and kinds["Job"] == 1, kinds
    for doc in render().documents:
        kubernetes_validate.validate(doc, render().kube_version, strict=True)


def test_a_manifest_with_an_unknown_field_is_rejected() -> None:
    wrong = copy.deepcopy(manifest("Deployment", "dagster-daemon"))
    wrong["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError, match="imagePullPolcy"):
        kubernetes_validate.validate(wrong, render().kube_version, strict=True)


def test_code_server_webserver_and_daemon_run_our_image_as_a_non_root_user() -> None:
    names = {name for name, _ in pods()}
    assert names == {
        "Deployment dagster-dagster-user-deployments-enrich-pipeline",
        "Deployment dagster-dagster-webserver",
        "Deployment dagster-daemon",
        "Job dagster-pool-slots",
    }
    for name, spec in pods():
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] == 10001, name
        for container in spec["containers"]:
            assert container["image"] == our_image(), name
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, name


def test_the_code_server_serves_our_definitions_and_is_probed_by_its_health_check() -> None:
    (spec,) = [s for n, s in pods() if n.endswith("enrich-pipeline")]
    (container,) = spec["containers"]
    assert container["args"] == [
        "dagster", "api", "grpc", "-h", "0.0.0.0", "-p", "3030",
        "--module-name", "enrich_pipeline.defs.definitions",
    ]  # fmt: skip
    probe = ["dagster", "api", "grpc-health-check", "-p", "3030"]
    assert container["readinessProbe"]["exec"]["command"] == probe
    workspace = yaml.safe_load(
        manifest("ConfigMap", "dagster-workspace-yaml")["data"]["workspace.yaml"]
    )
    (server,) = [entry["grpc_server"] for entry in workspace["load_from"]]
    assert server == {"host": "enrich-pipeline", "port": 3030, "location_name": "enrich-pipeline"}


def test_no_secret_value_is_in_the_manifests() -> None:
    assert not [doc for doc in render().documents if doc["kind"] == "Secret"]
    for name, spec in pods():
        for container in spec.get("initContainers", []) + spec["containers"]:
            for variable in container.get("env", []):
                if variable["name"] in SECRET_VARIABLES:
                    assert "value" not in variable, (name, variable["name"])
                    assert variable["valueFrom"]["secretKeyRef"]["name"] in SECRET_NAMES
            for source in container.get("envFrom", []):
                # The chart adds its Celery secret to code servers, optional (we run no Celery).
                if "secretRef" in source and not source["secretRef"].get("optional"):
                    assert source["secretRef"]["name"] in SECRET_NAMES, name
    for doc in render().documents:
        if doc["kind"] == "ConfigMap":
            assert not SECRET_VARIABLES & set(doc.get("data") or {}), doc["metadata"]["name"]


def test_the_pool_slots_are_set_after_every_install_and_upgrade() -> None:
    job = manifest("Job", "dagster-pool-slots")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"][-1] == (
        "dagster instance concurrency set dashscope 4 && dagster instance concurrency set adbpg 8"
    )
    mount = container["volumeMounts"][0]
    assert mount["mountPath"] == "/opt/dagster/dagster_home/dagster.yaml"
