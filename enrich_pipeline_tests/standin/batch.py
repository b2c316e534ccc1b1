"""The Batch API (``/v1/files``, ``/v1/batches``), as DashScope serves it in compatible mode.

A batch "runs" in the background, each JSONL line going through the same chat/embeddings logic
(captions, rules, faults aimed at ``endpoint="batch"``), failed lines landing in the error file
with DashScope's error body. The pace and the end are controllable: ``batch_delay`` seconds
before a batch ends, ``batch_force`` (``"expired"`` after ``batch_expire_after`` lines, or
``"failed"``) for batches created next, ``batch_max_lines`` (50,000) checked on create,
``batch_unsupported_models`` refused with 400, and ``batch_enabled = False`` for a server
without the API (404).

``BatchAPI`` is the part of ``StandIn`` that answers these requests; the knobs are
``StandIn``'s attributes (see ``server``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from enrich_pipeline_tests.standin.batch_files import (
    batch_error_line,
    first_model,
    parse_multipart,
    public,
    validate_lines,
)
from enrich_pipeline_tests.standin.errors import ERRORS, Reply, error_body
from enrich_pipeline_tests.standin.faults import echoed, hostile_usage
from enrich_pipeline_tests.standin.online import OnlineAPI, log_entry

BATCH_MAX_LINES = 50_000  # DashScope: requests in one batch file
BATCH_MAX_BYTES = 500 * 1024 * 1024  # DashScope: size of one batch file
# /v1/chat/ds-test: the endpoint of DashScope's free test model, batch-test-model
# (https://help.aliyun.com/document_detail/2975721.html); served here as chat.
BATCH_ENDPOINTS = {
    "/v1/chat/completions": "chat",
    "/v1/embeddings": "embeddings",
    "/v1/chat/ds-test": "chat",
}
BATCH_FORCED = (None, "expired", "failed")


class BatchAPI(OnlineAPI):
    """Files and batches; a batch's lines are answered by the online logic (``OnlineAPI``)."""

    # Set by StandIn.__init__; the knobs are documented in this module's docstring.
    batch_enabled: bool
    batch_delay: float
    batch_force: str | None
    batch_expire_after: int
    batch_max_lines: int
    batch_max_bytes: int
    batch_unsupported_models: set[str]
    files: dict[str, dict[str, Any]]
    batches: dict[str, dict[str, Any]]
    _batch_tasks: set[asyncio.Task[None]]
    _ids: itertools.count[int]

    # -- files ---------------------------------------------------------------------------------

    async def _batch_api(self, request: Request, name: str, handler: Callable[[], Any]) -> Response:
        """Auth, logging and DashScope's error body around a files/batches handler."""
        request_id = str(uuid.uuid4())
        entry = log_entry(name)
        headers = {"x-request-id": request_id}
        try:
            if request.headers.get("authorization") != f"Bearer {self.api_key}":
                raise Reply("unauthorized")
            if not self.batch_enabled:
                raise Reply(404, f"{request.url.path} is not served here.", code="not_found")
            result = await handler()
            if isinstance(result, Response):
                return result
            return JSONResponse(result, headers=headers)
        except Reply as reply:
            entry["status"] = reply.status
            if self.echo_key:
                auth = request.headers.get("authorization")
                reply.message = echoed(reply.message, auth, str(request.url))
            return JSONResponse(error_body(reply, request_id), reply.status, headers)
        finally:
            self._log(entry)

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}{uuid.uuid4().hex[:12]}"

    def _store_file(self, filename: str, purpose: str, content: bytes) -> dict[str, Any]:
        kind = "batch_output" if purpose == "batch_output" else "batch"
        obj = {
            "id": self._new_id(f"file-{kind}"),
            "object": "file",
            "bytes": len(content),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "_content": content,
        }
        with self._lock:
            self.files[obj["id"]] = obj
        return obj

    def _file(self, file_id: str) -> dict[str, Any]:
        with self._lock:
            obj = self.files.get(file_id)
        if obj is None:
            raise Reply(404, f"File {file_id!r} not found.", code="not_found")
        return obj

    async def _files_create(self, request: Request) -> Response:
        async def handle() -> dict[str, Any]:
            fields = parse_multipart(request.headers.get("content-type", ""), await request.body())
            purpose = (fields.get("purpose", (None, b""))[1] or b"").decode(errors="replace")
            if "file" not in fields:
                raise Reply(400, "Missing required parameter: 'file'.")
            if purpose != "batch":
                raise Reply(400, f"purpose must be 'batch', not {purpose!r}.")
            filename, content = fields["file"]
            if len(content) > self.batch_max_bytes:
                raise Reply(
                    400, f"The file is {len(content)} bytes; at most {self.batch_max_bytes}."
                )
            return public(self._store_file(filename or "upload.jsonl", purpose, content))

        return await self._batch_api(request, "files", handle)

    async def _files_get(self, request: Request) -> Response:
        async def handle() -> dict[str, Any]:
            return public(self._file(request.path_params["file_id"]))

        return await self._batch_api(request, "files", handle)

    async def _files_content(self, request: Request) -> Response:
        async def handle() -> Response:
            obj = self._file(request.path_params["file_id"])
            return Response(obj["_content"], 200, media_type="application/octet-stream")

        return await self._batch_api(request, "files", handle)

    # -- batches -------------------------------------------------------------------------------

    def _batch(self, batch_id: str) -> dict[str, Any]:
        with self._lock:
            batch = self.batches.get(batch_id)
        if batch is None:
            raise Reply(404, f"Batch {batch_id!r} not found.", code="not_found")
        return batch

    async def _batches_create(self, request: Request) -> Response:
        async def handle() -> dict[str, Any]:
            try:
                body = json.loads(await request.body())
            except ValueError:
                body = None
            if not isinstance(body, dict):
                raise Reply(400, "The request body is not valid JSON.")
            endpoint = body.get("endpoint")
            if endpoint not in BATCH_ENDPOINTS:
                raise Reply(400, f"endpoint must be one of {sorted(BATCH_ENDPOINTS)}.")
            if body.get("completion_window") != "24h":
                raise Reply(400, "completion_window must be '24h'.")
            source = self._file(str(body.get("input_file_id")))
            if source["purpose"] != "batch":
                raise Reply(400, "The input file's purpose must be 'batch'.")
            text = source["_content"].decode(errors="replace")
            lines = [ln for ln in text.splitlines() if ln.strip()]
            if not lines:
                raise Reply(400, "The input file is empty.")
            if len(lines) > self.batch_max_lines:
                raise Reply(
                    400,
                    f"The input file has {len(lines)} requests; a batch takes at most "
                    f"{self.batch_max_lines}.",
                )
            model = first_model(lines)
            if model in self.batch_unsupported_models:
                raise Reply(
                    400,
                    f"The provided model '{model}' is not supported by the Batch API.",
                    code="model_not_found",
                )
            now = int(time.time())
            batch: dict[str, Any] = {
                "id": self._new_id("batch"),
                "object": "batch",
                "endpoint": endpoint,
                "model": model,
                "errors": None,
                "input_file_id": source["id"],
                "completion_window": "24h",
                "status": "validating",
                "output_file_id": None,
                "error_file_id": None,
                "created_at": now,
                "in_progress_at": None,
                "expires_at": now + 24 * 3600,
                "finalizing_at": None,
                "completed_at": None,
                "failed_at": None,
                "expired_at": None,
                "cancelling_at": None,
                "cancelled_at": None,
                "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
                "metadata": body.get("metadata") or None,
                "_lines": lines,
                "_force": self.batch_force,
                "_delay": self.batch_delay,
                "_expire_after": self.batch_expire_after,
                # What an echoing provider repeats in the error lines of this batch.
                "_authorization": request.headers.get("authorization"),
            }
            with self._lock:
                self.batches[batch["id"]] = batch
            task = asyncio.get_running_loop().create_task(self._run_batch(batch))
            self._batch_tasks.add(task)
            task.add_done_callback(self._batch_tasks.discard)
            return public(batch)

        return await self._batch_api(request, "batches", handle)

    async def _batches_get(self, request: Request) -> Response:
        async def handle() -> dict[str, Any]:
            return public(self._batch(request.path_params["batch_id"]))

        return await self._batch_api(request, "batches", handle)

    async def _batches_list(self, request: Request) -> Response:
        async def handle() -> dict[str, Any]:
            with self._lock:
                newest_first = list(reversed(self.batches.values()))
            after = request.query_params.get("after")
            if after:
                ids = [b["id"] for b in newest_first]
                newest_first = newest_first[ids.index(after) + 1 :] if after in ids else []
            try:
                limit = max(1, min(100, int(request.query_params.get("limit", 20))))
            except ValueError:
                raise Reply(400, "limit must be an integer.") from None
            page = newest_first[:limit]
            return {
                "object": "list",
                "data": [public(b) for b in page],
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": len(newest_first) > limit,
            }

        return await self._batch_api(request, "batches", handle)

    async def _batches_cancel(self, request: Request) -> Response:
        async def handle() -> dict[str, Any]:
            batch = self._batch(request.path_params["batch_id"])
            if batch["status"] not in ("validating", "in_progress", "finalizing"):
                raise Reply(400, f"A batch that is {batch['status']} cannot be cancelled.")
            batch["status"], batch["cancelling_at"] = "cancelling", int(time.time())
            return public(batch)

        return await self._batch_api(request, "batches", handle)

    async def _run_batch(self, batch: dict[str, Any]) -> None:
        """Validate, answer every line, wait out the pace, then end as forced or completed."""
        started = time.monotonic()
        await asyncio.sleep(0)  # the create response goes out while "validating"
        counts = batch["request_counts"]
        problems = validate_lines(batch["_lines"], batch["endpoint"])
        if batch["_force"] == "failed" or problems:
            batch["errors"] = {
                "object": "list",
                "data": problems
                or [{"code": "batch_failed", "message": "The batch failed.", "line": None}],
            }
            batch["status"], batch["failed_at"] = "failed", int(time.time())
            return
        if batch["status"] == "validating":
            batch["status"], batch["in_progress_at"] = "in_progress", int(time.time())
        kind = BATCH_ENDPOINTS[batch["endpoint"]]
        output: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for n, raw in enumerate(batch["_lines"]):
            if batch["status"] == "cancelling" or self._stopped():
                break
            line = json.loads(raw)
            if batch["_force"] == "expired" and n >= batch["_expire_after"]:
                errors.append(
                    batch_error_line(
                        line.get("custom_id"),
                        None,
                        "batch_expired",
                        "This request could not be executed before the completion window expired.",
                    )
                )
                counts["failed"] += 1
                continue
            ok, record = await asyncio.to_thread(
                self._batch_line, line, kind, batch["_authorization"]
            )
            (output if ok else errors).append(record)
            counts["completed" if ok else "failed"] += 1
        while (
            time.monotonic() - started < batch["_delay"]
            and batch["status"] != "cancelling"
            and not self._stopped()
        ):
            await asyncio.sleep(min(0.02, batch["_delay"]))
        cancelled = batch["status"] == "cancelling"
        if not cancelled:
            batch["status"], batch["finalizing_at"] = "finalizing", int(time.time())
        for records, field in ((output, "output_file_id"), (errors, "error_file_id")):
            if records:
                content = "".join(json.dumps(r) + "\n" for r in records).encode()
                name = f"{batch['id']}_{field.split('_')[0]}.jsonl"
                batch[field] = self._store_file(name, "batch_output", content)["id"]
        now = int(time.time())
        if cancelled:
            batch["status"], batch["cancelled_at"] = "cancelled", now
        elif batch["_force"] == "expired":
            batch["status"], batch["expired_at"] = "expired", now
        else:
            batch["status"], batch["completed_at"] = "completed", now

    def _batch_line(
        self, line: dict[str, Any], kind: str, authorization: str | None = None
    ) -> tuple[bool, dict[str, Any]]:
        """One request of a batch through the online logic: (answered, output/error line)."""
        request_id = str(uuid.uuid4())
        entry = log_entry(f"batch_{kind}")
        custom_id = line.get("custom_id")
        try:
            body = line.get("body")
            if not isinstance(body, dict):
                raise Reply(400, "The request body must be an object.")
            if isinstance(body.get("model"), str):
                entry["model"] = body["model"]
            means, texts, respond = self._parse(kind, body, entry)
            injected = self._faults.take("batch", kind)
            fault = injected.fault if injected else self._faults.match(means, texts, kind)
            entry["fault"] = fault
            if fault in ERRORS:
                raise Reply(fault, fault=fault, model=entry["model"])
            if fault in ("timeout", "reset"):  # no connection to drop in a batch: a 500 line
                raise Reply("500", fault=fault)
            # A "trickle" has no connection to slow down either: the line is answered as is.
            # Hostile captions and vectors go into the output file; json.dumps keeps NaN and
            # lone surrogates there as Python writes them.
            answer = (
                {"id": "chatcmpl-", "object": "chat.completion"}
                if fault == "malformed"
                else hostile_usage(fault, respond(fault))
            )
            return True, {
                "id": f"batch_req_{uuid.uuid4().hex}",
                "custom_id": custom_id,
                "response": {"status_code": 200, "request_id": request_id, "body": answer},
                "error": None,
            }
        except Reply as reply:
            entry["status"], entry["fault"] = reply.status, reply.fault
            if self.echo_key:
                reply.message = echoed(reply.message, authorization)
            return False, batch_error_line(
                custom_id, reply, reply.code, reply.message, request_id=request_id
            )
        finally:
            self._log(entry)
