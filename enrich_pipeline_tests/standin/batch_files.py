"""The files of a batch: the multipart upload, the checks DashScope makes on the input JSONL while
a batch is "validating", and the lines of the error file."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from enrich_pipeline_tests.standin.errors import Reply


def public(obj: dict[str, Any]) -> dict[str, Any]:
    """A stored file or batch as the API shows it (without the stand-in's own fields)."""
    return {k: v for k, v in obj.items() if not k.startswith("_")}


def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """``multipart/form-data`` fields as ``name -> (filename, bytes)``, byte-exact."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not content_type.startswith("multipart/form-data") or match is None:
        raise Reply(400, "Expected a multipart/form-data upload.")
    fields: dict[str, tuple[str | None, bytes]] = {}
    for chunk in body.split(b"--" + match.group(1).encode())[1:]:
        if chunk.startswith(b"--"):
            break
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            continue
        headers = head.decode("latin-1")
        name = re.search(r'[;\s]name="([^"]*)"', headers)
        filename = re.search(r'filename="([^"]*)"', headers)
        if name is not None:
            fields[name.group(1)] = (
                filename.group(1) if filename else None,
                data[:-2] if data.endswith(b"\r\n") else data,
            )
    return fields


def first_model(lines: list[str]) -> str | None:
    for raw in lines:
        try:
            body = json.loads(raw).get("body")
        except (ValueError, AttributeError):
            continue
        if isinstance(body, dict) and isinstance(body.get("model"), str):
            return body["model"]
    return None


def validate_lines(lines: list[str], endpoint: str) -> list[dict[str, Any]]:
    """What DashScope checks while a batch is "validating"; any problem fails the batch."""
    problems: list[dict[str, Any]] = []
    seen: set[str] = set()
    model = first_model(lines)
    for n, raw in enumerate(lines, start=1):
        try:
            line = json.loads(raw)
        except ValueError:
            line = None
        body = line.get("body") if isinstance(line, dict) else None
        custom_id = line.get("custom_id") if isinstance(line, dict) else None
        if not isinstance(body, dict) or not isinstance(custom_id, str):
            problems.append(
                {"code": "invalid_json_line", "message": "Not a batch request line.", "line": n}
            )
        elif custom_id in seen:
            problems.append(
                {
                    "code": "duplicate_custom_id",
                    "message": f"The custom_id '{custom_id}' for this request is a duplicate "
                    "of another request.",
                    "line": n,
                }
            )
        elif line.get("url") != endpoint or line.get("method", "POST") != "POST":
            problems.append(
                {"code": "invalid_url", "message": f"The url must be {endpoint}.", "line": n}
            )
        elif body.get("model") != model:
            problems.append(
                {
                    "code": "mismatched_model",
                    "message": f"The model '{body.get('model')}' for this request does not "
                    "match the rest of the batch.",
                    "line": n,
                }
            )
        else:
            seen.add(custom_id)
            continue
        if len(problems) >= 10:
            break
        seen.add(str(custom_id))
    return problems


def batch_error_line(
    custom_id: Any,
    reply: Reply | None,
    code: str,
    message: str,
    *,
    request_id: str | None = None,
) -> dict[str, Any]:
    """A line of the error file: the failed response with DashScope's error body, and the
    error itself (expired lines have no response)."""
    response = None
    if reply is not None:
        error = {"message": message, "type": reply.type, "param": None, "code": code}
        response = {
            "status_code": reply.status,
            "request_id": request_id,
            "body": {"error": error, "request_id": request_id},
        }
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": response,
        "error": {"code": code, "message": message},
    }
