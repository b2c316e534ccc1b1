"""The DashScope resource: one provider (client, retry policy, rate limiter) per run.

The API key is read from ``DASHSCOPE_API_KEY`` only, never from config, so it cannot show up
in the launchpad or run records.
"""

from __future__ import annotations

from dataclasses import replace

from dagster import ConfigurableResource, InitResourceContext
from pydantic import PrivateAttr

from enrich_pipeline.api.dashscope import Provider
from enrich_pipeline.api.providers import build_provider
from enrich_pipeline.settings import DashScopeSettings, DbSettings


class DashScopeResource(ConfigurableResource):
    """Qwen-VL captions and text embeddings; unset fields fall back to the environment."""

    base_url: str | None = None
    vision_model: str | None = None
    embedding_model: str | None = None
    embedding_dimensions: int | None = None
    max_retries: int | None = None
    timeout: float | None = None
    requests_per_minute: int | None = None
    max_image_side: int | None = None
    offline: bool = False

    _provider: Provider | None = PrivateAttr(default=None)
    _settings: DashScopeSettings | None = PrivateAttr(default=None)

    def api_settings(self) -> DashScopeSettings:
        s = DashScopeSettings.from_env()
        overrides = {
            k: v
            for k, v in {
                "base_url": self.base_url,
                "vision_model": self.vision_model,
                "embedding_model": self.embedding_model,
                "embedding_dimensions": self.embedding_dimensions,
                "max_retries": self.max_retries,
                "timeout": self.timeout,
                "requests_per_minute": self.requests_per_minute,
                "max_image_side": self.max_image_side,
            }.items()
            if v is not None
        }
        if self.offline:
            overrides["offline"] = True
        return replace(s, **overrides)

    def setup_for_execution(self, context: InitResourceContext) -> None:
        self._settings = self.api_settings()
        self._provider = build_provider(self._settings, embedded_db=DbSettings.from_env().embedded)

    @property
    def settings(self) -> DashScopeSettings:
        assert self._settings is not None, "DashScopeResource used outside a run"
        return self._settings

    @property
    def provider(self) -> Provider:
        assert self._provider is not None, "DashScopeResource used outside a run"
        return self._provider
