"""Loading untrusted images safely, and shrinking them before they are sent to a vision model.

Image references come from user rows, so every source is treated as hostile: a URL may point at
the cloud metadata service or an internal admin page (SSRF), a body may be endless, a small file
may declare a gigapixel canvas, and "image/jpeg" may be an HTML error page. Each of these fails
with an :class:`ImageLoadError` whose ``code`` says what went wrong and whose ``permanent`` flag
tells the retry machinery whether trying again can help.

- :mod:`.policy`: the limits (:class:`ImagePolicy`) and the error;
- :mod:`.sources`: :func:`load_image`, and reading local files and ``data:`` URLs;
- :mod:`.fetch`: HTTP(S) with one deadline, vetted addresses and redirects;
- :mod:`.addresses`: the SSRF guard's verdicts on IP addresses (pure);
- :mod:`.decode`: bytes to an upright RGB working copy (:class:`LoadedImage`);
- :mod:`.budget`: the bound on decoded pixels in flight in one process;
- :mod:`.vision`: the copy sent to the model (:class:`VisionImage`) and its tokens, padded or
  refused (``too_small``) where its shape is outside what the model takes.
"""

from __future__ import annotations

from enrich_pipeline.enrichment.images.addresses import (
    blocked_address_reason,
    embedded_ipv4,
    metadata_address,
)
from enrich_pipeline.enrichment.images.decode import LoadedImage
from enrich_pipeline.enrichment.images.policy import WORK_MAX_SIDE, ImageLoadError, ImagePolicy
from enrich_pipeline.enrichment.images.sources import load_image
from enrich_pipeline.enrichment.images.vision import VisionImage, image_tokens, prepare_for_vision

__all__ = [
    "WORK_MAX_SIDE",
    "ImageLoadError",
    "ImagePolicy",
    "LoadedImage",
    "VisionImage",
    "blocked_address_reason",
    "embedded_ipv4",
    "image_tokens",
    "load_image",
    "metadata_address",
    "prepare_for_vision",
]
