"""Estimated spend from token usage and a configurable price table.

The defaults are illustrative list prices in USD per million tokens, not a quote: set
``ENRICH_PRICES`` (JSON, ``{"model": [input_per_million, output_per_million]}``) from your own
Model Studio price list or contract; it is merged over the defaults. Batch mode bills half.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from enrich_pipeline.settings import ConfigError

DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "qwen3-vl-plus": (0.20, 1.60),
    "qwen3-vl-flash": (0.05, 0.40),
    "qwen-vl-max": (0.80, 3.20),
    "qwen-vl-plus": (0.21, 0.63),
    "text-embedding-v4": (0.07, 0.0),
    "text-embedding-v3": (0.07, 0.0),
    "offline-synthetic": (0.0, 0.0),
}


def load_prices(env: Mapping[str, str] | None = None) -> dict[str, tuple[float, float]]:
    env = os.environ if env is None else env
    prices = dict(DEFAULT_PRICES)
    raw = env.get("ENRICH_PRICES")
    if raw:
        try:
            given = json.loads(raw)
            prices.update({str(m): (float(p[0]), float(p[1])) for m, p in given.items()})
        except (ValueError, TypeError, IndexError, AttributeError) as exc:
            raise ConfigError(
                'ENRICH_PRICES must be JSON like {"qwen3-vl-plus": [0.2, 1.6]}: ' + str(exc)
            ) from None
    return prices


def estimate_cost(
    usage: Mapping[str, int],
    *,
    vision_model: str,
    embedding_model: str,
    prices: Mapping[str, tuple[float, float]],
    batch: bool = False,
) -> float | None:
    """Spend in the price table's currency, or None when a model has no price."""
    if vision_model not in prices or embedding_model not in prices:
        return None
    vin, vout = prices[vision_model]
    ein, _ = prices[embedding_model]
    cost = (
        usage.get("prompt_tokens", 0) * vin
        + usage.get("completion_tokens", 0) * vout
        + usage.get("embedding_tokens", 0) * ein
    ) / 1_000_000
    return cost / 2 if batch else cost
