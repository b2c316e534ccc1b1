"""How the DashScope stand-in serves the real `openai` client: deterministic captions and
embeddings, injected faults and rules, the key, a per-minute limit, latency, and a prompt stop."""

from __future__ import annotations

import base64
import io
import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest
from PIL import Image

from enrich_pipeline.enrichment.synthetic import hashed_embedding as embed_text
from enrich_pipeline.enrichment.synthetic import synthetic_caption as caption_for_image
from enrich_pipeline_tests.standin import StandIn

VL_MODEL = "qwen-vl-plus"
EMB_MODEL = "text-embedding-v4"


def _client(server: StandIn, **kwargs: Any) -> openai.OpenAI:
    # No retries: fault tests must see the first answer, not the SDK's recovery.
    kwargs.setdefault("max_retries", 0)
    return openai.OpenAI(base_url=server.base_url, api_key=server.api_key, **kwargs)


def _image(color: tuple[int, int, int], size: tuple[int, int] = (100, 60)) -> Image.Image:
    return Image.new("RGB", size, color)


def _data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _messages(image_url: str | None, prompt: str = "Describe this product.") -> list[Any]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": prompt}]
    if image_url is not None:
        parts.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
    return [{"role": "user", "content": parts}]


def _caption(client: openai.OpenAI, image_url: str | None = None, **kwargs: Any) -> Any:
    return client.chat.completions.create(model=VL_MODEL, messages=_messages(image_url), **kwargs)


BLUE_URL = _data_url(_image((20, 40, 220)))


def test_chat_caption_is_deterministic_and_billed_per_patch() -> None:
    image = _image((20, 40, 220))
    with StandIn() as server:
        client = _client(server)
        first = _caption(client, _data_url(image))
        second = _caption(client, _data_url(image))
        entry = server.requests[-1]

    caption = first.choices[0].message.content
    assert caption == second.choices[0].message.content == caption_for_image(image)
    assert "blue" in caption.split()
    assert first.choices[0].finish_reason == "stop"
    assert first.id.startswith("chatcmpl-")
    # DashScope's rule for qwen-vl-plus (32-px patches): 100x60 is resized to 96x64, 3 * 2
    # patches, plus <vision_bos>/<vision_eos>; plus "Describe this product ." as text.
    assert first.usage.prompt_tokens == 8 + 4
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
    assert entry == entry | {"endpoint": "chat", "model": VL_MODEL, "n_inputs": 1, "status": 200}
    assert entry["image_tokens"] == 8 and entry["fault"] is None


@pytest.mark.parametrize(
    ("rgb", "word"),
    [
        ((230, 20, 20), "red"),
        ((30, 170, 50), "green"),
        ((250, 250, 250), "white"),
        ((5, 5, 5), "black"),
        ((128, 128, 128), "gray"),
        ((240, 220, 40), "yellow"),
    ],
)
def test_caption_names_the_mean_color(rgb: tuple[int, int, int], word: str) -> None:
    assert word in caption_for_image(_image(rgb)).split()


def test_tiny_image_bills_minimum_tokens_and_remote_urls_are_not_fetched() -> None:
    with StandIn() as server:
        client = _client(server)
        # 11x11: the smallest image DashScope takes (10 px or less is refused).
        tiny = _caption(client, _data_url(_image((0, 0, 0), (11, 11))))
        remote = _caption(client, "https://example.com/chair.jpg")
        text_only = _caption(client)

    # The 4-patch floor plus the two special tokens.
    assert tiny.usage.prompt_tokens == 6 + 4
    assert remote.usage.prompt_tokens == 4 and remote.choices[0].message.content
    assert text_only.choices[0].message.content
    assert [r["image_tokens"] for r in server.requests] == [6, 0, 0]


def test_undecodable_image_is_invalid_parameter() -> None:
    with StandIn() as server, pytest.raises(openai.BadRequestError) as info:
        _caption(_client(server), "data:image/png;base64," + base64.b64encode(b"nope").decode())
    assert info.value.code == "invalid_parameter_error"


def test_embeddings_default_base64_and_explicit_float() -> None:
    texts = ["modern blue chair", "blue modern chair in a room", "rustic kitchen shelf"]
    with StandIn() as server:
        client = _client(server)
        # The SDK asks for base64 unless told otherwise and decodes it back to floats.
        default = client.embeddings.create(model=EMB_MODEL, input=texts)
        small = client.embeddings.create(
            model=EMB_MODEL, input=texts[0], dimensions=256, encoding_format="float"
        )

    vectors = [d.embedding for d in default.data]
    assert [len(v) for v in vectors] == [1024] * 3
    assert [d.index for d in default.data] == [0, 1, 2]
    assert vectors[0] == pytest.approx(embed_text(texts[0]), abs=1e-6)
    assert math.isclose(math.sqrt(sum(x * x for x in vectors[0])), 1.0, rel_tol=1e-5)

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cos(vectors[0], vectors[1]) > 0.5 > abs(cos(vectors[0], vectors[2]))
    assert len(small.data[0].embedding) == 256
    assert default.usage.prompt_tokens == default.usage.total_tokens > 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"input": [f"text {i}" for i in range(11)]},
        {"input": "a chair", "dimensions": 300},
    ],
    ids=["batch-over-10", "bad-dimensions"],
)
def test_embeddings_validation(kwargs: dict[str, Any]) -> None:
    with StandIn() as server, pytest.raises(openai.BadRequestError) as info:
        _client(server).embeddings.create(model=EMB_MODEL, **kwargs)
    assert info.value.code == "invalid_parameter_error"
    assert server.count("embeddings", status=400) == 1


@pytest.mark.parametrize(
    ("fault", "exc", "status", "code"),
    [
        ("429", openai.RateLimitError, 429, "limit_requests"),
        ("500", openai.InternalServerError, 500, "internal_error"),
        ("503", openai.InternalServerError, 503, "internal_error"),
        ("moderation", openai.BadRequestError, 400, "data_inspection_failed"),
        ("bad_image", openai.BadRequestError, 400, "invalid_parameter_error"),
        ("unauthorized", openai.AuthenticationError, 401, "invalid_api_key"),
    ],
)
def test_status_faults(
    fault: str, exc: type[openai.APIStatusError], status: int, code: str
) -> None:
    with StandIn() as server:
        client = _client(server)
        server.inject(fault)
        with pytest.raises(exc) as info:
            _caption(client, BLUE_URL)
        assert _caption(client, BLUE_URL).choices[0].message.content  # served once only

    assert info.value.status_code == status
    assert info.value.code == code
    assert isinstance(info.value.body, dict) and info.value.body["param"] is None
    assert info.value.request_id  # taken from x-request-id, as with DashScope
    assert "retry-after" not in info.value.response.headers
    assert server.requests[0]["fault"] == fault and server.requests[0]["status"] == status


def test_timeout_reset_malformed_and_empty_caption() -> None:
    with StandIn(hang_seconds=2.0) as server:
        client = _client(server)
        server.inject("timeout")
        with pytest.raises(openai.APITimeoutError):
            _caption(client, BLUE_URL, timeout=0.3)
        server.inject("reset")
        with pytest.raises(openai.APIConnectionError) as info:
            _caption(client, BLUE_URL)
        assert not isinstance(info.value, openai.APITimeoutError)
        server.inject("malformed")
        # Surprising but true: the SDK lets the JSON decoder's error escape unwrapped.
        with pytest.raises(json.JSONDecodeError):
            _caption(client, BLUE_URL)
        server.inject("empty_caption")
        assert _caption(client, BLUE_URL).choices[0].message.content == ""

    # Logged on completion: the hung request lands last, when stop() wakes it.
    assert [r["fault"] for r in server.requests] == [
        "reset",
        "malformed",
        "empty_caption",
        "timeout",
    ]
    assert [r["status"] for r in server.requests] == [0, 200, 200, 200]


def test_retry_after_and_endpoint_targeting() -> None:
    with StandIn() as server:
        client = _client(server)
        server.inject("429", times=2, endpoint="embeddings", retry_after=1.5)
        _caption(client, BLUE_URL)  # chat is not targeted
        for _ in range(2):
            with pytest.raises(openai.RateLimitError) as info:
                client.embeddings.create(model=EMB_MODEL, input="chair")
            assert info.value.response.headers["retry-after"] == "1.5"
        client.embeddings.create(model=EMB_MODEL, input="chair")
        assert server.count("embeddings", status=429) == 2
        assert server.count(status=200) == 2


def test_rules_by_color_and_text() -> None:
    red_url = _data_url(_image((240, 10, 10)))
    with StandIn() as server:
        client = _client(server)
        server.add_rule("moderation", color=(255, 0, 0))
        server.add_rule("bad_image", text_contains="forbidden", times=1)
        for _ in range(2):  # times=None: every time
            with pytest.raises(openai.BadRequestError) as info:
                _caption(client, red_url)
            assert info.value.code == "data_inspection_failed"
        _caption(client, BLUE_URL)
        with pytest.raises(openai.BadRequestError):
            client.embeddings.create(model=EMB_MODEL, input=["ok", "a forbidden word"])
        client.embeddings.create(model=EMB_MODEL, input=["a forbidden word"])
        server.clear_faults()
        _caption(client, red_url)


def test_wrong_key_is_rejected() -> None:
    with StandIn(api_key="sk-right") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            client.embeddings.create(model=EMB_MODEL, input="chair")
    assert info.value.code == "invalid_api_key"
    assert server.requests[0]["status"] == 401 and server.requests[0]["fault"] is None


def test_rpm_limit_answers_429_beyond_the_window() -> None:
    with StandIn(rpm_limit=3) as server:
        client = _client(server)
        for _ in range(3):
            client.embeddings.create(model=EMB_MODEL, input="chair")
        with pytest.raises(openai.RateLimitError) as info:
            client.embeddings.create(model=EMB_MODEL, input="chair")
        assert "retry-after" not in info.value.response.headers
        assert server.requests[-1]["fault"] == "rpm_limit"
        server.rpm_limit = None
        client.embeddings.create(model=EMB_MODEL, input="chair")
        assert server.count(status=429) == 1
        server.reset_log()
        assert server.count() == 0 and server.requests == []


def test_latency_overlaps_across_concurrent_calls() -> None:
    with StandIn(latency=1.0) as server:
        client = _client(server)
        start = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda _: _caption(client, BLUE_URL), range(8)))
        elapsed = time.monotonic() - start
    assert len(results) == 8
    # One after another, the eight would take 8 s; overlapping, about one latency.
    assert 1.0 <= elapsed < 4.0


def test_stop_returns_promptly_while_a_request_hangs() -> None:
    server = StandIn(hang_seconds=30.0).start()
    client = _client(server, timeout=20.0)
    server.inject("timeout")
    outcome: list[object] = []

    def call() -> None:
        try:
            outcome.append(_caption(client, BLUE_URL))
        except openai.APIError as exc:
            outcome.append(exc)

    worker = threading.Thread(target=call)
    worker.start()
    time.sleep(0.3)  # let the request reach the hang
    start = time.monotonic()
    server.stop()
    assert time.monotonic() - start < 15.0  # not the 30 s hang
    worker.join(timeout=15.0)
    assert not worker.is_alive() and outcome


def test_inject_rejects_unknown_names() -> None:
    server = StandIn()
    with pytest.raises(ValueError):
        server.inject("teapot")
    with pytest.raises(ValueError):
        server.inject("500", endpoint="images")
    with pytest.raises(ValueError):
        server.add_rule("500")
