"""The one settings tree: everything a process needs, read from the environment in one go."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Self

from pydantic import Field

from enrich_pipeline.settings.dashscope import DashScopeSettings
from enrich_pipeline.settings.database import DbSettings
from enrich_pipeline.settings.framework import ConfigError, SettingsModel
from enrich_pipeline.settings.images import ImageSettings
from enrich_pipeline.settings.runs import RunSettings


class Settings(SettingsModel):
    """Everything a process needs, read from the environment in one go."""

    db: DbSettings = Field(default_factory=DbSettings)
    dashscope: DashScopeSettings = Field(default_factory=DashScopeSettings)
    run: RunSettings = Field(default_factory=RunSettings)
    images: ImageSettings = Field(default_factory=ImageSettings)
    tag_vocabulary: str = Field(
        "",
        description="JSON file extending the tag vocabulary",
        validation_alias="ENRICH_TAG_VOCABULARY",
    )

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        given: Mapping[str, Any] | None = None,
        sources: Mapping[str, str] | None = None,
    ) -> Self:
        """Each part from the environment; ``given`` may replace whole parts (``run=...``).
        Every part's bad values are reported together, in one line."""
        env = os.environ if env is None else env
        given = dict(given or {})
        parts: dict[str, Any] = {}
        problems: list[str] = []
        models: dict[str, type[SettingsModel]] = {
            "db": DbSettings,
            "dashscope": DashScopeSettings,
            "run": RunSettings,
            "images": ImageSettings,
        }
        for name, model in models.items():
            if name in given:
                continue
            try:
                parts[name] = model.from_env(env)
            except ConfigError as exc:
                problems.append(str(exc))
        try:
            settings = super().from_env(env, {**parts, **given}, sources)
        except ConfigError as exc:
            problems.append(str(exc))
        if problems:
            raise ConfigError("; ".join(problems))
        return settings
