"""The classification table: what each provider failure means for the row and for the run.

Every SDK exception of an online or a Batch API call is mapped here, and only here, to one of
the pipeline's error classes: permanent for the row (recorded, never retried), transient
(retried with backoff), or fatal for the run (stop, release the claims, record no row).
"""

from __future__ import annotations

import openai

from enrich_pipeline.providers.base import FatalProviderError, ProviderError


def error_code(exc: openai.APIStatusError) -> str:
    """``error.code`` of a compatible-mode error body, lower-cased ('' when absent)."""
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error", body) if isinstance(body, dict) else {}
    code = error.get("code") if isinstance(error, dict) else None
    return str(code or getattr(exc, "code", None) or "").lower()


def classify(exc: BaseException) -> ProviderError:
    """Map an SDK exception to the pipeline's error classes (the retry policy in one table)."""
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
        return FatalProviderError(
            "invalid_api_key",
            f"DashScope rejected the API key (HTTP {exc.status_code}): check DASHSCOPE_API_KEY",
        )
    if isinstance(exc, openai.NotFoundError):
        return FatalProviderError("not_found", f"DashScope answered 404: {exc.message}")
    if isinstance(exc, openai.BadRequestError):
        code = error_code(exc)
        if "inspection" in code:
            return ProviderError(
                "moderation", f"rejected by content moderation: {exc.message}", permanent=True
            )
        if "invalid_parameter" in code or "invalidparameter" in code:
            return ProviderError(
                "bad_image", f"the model could not use the image: {exc.message}", permanent=True
            )
        return ProviderError(
            "bad_request", f"DashScope answered 400: {exc.message}", permanent=True
        )
    if isinstance(exc, openai.RateLimitError):
        return ProviderError("rate_limited", "DashScope rate limit (429)", permanent=False)
    if isinstance(exc, openai.APITimeoutError):
        return ProviderError("timeout", "DashScope call timed out", permanent=False)
    if isinstance(exc, openai.APIConnectionError):
        return ProviderError(
            "connection", f"connection to DashScope failed: {exc}", permanent=False
        )
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        return ProviderError(
            "server_error" if status >= 500 else f"http_{status}",
            f"DashScope answered HTTP {status}",
            permanent=status < 500 and status not in (408, 409),
        )
    if isinstance(exc, openai.APIResponseValidationError | ValueError):
        # A 200 whose body is not the JSON promised: a proxy or overloaded gateway, try again.
        return ProviderError(
            "malformed_response", f"unreadable DashScope answer: {exc}", permanent=False
        )
    return ProviderError("unexpected", f"{type(exc).__name__}: {exc}", permanent=False)
