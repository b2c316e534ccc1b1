"""The retry loop's waits: exponential backoff with full jitter (a draw from zero to a ceiling
that doubles per try, capped), and a server's Retry-After waited in full instead. The random
source and the sleep are injected: the waits are checked exactly, and nothing sleeps."""

from __future__ import annotations

import random

import openai
import pytest

from enrich_pipeline.providers.base import Backoff, ProviderError, with_retries
from enrich_pipeline.providers.errors import CallContext, classify
from enrich_pipeline.settings import DashScopeSettings

try:  # the HTTP client the SDK is built on (httpx2 from openai 3 on)
    import httpx2 as http
except ImportError:  # pragma: no cover - older SDKs
    import httpx as http  # type: ignore[no-redef]

URL = "https://dashscope.aliyuncs.com/compatible-mode/v1/chat/completions"
VISION = CallContext.of(DashScopeSettings(api_key="sk-unit"), "vision")


def refused(retry_after: str | None = None) -> ProviderError:
    """A 429 as the provider raises it: classified, caused by the SDK's own exception."""
    headers = {"retry-after": retry_after} if retry_after is not None else {}
    response = http.Response(429, headers=headers, request=http.Request("POST", URL))
    sdk = openai.RateLimitError("Error code: 429", response=response, body=None)
    error = classify(sdk, VISION)
    error.__cause__ = sdk
    return error


def waits(backoff: Backoff, failures: list[ProviderError]) -> list[float]:
    """The sleeps of one call that fails with ``failures`` in turn, then succeeds."""
    slept: list[float] = []
    pending = list(failures)

    def attempt() -> str:
        if pending:
            raise pending.pop(0)
        return "ok"

    result = with_retries(attempt, retries=len(failures), backoff=backoff, sleep=slept.append)
    assert result == "ok"
    return slept


def test_each_wait_is_drawn_from_zero_to_a_doubling_capped_ceiling() -> None:
    draws: list[tuple[float, float]] = []

    def uniform(low: float, high: float) -> float:
        draws.append((low, high))
        return high * 0.25

    slept = waits(Backoff(0.5, 4.0, uniform=uniform), [refused() for _ in range(6)])

    assert draws == [(0.0, c) for c in (0.5, 1.0, 2.0, 4.0, 4.0, 4.0)]
    assert slept == [c * 0.25 for c in (0.5, 1.0, 2.0, 4.0, 4.0, 4.0)]


def test_full_jitter_spreads_waits_over_the_whole_ceiling_not_its_upper_half() -> None:
    backoff = Backoff(1.0, 8.0, uniform=random.Random(16).uniform)
    slept = [w for _ in range(50) for w in waits(backoff, [refused() for _ in range(4)])]
    ceilings = [1.0, 2.0, 4.0, 8.0] * 50
    assert all(0.0 <= w <= c for w, c in zip(slept, ceilings, strict=True))
    # Equal jitter never waits under half the ceiling; full jitter does, about half the time.
    low = sum(w < c / 2 for w, c in zip(slept, ceilings, strict=True))
    assert 60 <= low <= 140, low


def test_a_retry_after_is_waited_in_full_not_jittered_and_capped_at_the_maximum() -> None:
    def uniform(low: float, high: float) -> float:
        raise AssertionError("a server's Retry-After is not jittered")

    backoff = Backoff(0.01, 30.0, uniform=uniform)
    assert waits(backoff, [refused("2.5"), refused("0.3")]) == [2.5, 0.3]
    assert waits(Backoff(0.01, 5.0, uniform=uniform), [refused("120")]) == [5.0]


def test_a_call_without_retry_after_after_one_with_it_is_jittered_again() -> None:
    backoff = Backoff(0.2, 30.0, uniform=lambda low, high: high)
    assert waits(backoff, [refused("1.5"), refused()]) == [1.5, pytest.approx(0.4)]
