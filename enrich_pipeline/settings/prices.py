"""The ``ENRICH_PRICES`` price table: parsed here, where the settings validate it when a command
starts (before any call is made); ``providers/pricing.py`` merges it over the list prices."""

from __future__ import annotations

import json
import math

PRICES_FORMAT = (
    'JSON like {"qwen3-vl-plus": [0.2, 1.6], "currency": "USD"} (per million input and '
    "output tokens; currency optional)"
)


def parse_prices(raw: str) -> tuple[dict[str, tuple[float, float]], str | None]:
    """``ENRICH_PRICES``: ``{model: [input, output] per million tokens}`` and an optional
    ``"currency"``. Raises ValueError with a one-line reason."""
    try:
        given = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"must be {PRICES_FORMAT}: {exc}") from None
    if not isinstance(given, dict):
        raise ValueError(f"must be a JSON object: {PRICES_FORMAT}")
    currency = given.pop("currency", None)
    if currency is not None and (not isinstance(currency, str) or not currency.strip()):
        raise ValueError(f'currency must be a name such as "USD", not {currency!r}')
    prices: dict[str, tuple[float, float]] = {}
    for model, pair in given.items():
        if not (
            isinstance(pair, list)
            and len(pair) == 2
            and all(
                isinstance(v, int | float)
                and not isinstance(v, bool)
                and math.isfinite(v)
                and v >= 0
                for v in pair
            )
        ):
            raise ValueError(
                f"{model!r} must be two numbers [input, output] (non-negative, per million "
                f"tokens), not {pair!r}"
            )
        prices[str(model)] = (float(pair[0]), float(pair[1]))
    return prices, currency.strip().upper() if currency else None
