"""The offline provider: the demo's stand-in when no API key is set, labelled in every row.

No model is called. Its captions say only what is known without one (``offline_caption``): the
subject of one of the demo's own drawings and the colors measured in the pixels, or the colors
alone for any other image; the tags derived from them follow (the keyword rules over the English
caption). Other configured languages get the same facts from a small table (Chinese), or the
measured colors alone, labelled as offline. Its embeddings are hashed bags of words. It is never
chosen silently against a real database (see ``bootstrap.build_provider``), and its answers are
never cached (``pipeline/broker.py``): they are not a model's.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

from PIL import Image

from enrich_pipeline.enrichment.colors import COLOR_NAMES_ZH, color_name, dominant_colors
from enrich_pipeline.enrichment.images import VisionImage
from enrich_pipeline.enrichment.structured import TEXT, Answer, Question, rule_tags
from enrich_pipeline.enrichment.synthetic import (
    hashed_embedding,
    offline_caption,
    recognize_sample,
)
from enrich_pipeline.providers.base import Usage

OFFLINE_MODEL = "offline-synthetic"
# The name stored with the offline vectors: feature-hashed words (``synthetic.hashed_embedding``),
# comparable only with each other, never with a real model's.
OFFLINE_EMBEDDING_MODEL = "offline-hashed-words-v1"
# The name stored with offline image vectors when an image model is configured: hashed words of
# what the offline recognizer sees, never the configured model's name (its vectors are not
# that model's, and search compares only vectors of one model).
OFFLINE_IMAGE_EMBEDDING_MODEL = "offline-hashed-vision-v1"

# What the offline provider can say in Chinese: the demo drawings' subjects and the color names
# ``colors.color_name`` gives. A word missing here is said in English rather than guessed.
_ZH_SUBJECTS = {
    "chair": "椅子",
    "lamp": "灯",
    "vase": "花瓶",
    "sofa": "沙发",
    "laptop": "笔记本电脑",
}


def _zh(word: str, table: dict[str, str]) -> str:
    return table.get(word, word)


def localized_offline_caption(image: Image.Image, language: str) -> str:
    """The offline caption in ``language``: the known sample's subject and colors (Chinese), or
    the measured colors; labelled as offline, since no model saw the image."""
    known = recognize_sample(image)
    colors = (
        [color_name(known[1]), color_name(known[2])]
        if known is not None
        else dominant_colors(image, k=3) or ["unknown"]
    )
    if language.split("-")[0] == "zh":
        if known is not None:
            subject = _zh(known[0], _ZH_SUBJECTS)
            fg, bg = _zh(colors[0], COLOR_NAMES_ZH), _zh(colors[1], COLOR_NAMES_ZH)
            return f"(离线说明){bg}背景上的{fg}{subject}平面剪影。"
        named = "、".join(_zh(c, COLOR_NAMES_ZH) for c in colors)
        return f"(离线说明)图像的主要颜色:{named};离线无法识别主体。"
    # No table for this language: the measured colors alone, which need no translation to be
    # true, said as what they are.
    return f"[offline, {language}] colors: {', '.join(colors)}"


class OfflineProvider:
    offline = True
    model_label = OFFLINE_MODEL
    embedding_model = OFFLINE_EMBEDDING_MODEL
    answer_format = TEXT

    def __init__(
        self, embedding_dimensions: int = 1024, image_embedding_dimensions: int | None = None
    ) -> None:
        self.dimensions = embedding_dimensions
        # Image vectors only when an image model is configured (its length, the run's choice).
        self.image_embedding_dimensions = image_embedding_dimensions
        self.image_embedding_model = (
            OFFLINE_IMAGE_EMBEDDING_MODEL if image_embedding_dimensions is not None else None
        )
        self.usage = Usage()

    def close(self) -> None:
        pass

    def answer(self, image: VisionImage, question: Question) -> Answer:
        """Every configured language's offline caption; tags by the rules over the English
        one (what was recognized), whichever languages are shown."""
        with self._decoded(image) as decoded:
            english = offline_caption(decoded)
            captions = {
                code: english if code == "en" else localized_offline_caption(decoded, code)
                for code in question.languages
            }
        # No image is sent anywhere, so no image tokens are counted (nor billed).
        self.usage.add(vision_calls=1)
        styles, objects = rule_tags([english], question.vocabulary)
        return Answer(captions, TEXT, tuple(styles), tuple(objects))

    @staticmethod
    def _decoded(image: VisionImage) -> Image.Image:
        raw = base64.b64decode(image.data_url.split(",", 1)[1])
        return Image.open(io.BytesIO(raw))

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        self.usage.add(embedding_calls=1)
        return [hashed_embedding(t, self.dimensions) for t in texts]

    def embed_images(self, images: Sequence[VisionImage]) -> list[list[float]]:
        """Hashed words of what the offline recognizer sees in each image (``vision_words``),
        in the space of ``embed_image_texts``; no call, nothing billed."""
        dims = self.image_embedding_dimensions
        if dims is None:
            return [[] for _ in images]
        vectors = []
        for image in images:
            with self._decoded(image) as decoded:
                vectors.append(hashed_embedding(vision_words(decoded), dims))
        self.usage.add(image_embedding_calls=1)
        return vectors

    def embed_image_texts(self, texts: Sequence[str]) -> list[list[float]]:
        dims = self.image_embedding_dimensions
        if dims is None:
            raise ValueError("no image embedding model is set (ENRICH_IMAGE_EMBEDDING_MODEL)")
        self.usage.add(image_embedding_calls=1)
        return [hashed_embedding(t, dims) for t in texts]


def vision_words(image: Image.Image) -> str:
    """What the offline recognizer sees, as words in English and Chinese (so that a query in
    either meets them): a known sample's subject, weighted by repetition above its color, above
    the background's; or the measured colors. Hashed, these share words with a text that names
    them (``synthetic.hashed_embedding``)."""
    known = recognize_sample(image)
    if known is None:
        colors = dominant_colors(image, k=3)
        return " ".join(f"{c} {_zh(c, COLOR_NAMES_ZH)}" for c in colors) or "unknown"
    subject, fg, bg = known[0], color_name(known[1]), color_name(known[2])
    words = [subject, _zh(subject, _ZH_SUBJECTS)] * 3
    words += [fg, _zh(fg, COLOR_NAMES_ZH)] * 2
    words += [bg, _zh(bg, COLOR_NAMES_ZH)]
    return " ".join(words)
