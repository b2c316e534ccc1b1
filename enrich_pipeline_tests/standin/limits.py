"""The stand-in's rate limits: requests and tokens per model, per minute and per second.

Rate limits (https://www.alibabacloud.com/help/en/model-studio/rate-limit,
https://docs.qwencloud.com/developer-guides/administration/rate-limits):

- Limits are per account and per model: one budget shared by every key and workspace, so one
  server is one account, and each model has its own windows. ``rpm_limit``/``tpm_limit`` take one
  number for every model or a ``{model: limit}`` mapping (``"*"`` for the rest).
- ``per_second=True`` also enforces "RPS = RPM / 60, TPS = TPM / 60" in any one-second window:
  "Burst requests within a single second can trigger throttling even if total usage stays below
  the per-minute limit."
- TPM counts input plus output tokens ("每分钟消耗Token数(TPM) 含输入与输出Token",
  https://help.aliyun.com/document_detail/2712574.html).
- Refusals: 429 ``limit_requests`` "Requests rate limit exceeded, please try again later." for
  requests (native ``Throttling.RateQuota``), 429 ``insufficient_quota`` "Allocated quota
  exceeded, please increase your quota limit." for tokens (native ``Throttling.AllocationQuota``;
  https://help.aliyun.com/en/model-studio/error-code-start lists "Throttling.RateQuota,
  Throttling.AllocationQuota/insufficient_quota"). Logged with fault ``rpm_limit``,
  ``rps_limit``, ``tpm_limit`` or ``tps_limit``. No ``Retry-After``: none is documented.
- Batch lines are not rate-limited: "批量请求不受实时限流约束"
  (https://help.aliyun.com/document_detail/2399482.html).

The minute and the second are sliding windows. The docs give RPS = RPM / 60 and TPS = TPM / 60
but not how fractions round; the per-second budget is rounded down (the stricter choice) but
never below 1, or a limit under 60 RPM would refuse everything.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

# Per-model limit: one number for every model, or a mapping with "*" as the default.
Limit = int | Mapping[str, int] | None

# Rate-limit refusals (logged fault) -> the body they are answered with (errors.ERRORS).
LIMIT_REPLIES = {
    "rpm_limit": "429",
    "rps_limit": "429",
    "tpm_limit": "tpm_throttle",
    "tps_limit": "tpm_throttle",
}


def limit_for(limit: Limit, model: str) -> int | None:
    if limit is None or isinstance(limit, int):
        return limit
    return limit.get(model, limit.get("*"))


def admit_request(
    window: deque[float], now: float, rpm: int | None, per_second: bool
) -> str | None:
    """Count one request arriving at `now` in `window` (a model's arrival times), or refuse it
    ("rpm_limit", "rps_limit"); a refused request is not counted."""
    while window and now - window[0] >= 60.0:
        window.popleft()
    if rpm is not None:
        if len(window) >= rpm:
            return "rpm_limit"
        last_second = sum(1 for t in window if now - t < 1.0)
        if per_second and last_second >= max(1, rpm // 60):
            return "rps_limit"
    window.append(now)
    return None


def admit_tokens(
    charges: deque[list[float]], now: float, tokens: int, tpm: int | None, per_second: bool
) -> tuple[str | None, list[float] | None]:
    """Charge `tokens` at `now` to `charges` (a model's ``[time, tokens]``), or refuse them
    ("tpm_limit", "tps_limit"). Returns the refusal or None, and the charge, which the caller
    corrects once the answer's usage is known. Refused tokens are not charged."""
    while charges and now - charges[0][0] >= 60.0:
        charges.popleft()
    if tpm is not None:
        if sum(c[1] for c in charges) + tokens > tpm:
            return "tpm_limit", None
        last_second = sum(c[1] for c in charges if now - c[0] < 1.0)
        if per_second and last_second + tokens > max(1, tpm // 60):
            return "tps_limit", None
    charge = [now, float(tokens)]
    charges.append(charge)
    return None, charge
