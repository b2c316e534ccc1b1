"""A small JPEG of a row's image, made by the same guarded loader the pipeline uses.

The search page shows images only through this: the browser never receives a row's image
reference, so a URL pointing at the cloud metadata service or an internal admin page is judged
by the SSRF guard (:mod:`.fetch`) on the server, exactly as a run would judge it, and fails
with the loader's ``code`` instead of being fetched by whoever looks at the page.
"""

from __future__ import annotations

import io

from PIL import Image

from enrich_pipeline.enrichment.images.policy import ImagePolicy
from enrich_pipeline.enrichment.images.sources import load_image

THUMBNAIL_SIDE = 320
"""Longest side of a thumbnail: sharp in a 160 px card on a 2x screen, about 15 kB as JPEG."""


def thumbnail_jpeg(
    source: str, policy: ImagePolicy, *, max_side: int = THUMBNAIL_SIDE, quality: int = 80
) -> bytes:
    """``source`` loaded under ``policy``, shrunk to ``max_side`` and encoded as JPEG.

    Raises :class:`~enrich_pipeline.enrichment.images.ImageLoadError` as ``load_image`` does.
    """
    if max_side < 1:
        raise ValueError("max_side must be positive")
    image = load_image(source, policy).image
    if image.mode != "RGB":
        image = image.convert("RGB")
    # The loader's working copy is already bounded (policy.work_max_side): this is one more
    # BOX reduction of at most a few megapixels.
    image.thumbnail((max_side, max_side), Image.Resampling.BOX)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
