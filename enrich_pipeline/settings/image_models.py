"""The multimodal embedding models the pipeline can embed images with, and what their
documentation says each takes: output sizes, inputs per request, image bytes.

One table, read by the settings (a size the model does not document is a setup error), the
DashScope client (how many inputs go in one request, which images are refused before a call)
and the stand-in server (which refuses what the real service documents refusing).

Sources (stored copies; the pages disagree across dates and languages, and where they do the
strictest documented figure is taken, as said per field):

- [M] https://www.alibabacloud.com/help/en/model-studio/multimodal-embedding-api-reference
  (updated Feb 05 2026): tongyi-embedding-vision-plus 1152/1024/512/256/128/64, -flash
  768/512/256/128/64, "A single file cannot be larger than 3 MB"; qwen3-vl-embedding (Beijing)
  2560...256, "Max 1 image, up to 5 MB"; multimodal-embedding-v1 1024.
- [Z] https://help.aliyun.com/zh/model-studio/multimodal-embedding-api-reference:
  qwen3-vl-embedding 2560 (default) ... 256; "一次请求中传入内容元素总数不超过 20" (at most 20
  content elements per request); multimodal-embedding-v1 "不支持此参数，固定返回 1024 维向量"
  (takes no ``dimension``, always 1024) and "内容元素总数不超过 20；图片、视频各最多 1 条，文本最多
  20 条" (at most 1 image, at most 20 texts).
- [Q] https://docs.qwencloud.com/developer-guides/embeddings/multimodal-embedding: plus and
  flash "No element count limit. Total tokens must stay within the batch token limit", "Max 3 MB
  per image", multi-images at most 8; text at most 1,024 tokens, Chinese and English only.
- [G] https://help.aliyun.com/zh/model-studio/rate-limit: a request body is at most 16 MiB once
  its Base64 is decoded (HTTP 413 past it).
"""

from __future__ import annotations

from dataclasses import dataclass

# 3 MB: [M] and [Q] for plus and flash, and the older EN page for multimodal-embedding-v1; the
# Qwen Cloud API reference says 10 MB / 5 MB and qwen3-vl-embedding's pages 5 or 10 MB. The
# strictest documented figure, read as 3,000,000 bytes (not MiB): the smaller reading.
MAX_IMAGE_BYTES = 3_000_000
# [G]: the decoded body's cap. A request's images are kept well under it (a quarter), so that
# the JSON around them and the Base64 overhead never matter.
MAX_REQUEST_IMAGE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class ImageModel:
    """What one multimodal embedding model documents."""

    name: str
    dimensions: tuple[int, ...]
    default_dimensions: int
    # multimodal-embedding-v1 takes no ``dimension`` parameter [Z].
    sends_dimension: bool
    images_per_request: int
    texts_per_request: int
    # The longest text the model embeds, in tokens ([M], [Q]).
    max_text_tokens: int


# plus and flash: no element count is documented [Q]; 8 is the only image count their pages
# give (multi_images), taken as the cap so a request holds at most 8 x 3 MB before the body cap
# (which splits it further). Texts: 20, the count the other models document [Z].
IMAGE_MODELS: dict[str, ImageModel] = {
    m.name: m
    for m in (
        ImageModel(
            "tongyi-embedding-vision-plus", (64, 128, 256, 512, 1024, 1152), 1152, True, 8, 20, 1024
        ),
        ImageModel(
            "tongyi-embedding-vision-flash", (64, 128, 256, 512, 768), 768, True, 8, 20, 1024
        ),
        # The dated snapshot [Z]: the plus sizes; up to 64 images documented, 8 kept as for plus.
        ImageModel(
            "tongyi-embedding-vision-plus-2026-03-06",
            (64, 128, 256, 512, 1024, 1152),
            1152,
            True,
            8,
            20,
            1024,
        ),
        # "Max 1 image" [M]; an older mirror says 10 images, 20 elements [Z]: 1, the strictest.
        ImageModel(
            "qwen3-vl-embedding",
            (256, 512, 768, 1024, 1536, 2048, 2560),
            2560,
            True,
            1,
            20,
            32_000,
        ),
        ImageModel("multimodal-embedding-v1", (1024,), 1024, False, 1, 20, 512),
    )
}


def image_model(name: str) -> ImageModel | None:
    """The documented facts of ``name``, or None when it is not a known multimodal model."""
    return IMAGE_MODELS.get(name)
