"""The deploy folder's files as the deploy tests read them: the chart values, the render made
from them (scripts/render-helm.sh) with its header, and the instance (dagster.yaml) in it."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
VALUES = DEPLOY / "helm" / "values.yaml"
RENDERED = DEPLOY / "helm" / "rendered" / "manifests.yaml"
COMPUTED_VALUES = DEPLOY / "helm" / "rendered" / "values.computed.yaml"
CHART_SCHEMA = DEPLOY / "helm" / "chart-schema" / "values.schema.json"
DOCUMENTED_KEYS = DEPLOY / "helm" / "chart-schema" / "documented-keys.txt"
SHIPPED_INSTANCE = ROOT / "enrich_pipeline" / "defs" / "instance" / "dagster.yaml"
RERENDER = "bash scripts/render-helm.sh CHART_DIR (the unpacked chart dagster; see its header)"


@dataclass(frozen=True)
class Render:
    chart_version: str
    values_sha256: str
    kube_version: str
    documents: list[dict[str, Any]]


def values() -> dict[str, Any]:
    return yaml.safe_load(VALUES.read_text())


def computed_values() -> dict[str, Any]:
    """The chart's defaults merged with ours, as Helm computed them for the render."""
    return yaml.safe_load(COMPUTED_VALUES.read_text())


def values_sha256() -> str:
    return hashlib.sha256(VALUES.read_bytes()).hexdigest()


@cache
def render() -> Render:
    text = RENDERED.read_text()
    header = dict(re.findall(r"^# (chart|values-sha256|helm): (.*)$", text, re.MULTILINE))
    kube = re.search(r"kube-version (\S+)", header["helm"])
    assert kube, header
    documents = [doc for doc in yaml.safe_load_all(text) if doc]
    return Render(header["chart"].split()[1], header["values-sha256"], kube[1], documents)


def manifest(kind: str, name: str) -> dict[str, Any]:
    found = [
        doc for doc in render().documents if doc["kind"] == kind and doc["metadata"]["name"] == name
    ]
    assert len(found) == 1, f"{kind} {name}: {len(found)} in the render"
    return found[0]


def rendered_instance() -> dict[str, Any]:
    """The dagster.yaml that the chart mounts into the webserver, the daemon and every run."""
    return yaml.safe_load(manifest("ConfigMap", "dagster-instance")["data"]["dagster.yaml"])


def shipped_instance() -> dict[str, Any]:
    return yaml.safe_load(SHIPPED_INSTANCE.read_text())
