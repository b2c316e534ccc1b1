"""The offline provider: the demo's stand-in when no API key is set, labelled in every row.

No model is called. Its captions say only what is known without one (``offline_caption``): the
subject of one of the demo's own drawings and the colors measured in the pixels, or the colors
alone for any other image; the tags derived from them follow. Its embeddings are hashed bags of
words. It is never chosen silently against a real database (see ``bootstrap.build_provider``).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

from PIL import Image

from enrich_pipeline.enrichment.images import VisionImage
from enrich_pipeline.enrichment.synthetic import hashed_embedding, offline_caption
from enrich_pipeline.providers.base import Usage

OFFLINE_MODEL = "offline-synthetic"
# The name stored with the offline vectors: feature-hashed words (``synthetic.hashed_embedding``),
# comparable only with each other, never with a real model's.
OFFLINE_EMBEDDING_MODEL = "offline-hashed-words-v1"


class OfflineProvider:
    offline = True
    model_label = OFFLINE_MODEL
    embedding_model = OFFLINE_EMBEDDING_MODEL

    def __init__(self, embedding_dimensions: int = 1024) -> None:
        self.dimensions = embedding_dimensions
        self.usage = Usage()

    def close(self) -> None:
        pass

    def caption(self, image: VisionImage) -> str:
        raw = base64.b64decode(image.data_url.split(",", 1)[1])
        with Image.open(io.BytesIO(raw)) as decoded:
            text = offline_caption(decoded)
        # No image is sent anywhere, so no image tokens are counted (nor billed).
        self.usage.add(vision_calls=1)
        return text

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        self.usage.add(embedding_calls=1)
        return [hashed_embedding(t, self.dimensions) for t in texts]
