"""Image tokens as the models count them, the default sent size, list prices by region, the
ENRICH_PRICES check, and the Batch API's region/model matrix. Pure: no server, no database."""

from __future__ import annotations

import pytest
from PIL import Image

from enrich_pipeline.enrichment import vision_tokens
from enrich_pipeline.enrichment.images import LoadedImage, image_tokens, prepare_for_vision
from enrich_pipeline.providers.batch_api import (
    TEST_ENDPOINT,
    batch_endpoint,
    batch_refusal,
)
from enrich_pipeline.providers.pricing import estimate_cost, load_prices, price_table
from enrich_pipeline.providers.quota import account_of
from enrich_pipeline.providers.regions import region_of
from enrich_pipeline.settings import ConfigError, DashScopeSettings, Settings
from enrich_pipeline_tests.standin import StandIn

BEIJING = "https://dashscope.aliyuncs.com/compatible-mode/v1"
SINGAPORE = "https://dashscope-intl.aliyuncs.com/compatible-mode/v1"
US = "https://dashscope-us.aliyuncs.com/compatible-mode/v1"
LOCAL = "http://127.0.0.1:8765/v1"


def loaded(width: int, height: int) -> LoadedImage:
    return LoadedImage(
        source="test",
        image=Image.new("RGB", (width, height), (90, 140, 60)),
        original_width=width,
        original_height=height,
        content_sha256="0" * 64,
    )


# --- tokens ------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["qwen3-vl-plus", "qwen-vl-max", "qwen-vl-max-2025-04-08"])
@pytest.mark.parametrize("size", [(4000, 3000), (1600, 1200), (640, 480), (3000, 800), (50, 40)])
def test_the_estimate_is_what_the_service_bills_for_the_sent_image(
    model: str, size: tuple[int, int]
) -> None:
    vision = prepare_for_vision(loaded(*size), max_side=896, model=model)
    billed = vision_tokens.image_tokens(vision.width, vision.height, model)
    assert vision.tokens == billed == image_tokens(vision.width, vision.height, model)
    assert vision.tokens <= vision_tokens.max_image_tokens(model)
    patch = vision_tokens.patch_side(model)
    for side in (vision.width, vision.height):
        if side >= 10 * patch:  # sides of ten patches or more are snapped to the model's grid
            assert side % patch == 0


def test_the_default_size_is_on_both_patch_grids_and_costs_a_quarter_of_the_cap() -> None:
    settings = DashScopeSettings()
    assert settings.max_image_side == 896 == 28 * 32
    for model, grid_tokens in (("qwen3-vl-plus", 28 * 21), ("qwen-vl-max-2025-04-08", 32 * 24)):
        vision = prepare_for_vision(
            loaded(4000, 3000), max_side=settings.max_image_side, model=model
        )
        assert (vision.width, vision.height) == (896, 672)
        assert vision.tokens == grid_tokens + 2
    # Against what the service bills for the original (capped: 1856x1376 on 32-px models), not
    # against an uncapped size it never bills: 590 / 2,496 tokens.
    full = image_tokens(4000, 3000, "qwen3-vl-plus")
    assert full == 2496
    assert image_tokens(896, 672, "qwen3-vl-plus") / full == pytest.approx(0.236, abs=0.001)


def test_more_pixels_than_the_cap_are_never_sent() -> None:
    # 2048 px asked for: the 32-px models' cap (2,560 tokens) keeps 1856x1376 of a 4:3 photo.
    vision = prepare_for_vision(loaded(4000, 3000), max_side=2048, model="qwen3-vl-plus")
    assert vision.width * vision.height <= vision_tokens.max_pixels("qwen3-vl-plus")
    assert (vision.width, vision.height) == (1856, 1376)
    assert vision.tokens == 2496
    # A 28-px model caps at 1,280 tokens: about 1148x840.
    old = prepare_for_vision(loaded(4000, 3000), max_side=2048, model="qwen-vl-max-2025-04-08")
    assert old.width * old.height <= vision_tokens.max_pixels("qwen-vl-max-2025-04-08")
    assert old.tokens <= 1280 + 2


def test_the_stand_in_counts_image_tokens_by_the_dashscope_rule_by_default() -> None:
    assert StandIn().image_token_rule == "dashscope"


# --- prices ------------------------------------------------------------------------------


def test_regions_of_base_urls() -> None:
    assert region_of(BEIJING) == "beijing"
    assert region_of(SINGAPORE) == "singapore"
    assert region_of(US) == "us"
    assert region_of("https://cn-hongkong.dashscope.aliyuncs.com/compatible-mode/v1") == (
        "hongkong"
    )
    assert region_of("https://ws-1a2b.cn-beijing.maas.aliyuncs.com/compatible-mode/v1") == (
        "beijing"
    )
    assert region_of("https://ws-1a2b.ap-southeast-1.maas.aliyuncs.com/v1") == "singapore"
    assert region_of(LOCAL) is None and region_of("https://example.com/v1") is None
    assert account_of(BEIJING) == "beijing" and account_of(LOCAL) == "127.0.0.1:8765"
    assert account_of("http://user:secret@10.0.0.5:8000/v1") == "10.0.0.5:8000"


def test_list_prices_follow_the_region_of_the_base_url() -> None:
    beijing, singapore, us = (price_table(u) for u in (BEIJING, SINGAPORE, US))
    assert (beijing.currency, beijing["qwen3-vl-plus"]) == ("CNY", (1.0, 10.0))
    assert beijing["text-embedding-v4"] == (0.5, 0.0)
    assert (singapore.currency, singapore["qwen3-vl-plus"]) == ("USD", (0.20, 1.60))
    assert singapore["text-embedding-v4"] == (0.07, 0.0)
    assert us.currency == "USD" and "qwen3-vl-plus" not in us
    usage = {"prompt_tokens": 1_000_000, "completion_tokens": 100_000, "embedding_tokens": 0}
    cost = estimate_cost(
        usage, vision_model="qwen3-vl-plus", embedding_model="text-embedding-v4", prices=beijing
    )
    assert cost == pytest.approx(1.0 + 1.0)  # CNY
    assert estimate_cost(
        usage, vision_model="qwen3-vl-plus", embedding_model="x", prices=singapore, batch=True
    ) == pytest.approx((0.20 + 0.16) / 2)
    unpriced = estimate_cost(usage, vision_model="qwen3-vl-plus", embedding_model="x", prices=us)
    assert unpriced is None


def test_an_unknown_host_has_no_estimate_unless_enrich_prices_gives_one() -> None:
    usage = {"prompt_tokens": 1000, "completion_tokens": 100, "embedding_tokens": 50}
    bare = price_table(LOCAL)
    assert (
        estimate_cost(
            usage, vision_model="qwen3-vl-plus", embedding_model="text-embedding-v4", prices=bare
        )
        is None
    )
    given = load_prices(
        {
            "DASHSCOPE_BASE_URL": LOCAL,
            "ENRICH_PRICES": '{"qwen3-vl-plus": [2, 4], '
            '"text-embedding-v4": [1, 0], "currency": "eur"}',
        }
    )
    assert given.currency == "EUR" and given.region is None
    assert estimate_cost(
        usage, vision_model="qwen3-vl-plus", embedding_model="text-embedding-v4", prices=given
    ) == pytest.approx((1000 * 2 + 100 * 4 + 50 * 1) / 1e6)


def test_enrich_prices_merges_over_the_region_or_replaces_it_in_another_currency() -> None:
    merged = price_table(BEIJING, '{"qwen3-vl-plus": [0.8, 8]}')
    assert merged["qwen3-vl-plus"] == (0.8, 8.0) and merged["qwen-vl-max"] == (1.6, 4.0)
    assert merged.currency == "CNY"
    usd = price_table(BEIJING, '{"qwen3-vl-plus": [0.14, 1.4], "currency": "USD"}')
    assert usd.currency == "USD" and "qwen-vl-max" not in usd
    assert load_prices({}).currency == "CNY"  # the default base URL is Beijing's


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        "[1, 2]",
        '{"qwen3-vl-plus": "cheap"}',
        '{"qwen3-vl-plus": [0.2, -1]}',
        '{"qwen3-vl-plus": [1, 2, 3]}',
        '{"qwen3-vl-plus": [0.2, 1.6], "currency": 5}',
    ],
)
def test_a_bad_enrich_prices_is_one_line_when_the_settings_are_read(raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"ENRICH_PRICES": raw})
    message = str(info.value)
    assert message.startswith("ENRICH_PRICES: ") and "\n" not in message


# --- batch mode --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base_url", "model", "refused"),
    [
        (BEIJING, "qwen3-vl-plus", False),
        (BEIJING, "qwen-vl-max", False),
        (BEIJING, "qwen-vl-plus-latest", False),
        (BEIJING, "qwen3-vl-flash", False),
        (BEIJING, "batch-test-model", False),
        (BEIJING, "qvq-max", True),
        (SINGAPORE, "qwen3-vl-plus", True),
        (SINGAPORE, "qwen-vl-max", True),
        (SINGAPORE, "batch-test-model", False),
        (US, "qwen3-vl-flash-us", True),
        (LOCAL, "anything-at-all", False),  # another server decides for itself
    ],
)
def test_the_batch_region_model_matrix(base_url: str, model: str, refused: bool) -> None:
    settings = DashScopeSettings(base_url=base_url, vision_model=model)
    reason = batch_refusal(settings)
    assert (reason is not None) == refused, reason
    if reason:
        assert "\n" not in reason and model in reason or "region" in reason
        assert "online path" in reason


def test_the_test_model_goes_to_its_own_endpoint() -> None:
    assert batch_endpoint("batch-test-model") == TEST_ENDPOINT == "/v1/chat/ds-test"
    assert batch_endpoint("qwen3-vl-plus") == "/v1/chat/completions"
