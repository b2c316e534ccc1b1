"""Chart values checked offline: against the chart's own JSON schema, and key by key against
what the chart declares or documents.

The chart's schema refers to the Kubernetes definitions on the web (a copy of v1.19's); here
they resolve to kubernetes-validate's offline copy for the render's Kubernetes version (its
plain form: the chart adds keys of its own to some, such as a probe's ``enabled``). The schema
lets unknown keys through at the top level and in many objects, so ``unknown_keys`` also requires
every key to be declared by the schema or to be a key path of the chart's values.yaml
(documented-keys.txt); below a free-form value (an env map, a custom class's config, a key
whose documented default has no keys of its own) anything goes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import cache
from importlib import resources
from typing import Any

import jsonschema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from enrich_pipeline_tests.deploy.files import CHART_SCHEMA, DOCUMENTED_KEYS, render

K8S_DEFINITIONS = "https://raw.githubusercontent.com/yannh/kubernetes-json-schema/master/v1.19.0/_definitions.json"


@cache
def registry() -> Registry:
    version = render().kube_version
    folder = resources.files("kubernetes_validate") / "kubernetes-json-schema"
    definitions = json.loads((folder / f"v{version}-local" / "_definitions.json").read_text())
    # The chart points into "definitions", kubernetes-validate's copy names them "$defs".
    contents = {"$defs": definitions["$defs"], "definitions": definitions["$defs"]}
    return Registry().with_resource(K8S_DEFINITIONS, DRAFT202012.create_resource(contents))


@cache
def chart_schema() -> dict[str, Any]:
    return json.loads(CHART_SCHEMA.read_text())


def schema_errors(values: dict[str, Any]) -> list[str]:
    """What the chart's schema says is wrong with ``values``, one line each."""
    validator = jsonschema.Draft202012Validator(chart_schema(), registry=registry())
    return [
        f"{'.'.join(str(p) for p in error.absolute_path) or '(top)'}: {error.message}"
        for error in validator.iter_errors(values)
    ]


@cache
def documented() -> frozenset[str]:
    lines = DOCUMENTED_KEYS.read_text().splitlines()
    return frozenset(line for line in lines if line and not line.startswith("#"))


def _has_children(path: str) -> bool:
    return any(key.startswith((f"{path}.", f"{path}[]")) for key in documented())


# A schema node with the resolver that its "$ref"s are relative to (the chart's, or the
# Kubernetes definitions' once a reference has led there).
Node = tuple[dict[str, Any], Any]


@cache
def _chart_resolver() -> Any:
    root = Resource.from_contents(chart_schema(), default_specification=DRAFT202012)
    return registry().with_resource("urn:chart", root).resolver(base_uri="urn:chart")


def _resolved(node: Node | None) -> list[Node]:
    """The schemas that ``node`` stands for, through $ref and anyOf/oneOf/allOf."""
    found: list[Node] = []
    pending = [node] if node else []
    while pending:
        schema, resolver = pending.pop()
        found.append((schema, resolver))
        if "$ref" in schema:
            target = resolver.lookup(schema["$ref"])
            pending.append((target.contents, target.resolver))
        for key in ("anyOf", "oneOf", "allOf"):
            pending.extend((branch, resolver) for branch in schema.get(key, []))
    return found


def _properties(node: Node | None) -> dict[str, Node] | None:
    """The declared properties, or None when the value is free-form."""
    props = {
        key: (sub, resolver)
        for schema, resolver in _resolved(node)
        for key, sub in schema.get("properties", {}).items()
    }
    return props or None


def _items(node: Node | None) -> Node | None:
    for schema, resolver in _resolved(node):
        if isinstance(schema.get("items"), dict):
            return schema["items"], resolver
    return None


def unknown_keys(values: dict[str, Any]) -> list[str]:
    """Key paths of ``values`` that the chart neither declares nor documents."""
    return list(_walk(values, "", (chart_schema(), _chart_resolver())))


def _walk(value: Any, path: str, node: Node | None) -> Iterator[str]:
    if isinstance(value, list):
        for item in value:
            yield from _walk(item, f"{path}[]", _items(node))
        return
    if not isinstance(value, dict):
        return
    props = _properties(node)
    # The schema leaves some objects open (dagsterDaemon.runMonitoring, say) that the chart's
    # values.yaml documents key by key: there, the documented keys are the only ones.
    documented_below = bool(path) and _has_children(path)
    for key, sub in value.items():
        here = f"{path}.{key}" if path else str(key)
        declared = props.get(key) if props else None
        if declared is None and here not in documented():
            if props is not None or node is None or documented_below:
                yield here
            continue  # a free-form map's own keys
        if declared is None and not _has_children(here):
            continue  # documented with no keys of its own: free-form below
        yield from _walk(sub, here, declared)
