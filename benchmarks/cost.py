"""Cost per 1,000 images by model and answer: ``python -m benchmarks.cost``.

Sends ``--n`` real requests per row to the stand-in DashScope server (in this process: nothing
here is timed) and prints the tokens it counted, per image, and the estimated cost per 1,000
images at the list prices of ``providers/pricing.py`` (Singapore in USD, Beijing in CNY; "-"
where no price was found). The images are sample-like: half the demo's drawings, half smooth
photo-like pictures, 1600x1200 JPEG, read and shrunk by the project's own image code
(``load_image``, ``prepare_for_vision`` at ``ENRICH_MAX_IMAGE_SIDE``), so the image tokens are
the pipeline's, and the request bodies are the pipeline's own (``wire.caption_request_body``).

Rows, for each model (qwen3-vl-plus, qwen3-vl-flash, qwen3.5-plus, qwen3.5-flash, qwen3.6-plus,
qwen3.6-flash):

- ``text en``: the legacy plain caption (tags by keyword rules);
- ``structured en`` / ``structured zh,en``: one call returning captions and tags in the format
  the model takes (json_object for every vision model: DashScope names none for json_schema),
  one or two languages;
- for the models that think by default (Qwen3.5/3.6), ``thinking on``: the plain caption with
  thinking left on, which is what turning it off saves. Structured output is for non-thinking
  mode only, so there is no structured row with thinking.

What the figures rest on: the stand-in counts image tokens as DashScope documents them, text as
words and punctuation (one token per Han character), and thinks a few hundred tokens for a
caption, an assumption (``standin/structured.py``): a real model's thinking length is not
documented, and its captions may be longer or shorter than the stand-in's. The prices are
third-party for every vision model (see ``providers/pricing.py``). So the ratios between rows
are the result; the absolute figures are estimates. Results go to ``artifacts/cost.json``.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import openai

from benchmarks.memory import picture
from enrich_pipeline.enrichment.images.sources import load_image
from enrich_pipeline.enrichment.images.vision import prepare_for_vision
from enrich_pipeline.enrichment.synthetic import SAMPLE_SUBJECTS, draw_sample
from enrich_pipeline.providers.pricing import PriceTable, estimate_cost, price_table
from enrich_pipeline.providers.wire import caption_request_body, question_of, sdk_arguments
from enrich_pipeline.settings import BEIJING_BASE_URL, DashScopeSettings
from enrich_pipeline_tests.standin import StandIn

REPO = Path(__file__).resolve().parent.parent
SINGAPORE_BASE_URL = "https://dashscope-intl.aliyuncs.com/compatible-mode/v1"
MODELS = (
    "qwen3-vl-plus",
    "qwen3-vl-flash",
    "qwen3.5-plus",
    "qwen3.5-flash",
    "qwen3.6-plus",
    "qwen3.6-flash",
)
PHOTO_SIZE = (1600, 1200)
_THINKS_BY_DEFAULT = ("qwen3.5-", "qwen3.6-")
_COLORS = ((40, 80, 200), (200, 30, 30), (40, 160, 60), (120, 75, 40), (20, 20, 20))
_GROUNDS = ((245, 245, 245), (220, 200, 160))


@dataclass(frozen=True)
class Row:
    """One model and answer: what it asks for, and what the stand-in counted per image."""

    model: str
    answer: str  # "text en", "structured en", "structured zh,en", "thinking on"
    answer_format: str
    languages: str
    images: int
    input_tokens: float  # per image: the image's and the prompt's
    output_tokens: float  # per image, thinking included
    thinking_tokens: float  # per image, part of output_tokens
    usd_per_1000: float | None  # Singapore list prices
    cny_per_1000: float | None  # Beijing list prices


def sample_images(n: int) -> list[str]:
    """``n`` JPEG data URLs, 1600x1200: the demo's drawings and photo-like pictures in turn."""
    urls = []
    for i in range(n):
        if i % 2 == 0:
            subject = SAMPLE_SUBJECTS[(i // 2) % len(SAMPLE_SUBJECTS)]
            color = _COLORS[(i // 2) % len(_COLORS)]
            image = draw_sample(subject, color, _GROUNDS[i % 4 // 2], PHOTO_SIZE)
        else:
            image = picture(i, PHOTO_SIZE)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        urls.append("data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode())
    return urls


# -- the request bodies: the pipeline's own ------------------------------------------------------


def request_body(
    settings: DashScopeSettings, data_url: str, answer_format: str, thinking: bool
) -> dict[str, Any]:
    """The chat body the pipeline sends for one image in ``answer_format`` and
    ``settings.languages`` (``wire.caption_request_body``, as online and in batch lines);
    ``thinking`` leaves a thinking model's default on, which the pipeline never does."""
    body = caption_request_body(settings, data_url, question_of(settings), answer_format)
    if thinking:
        body.pop("enable_thinking", None)
    return body


def _send(client: openai.OpenAI, body: dict[str, Any]) -> Any:
    return client.chat.completions.create(**sdk_arguments(body))


# -- measuring ---------------------------------------------------------------------------------


def answers(model: str) -> list[tuple[str, str, str, bool]]:
    """(row name, answer format, languages, thinking) measured for ``model``."""
    rows = [
        ("text en", "text", "en", False),
        ("structured en", "json_object", "en", False),
        ("structured zh,en", "json_object", "zh,en", False),
    ]
    if model.startswith(_THINKS_BY_DEFAULT):
        rows.append(("thinking on", "text", "en", True))
    return rows


def measure(
    client: openai.OpenAI,
    model: str,
    images: list[str],
    prices: tuple[PriceTable, PriceTable],
) -> list[Row]:
    rows = []
    side = DashScopeSettings().max_image_side
    sent = [prepare_for_vision(load_image(s), side, model=model).data_url for s in images]
    for name, answer_format, languages, thinking in answers(model):
        settings = DashScopeSettings(
            api_key="sk-bench", vision_model=model, caption_languages=languages
        )
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        thought = 0
        for data_url in sent:
            response = _send(client, request_body(settings, data_url, answer_format, thinking))
            usage["prompt_tokens"] += response.usage.prompt_tokens
            usage["completion_tokens"] += response.usage.completion_tokens
            details = response.usage.completion_tokens_details
            thought += (details.reasoning_tokens or 0) if details else 0
        n = len(images)
        per_1000 = [
            estimate_cost(usage, vision_model=model, embedding_model="", prices=table)
            for table in prices
        ]
        rows.append(
            Row(
                model=model,
                answer=name,
                answer_format=answer_format,
                languages=languages,
                images=n,
                input_tokens=usage["prompt_tokens"] / n,
                output_tokens=usage["completion_tokens"] / n,
                thinking_tokens=thought / n,
                usd_per_1000=None if per_1000[0] is None else per_1000[0] * 1000 / n,
                cny_per_1000=None if per_1000[1] is None else per_1000[1] * 1000 / n,
            )
        )
    return rows


def _money(value: float | None, width: int) -> str:
    return f"{value:{width}.3f}" if value is not None else f"{'-':>{width}}"


def render(rows: list[Row]) -> str:
    """The table: tokens per image, cost per 1,000 images, and each row against the model's
    plain caption."""
    head = (
        f"{'model':<14} {'answer':<17} {'in/img':>7} {'out/img':>8} {'think/img':>9} "
        f"{'USD/1k':>8} {'CNY/1k':>8} {'x text':>7}"
    )
    lines = [head, "-" * len(head)]
    plain = {r.model: r for r in rows if r.answer == "text en"}
    for r in rows:
        base = plain.get(r.model)
        ratio = ""
        if base is not None and r.usd_per_1000 is not None and base.usd_per_1000:
            ratio = f"{r.usd_per_1000 / base.usd_per_1000:.2f}"
        lines.append(
            f"{r.model:<14} {r.answer:<17} {r.input_tokens:7.0f} {r.output_tokens:8.0f} "
            f"{r.thinking_tokens:9.0f} {_money(r.usd_per_1000, 8)} "
            f"{_money(r.cny_per_1000, 8)} {ratio:>7}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, out: Any = None) -> int:
    out = out or sys.stdout
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=50, help="images per row")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated")
    parser.add_argument("--json", default=str(REPO / "artifacts" / "cost.json"))
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    images = sample_images(args.n)
    prices = (price_table(SINGAPORE_BASE_URL), price_table(BEIJING_BASE_URL))
    rows: list[Row] = []
    with StandIn(api_key="sk-bench") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0)
        for model in (m.strip() for m in args.models.split(",") if m.strip()):
            rows += measure(client, model, images, prices)
    print(render(rows), file=out)
    print(
        f"\n{args.n} images per row, 1600x1200 sent at the pipeline's default size; USD at "
        "Singapore list prices, CNY at Beijing's ('-': no price found); thinking is billed as "
        "output.",
        file=out,
    )
    target = Path(args.json)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
