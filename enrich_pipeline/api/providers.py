"""Choosing the provider: DashScope when a key is set, the offline one only when allowed."""

from __future__ import annotations

from enrich_pipeline.api.dashscope import DashScopeProvider, Provider
from enrich_pipeline.api.offline import OfflineProvider
from enrich_pipeline.settings import ConfigError, DashScopeSettings


def build_provider(settings: DashScopeSettings, *, embedded_db: bool) -> Provider:
    """The embedded demo falls back to offline with no key; a real database never does."""
    if settings.offline:
        return OfflineProvider(settings.embedding_dimensions)
    if not settings.api_key:
        if embedded_db:
            return OfflineProvider(settings.embedding_dimensions)
        raise ConfigError(
            "DASHSCOPE_API_KEY is not set: export it (or pass --offline to use the offline "
            "provider on purpose)"
        )
    return DashScopeProvider(settings)
