"""Estimated spend from token usage, at the list prices of the region the base URL points at.

Prices are per million tokens, ``(input, output)``, in the region's currency. They are list
prices as found, with their source and date, not a quote: set ``ENRICH_PRICES`` from your own
price list or contract (``{"model": [input, output], "currency": "USD"}``; validated when a
command starts). It is merged over the region's table; a ``currency`` other than the region's
replaces the table instead. An unknown host (a local server, a proxy) has no list prices, so
there is no estimate unless ``ENRICH_PRICES`` gives one. Batch calls bill half ("at 50% of the
cost of real-time calls", https://www.alibabacloud.com/help/en/model-studio/batch-interfaces-
compatible-with-openai, Jan 2026). Thinking tokens are output tokens: DashScope bills them "at
output price" (https://docs.qwencloud.com/developer-guides/text-generation/batch) and counts
them in ``completion_tokens``, so a model left thinking costs its thinking at the output price
(``benchmarks/cost.py`` measures how much).

Where the figures come from (see also the README, "Caption cache, re-captioning, cost"):

- Beijing, CNY. Vision models: a third-party scrape of the Bailian console
  (http://47.109.151.80:15030/Maas2-group/Maas-Model-platform, ``parsed_json/<model>.json``,
  2026, "元/千tokens"; qwen3-vl-plus at its <=32K-input tier, where captions are). No official
  page with these figures could be read. qwen3.5-plus: a third-party write-up of the Bailian
  prices (github.com/gntrq862/qwen3-pricing-analysis, 2026: 0.8 元 per million input tokens up
  to 128K, 4.8 元 output, thinking or not). No Beijing figure was found for qwen3.5-flash (only
  "from 0.2 元" input) or the Qwen3.6 models. Embeddings: the official zh page
  https://help.aliyun.com/zh/model-studio/text-embedding-synchronous-api (Beijing table, as
  transcribed in a public repository on 2026-09-09: 0.0005 元 per 1,000 tokens).
- Singapore, USD. Embeddings: official, https://www.alibabacloud.com/help/en/model-studio/
  developer-reference/text-embedding-synchronous-api ("$0.07"). Vision models: third-party
  figures only (OpenRouter for qwen-vl-max, $0.80/$3.20; API Evangelist's "Qwen3-VL-Plus input
  $0.2/M up to 32K"; memories.ai's reseller prices, about 5 % above $0.20/$1.60 and
  $0.21/$0.63, and $0.052/$0.42 for qwen3-vl-flash, taken as $0.05/$0.40). Qwen3.5: Vercel AI
  Gateway's Alibaba listing, $0.40/$2.40 (qwen3.5-plus) and $0.10/$0.40 (qwen3.5-flash), whose
  input prices match API Evangelist's reading of the official models page ("Qwen3.5-Plus input
  $0.4/M up to 256K. Qwen3.5-Flash input $0.1/M up to 128K"). qwen3.6-plus: one reseller's list
  only (docs.laozhang.ai, $0.30/$1.80). qwen3.6-flash: no believable figure (that list shows a
  $75/$75 placeholder), so no estimate unless ``ENRICH_PRICES`` gives one.
- US (Virginia): no list price found; no default estimate.
- Image vectors (multimodal embedding models, ``ENRICH_IMAGE_EMBEDDING_MODEL``): their pair is
  ``(image input, text input)`` per million tokens, not ``(input, output)`` (an embedding has no
  output tokens; images and texts are priced apart). Singapore, USD: the official
  https://www.alibabacloud.com/help/en/model-studio/multimodal-embedding-api-reference (updated
  Feb 05 2026): tongyi-embedding-vision-plus $0.09 / $0.09, -flash $0.03 / $0.09. Beijing, CNY:
  the official https://help.aliyun.com/zh/model-studio/multimodal-embedding-api-reference, per
  1,000 tokens: qwen3-vl-embedding 0.0018 / 0.0007, tongyi-embedding-vision-plus 0.0005,
  -flash 0.00015, multimodal-embedding-v1 0.0009 / 0.0007 (an older copy calls v1 a free trial).
  Tokens per image are not documented (billing is per token only), so a price per 1,000 images
  is what a run measures (``image_embedding_tokens``), not a list figure.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from enrich_pipeline.providers.regions import BEIJING, SINGAPORE, US, region_of
from enrich_pipeline.settings import BEIJING_BASE_URL, ConfigError, parse_prices

Prices = dict[str, tuple[float, float]]


@dataclass(frozen=True)
class ListPrices:
    currency: str
    prices: Prices
    sources: dict[str, str]


_CONSOLE_SCRAPE = "third-party scrape of the Bailian console, 2026"
_QWEN35_BEIJING = "third-party write-up of the Bailian prices (gntrq862), 2026"
_VERCEL = (
    "third-party only (Vercel AI Gateway; input as API Evangelist reads the models page), 2026"
)
_ZH_EMBEDDING_PAGE = "help.aliyun.com text-embedding-synchronous-api (zh), as of 2026-09-09"
_INTL_EMBEDDING_PAGE = "alibabacloud.com text-embedding-synchronous-api (official)"
_ZH_MULTIMODAL_PAGE = "help.aliyun.com multimodal-embedding-api-reference (zh, official)"
_INTL_MULTIMODAL_PAGE = (
    "alibabacloud.com multimodal-embedding-api-reference (official, updated Feb 05 2026)"
)

LIST_PRICES: dict[str, ListPrices] = {
    BEIJING: ListPrices(
        "CNY",
        {
            "qwen3-vl-plus": (1.0, 10.0),
            "qwen3-vl-flash": (0.15, 1.5),
            "qwen-vl-max": (1.6, 4.0),
            "qwen-vl-plus": (0.8, 2.0),
            "qwen3.5-plus": (0.8, 4.8),
            "text-embedding-v4": (0.5, 0.0),
            "text-embedding-v3": (0.5, 0.0),
            # Multimodal embedding models: (image, text) per million tokens.
            "qwen3-vl-embedding": (1.8, 0.7),
            "tongyi-embedding-vision-plus": (0.5, 0.5),
            "tongyi-embedding-vision-flash": (0.15, 0.15),
            "multimodal-embedding-v1": (0.9, 0.7),
        },
        {
            "qwen3-vl-plus": _CONSOLE_SCRAPE,
            "qwen3-vl-flash": _CONSOLE_SCRAPE,
            "qwen-vl-max": _CONSOLE_SCRAPE,
            "qwen-vl-plus": _CONSOLE_SCRAPE,
            "qwen3.5-plus": _QWEN35_BEIJING,
            "text-embedding-v4": _ZH_EMBEDDING_PAGE,
            "text-embedding-v3": _ZH_EMBEDDING_PAGE,
            "qwen3-vl-embedding": _ZH_MULTIMODAL_PAGE,
            "tongyi-embedding-vision-plus": _ZH_MULTIMODAL_PAGE,
            "tongyi-embedding-vision-flash": _ZH_MULTIMODAL_PAGE,
            "multimodal-embedding-v1": _ZH_MULTIMODAL_PAGE,
        },
    ),
    SINGAPORE: ListPrices(
        "USD",
        {
            "qwen3-vl-plus": (0.20, 1.60),
            "qwen3-vl-flash": (0.05, 0.40),
            "qwen3.5-plus": (0.40, 2.40),
            "qwen3.5-flash": (0.10, 0.40),
            "qwen3.6-plus": (0.30, 1.80),
            "qwen-vl-max": (0.80, 3.20),
            "qwen-vl-plus": (0.21, 0.63),
            "text-embedding-v4": (0.07, 0.0),
            "text-embedding-v3": (0.07, 0.0),
            # Multimodal embedding models: (image, text) per million tokens.
            "tongyi-embedding-vision-plus": (0.09, 0.09),
            "tongyi-embedding-vision-flash": (0.03, 0.09),
        },
        {
            "qwen3-vl-plus": "third-party only (API Evangelist, memories.ai), 2026",
            "qwen3-vl-flash": "third-party only (memories.ai, less its ~5 % markup), 2026",
            "qwen3.5-plus": _VERCEL,
            "qwen3.5-flash": _VERCEL,
            "qwen3.6-plus": "third-party only (one reseller, docs.laozhang.ai), 2026",
            "qwen-vl-max": "third-party only (OpenRouter), 2026",
            "qwen-vl-plus": "third-party only (memories.ai), 2026",
            "text-embedding-v4": _INTL_EMBEDDING_PAGE,
            "text-embedding-v3": _INTL_EMBEDDING_PAGE,
            "tongyi-embedding-vision-plus": _INTL_MULTIMODAL_PAGE,
            "tongyi-embedding-vision-flash": _INTL_MULTIMODAL_PAGE,
        },
    ),
    US: ListPrices("USD", {}, {}),
}
# The offline provider's label: its rows cost nothing, in any currency.
_FREE = {"offline-synthetic": (0.0, 0.0), "offline-hashed-vision-v1": (0.0, 0.0)}


class PriceTable(dict[str, tuple[float, float]]):
    """``{model: (input, output)}`` per million tokens, with the currency and region it is in."""

    def __init__(
        self, prices: Mapping[str, tuple[float, float]], currency: str, region: str | None
    ) -> None:
        super().__init__(prices)
        self.currency = currency
        self.region = region


def price_table(base_url: str, prices: str = "") -> PriceTable:
    """The list prices of ``base_url``'s region, with ``prices`` (``ENRICH_PRICES``) applied."""
    region = region_of(base_url)
    listed = LIST_PRICES.get(region) if region else None
    table: Prices = dict(listed.prices) if listed else {}
    currency = listed.currency if listed else ""
    if prices.strip():
        try:
            given, given_currency = parse_prices(prices)
        except ValueError as exc:
            raise ConfigError(f"ENRICH_PRICES: {exc}") from None
        if given_currency and given_currency != currency:
            table, currency = {}, given_currency
        table.update(given)
        currency = currency or "(ENRICH_PRICES)"
    return PriceTable({**_FREE, **table}, currency, region)


def load_prices(env: Mapping[str, str] | None = None, *, base_url: str | None = None) -> PriceTable:
    """The price table for this process: ``ENRICH_PRICES`` over the list prices of the region
    of ``base_url`` (by default ``DASHSCOPE_BASE_URL``)."""
    env = os.environ if env is None else env
    url = base_url or (env.get("DASHSCOPE_BASE_URL") or "").strip() or BEIJING_BASE_URL
    return price_table(url, env.get("ENRICH_PRICES") or "")


def estimate_cost(
    usage: Mapping[str, int],
    *,
    vision_model: str,
    embedding_model: str,
    prices: Mapping[str, tuple[float, float]],
    batch: bool = False,
    image_embedding_model: str | None = None,
) -> float | None:
    """Spend in the price table's currency, or None when a model that was used has no price.
    Image vectors are priced at ``image_embedding_model``'s (image, text) pair."""
    embedding_used = usage.get("embedding_tokens", 0)
    if vision_model not in prices or (embedding_used and embedding_model not in prices):
        return None
    image_used = usage.get("image_embedding_tokens", 0)
    image_text_used = usage.get("image_embedding_text_tokens", 0)
    if (image_used or image_text_used) and (image_embedding_model or "") not in prices:
        return None
    vin, vout = prices.get(vision_model, (0.0, 0.0))
    ein, _ = prices.get(embedding_model, (0.0, 0.0))
    iimage, itext = prices.get(image_embedding_model or "", (0.0, 0.0))
    cost = (
        usage.get("prompt_tokens", 0) * vin
        + usage.get("completion_tokens", 0) * vout
        + embedding_used * ein
    ) / 1_000_000
    # Image vectors are online calls even in a batch run: never halved.
    images = (image_used * iimage + image_text_used * itext) / 1_000_000
    return (cost / 2 if batch else cost) + images
