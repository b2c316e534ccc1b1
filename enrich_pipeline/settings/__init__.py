"""The settings tree: every knob's default, bounds, help text and variable, declared once.

The command lines take their flags' defaults and help from here, the Dagster ``Config`` classes
and resources their fields, the sensor its limits. ``framework`` holds what every model shares
(reading the variables, one-line errors); the models live one idea to a module.
"""

from enrich_pipeline.settings.automation import AutomationSettings
from enrich_pipeline.settings.conninfo import checked_conninfo
from enrich_pipeline.settings.dashscope import (
    BEIJING_BASE_URL,
    DEFAULT_PROMPT,
    EMBEDDING_DIMENSIONS,
    DashScopeSettings,
)
from enrich_pipeline.settings.database import DbSettings
from enrich_pipeline.settings.framework import (
    ConfigError,
    SettingsModel,
    bounds,
    describe,
    env_name,
)
from enrich_pipeline.settings.images import ImageSettings
from enrich_pipeline.settings.prices import PRICES_FORMAT, parse_prices
from enrich_pipeline.settings.runs import (
    BATCH_MAX_BYTES,
    BATCH_MAX_LINES,
    DAGSTER_BATCH_SIZE,
    BatchSettings,
    RunSettings,
)
from enrich_pipeline.settings.tree import Settings

__all__ = [
    "BATCH_MAX_BYTES",
    "BATCH_MAX_LINES",
    "BEIJING_BASE_URL",
    "DAGSTER_BATCH_SIZE",
    "DEFAULT_PROMPT",
    "EMBEDDING_DIMENSIONS",
    "PRICES_FORMAT",
    "AutomationSettings",
    "BatchSettings",
    "ConfigError",
    "DashScopeSettings",
    "DbSettings",
    "ImageSettings",
    "RunSettings",
    "Settings",
    "SettingsModel",
    "bounds",
    "checked_conninfo",
    "describe",
    "env_name",
    "parse_prices",
]
