"""The offline provider: the demo's stand-in when no API key is set, labelled in every row.

It is never chosen silently against a real database (see ``bootstrap.build_provider``).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

from PIL import Image

from enrich_pipeline.enrichment.images import VisionImage
from enrich_pipeline.enrichment.synthetic import hashed_embedding, synthetic_caption
from enrich_pipeline.providers.base import Usage

OFFLINE_MODEL = "offline-synthetic"


class OfflineProvider:
    offline = True
    model_label = OFFLINE_MODEL

    def __init__(self, embedding_dimensions: int = 1024) -> None:
        self.dimensions = embedding_dimensions
        self.usage = Usage()

    def close(self) -> None:
        pass

    def caption(self, image: VisionImage) -> str:
        raw = base64.b64decode(image.data_url.split(",", 1)[1])
        with Image.open(io.BytesIO(raw)) as decoded:
            text = synthetic_caption(decoded)
        self.usage.add(vision_calls=1, image_tokens=image.tokens)
        return text

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        self.usage.add(embedding_calls=1)
        return [hashed_embedding(t, self.dimensions) for t in texts]
