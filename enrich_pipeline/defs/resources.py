"""The deployment's resources: the ADBPG store (pool + all SQL) and the DashScope provider
(client, retry and rate-limit policy), both built by ``bootstrap`` from the settings tree. (The
run's own resources, its state and its heartbeat, are in ``run_state.py`` and ``heartbeat.py``.)

Fields left unset fall back to the environment, as everywhere else. Secrets are given as
``dagster.EnvVar`` (see ``definitions.py``), so the UI shows which variable feeds which field
without showing its value; they never appear in run config or the launchpad.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from dagster import ConfigurableResource, InitResourceContext
from pydantic import Field, PrivateAttr

from enrich_pipeline.bootstrap import build_provider, open_store, run_policies
from enrich_pipeline.db.store import Store
from enrich_pipeline.enrichment.images import ImagePolicy
from enrich_pipeline.enrichment.records import Provenance
from enrich_pipeline.enrichment.structured import Question
from enrich_pipeline.enrichment.tags import TagVocabulary
from enrich_pipeline.providers.base import Provider
from enrich_pipeline.providers.wire import question_of
from enrich_pipeline.settings import (
    ConfigError,
    DashScopeSettings,
    DbSettings,
    Settings,
    describe,
)

_OPENING = threading.Lock()


def _unset(model: type, name: str) -> Any:
    return Field(default=None, description=describe(model, name) + "; unset: the environment")


def _given(resource: ConfigurableResource, names: tuple[str, ...]) -> dict[str, Any]:
    return {n: getattr(resource, n) for n in names if getattr(resource, n) is not None}


class AdbpgResource(ConfigurableResource):
    """AnalyticDB for PostgreSQL (or any PostgreSQL): the items table and the pipeline's tables."""

    url: str | None = Field(
        default=None, description="libpq URL of the database (EnvVar ADBPG_URL); unset: ADBPG_*"
    )
    password: str | None = Field(
        default=None, description="password, with ADBPG_HOST (EnvVar ADBPG_PASSWORD)"
    )
    namespace: str | None = _unset(DbSettings, "namespace")
    table: str | None = _unset(DbSettings, "table")
    max_connections: int | None = _unset(DbSettings, "max_connections")
    statement_timeout_ms: int | None = _unset(DbSettings, "statement_timeout_ms")

    _store: Store | None = PrivateAttr(default=None)

    def db_settings(self) -> DbSettings:
        env = dict(os.environ)
        if self.url:
            env["ADBPG_URL"] = self.url
        if self.password:
            env["ADBPG_PASSWORD"] = self.password
        names = ("namespace", "table", "max_connections", "statement_timeout_ms")
        return DbSettings.from_env(env, _given(self, names), {n: f"adbpg.{n}" for n in names})

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        self.close()

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    @property
    def store(self) -> Store:
        """The store, connected on first use so a sensor can turn "database down" into a skip."""
        if self._store is None:
            # One first setup at a time in a process: the sensors tick in threads, and two
            # first setups at once (migrations, the pending-rows index) can deadlock.
            with _OPENING:
                if self._store is None:
                    self._store = open_store(Settings.from_env(given={"db": self.db_settings()}))
        return self._store


class DashScopeResource(ConfigurableResource):
    """Qwen-VL captions and text embeddings; unset fields fall back to the environment."""

    api_key: str | None = Field(
        default=None, description="DashScope API key (EnvVar DASHSCOPE_API_KEY)"
    )
    base_url: str | None = _unset(DashScopeSettings, "base_url")
    vision_model: str | None = _unset(DashScopeSettings, "vision_model")
    embedding_model: str | None = _unset(DashScopeSettings, "embedding_model")
    embedding_dimensions: int | None = _unset(DashScopeSettings, "embedding_dimensions")
    max_retries: int | None = _unset(DashScopeSettings, "max_retries")
    timeout: float | None = _unset(DashScopeSettings, "timeout")
    requests_per_minute: int | None = _unset(DashScopeSettings, "requests_per_minute")
    max_image_side: int | None = _unset(DashScopeSettings, "max_image_side")
    answer_format: str | None = _unset(DashScopeSettings, "answer_format")
    caption_languages: str | None = _unset(DashScopeSettings, "caption_languages")
    # Three states, so that the launchpad shows what a run will do: unset is decided when the
    # run starts from the environment it runs in (a default baked in at load would show the
    # loading process's environment, not the run's).
    offline: bool | None = Field(
        default=None,
        description="unset (the default): decided when the run starts: the offline provider "
        "when DASHSCOPE_API_KEY is not set and the database is the embedded demo, or with "
        "ENRICH_OFFLINE=true; DashScope otherwise (a configured database without the key stops "
        "with one line naming the variable). true: the offline provider on purpose (no model "
        "is called, nothing is paid). false: DashScope only: a run without DASHSCOPE_API_KEY "
        "stops before its first call, even on the embedded demo",
    )

    _provider: Provider | None = PrivateAttr(default=None)
    _settings: DashScopeSettings | None = PrivateAttr(default=None)
    _images: ImagePolicy | None = PrivateAttr(default=None)
    _vocabulary: TagVocabulary | None = PrivateAttr(default=None)
    _question: Question | None = PrivateAttr(default=None)

    def api_settings(self) -> DashScopeSettings:
        names = (
            "api_key",
            "base_url",
            "vision_model",
            "embedding_model",
            "embedding_dimensions",
            "max_retries",
            "timeout",
            "requests_per_minute",
            "max_image_side",
            "answer_format",
            "caption_languages",
        )
        given = _given(self, names)
        if self.offline:
            given["offline"] = True
        return DashScopeSettings.from_env(None, given, {n: f"dashscope.{n}" for n in names})

    def setup_for_execution(self, context: InitResourceContext) -> None:
        settings = Settings.from_env(given={"dashscope": self.api_settings()})
        embedded = settings.db.embedded
        if self.offline is False and not settings.dashscope.api_key.get_secret_value():
            raise ConfigError(
                "dashscope.offline is false but DASHSCOPE_API_KEY is not set: export it, or "
                "leave offline unset for the offline demo"
            )
        self._settings = settings.dashscope
        self._images, self._vocabulary = run_policies(settings, embedded=embedded)
        self._question = question_of(self._settings, self._vocabulary)
        self._provider = build_provider(self._settings, embedded_db=embedded)

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        if self._provider is not None:
            self._provider.close()
            self._provider = None

    @property
    def settings(self) -> DashScopeSettings:
        assert self._settings is not None, "DashScopeResource used outside a run"
        return self._settings

    @property
    def provider(self) -> Provider:
        assert self._provider is not None, "DashScopeResource used outside a run"
        return self._provider

    @property
    def image_policy(self) -> ImagePolicy:
        assert self._images is not None, "DashScopeResource used outside a run"
        return self._images

    @property
    def vocabulary(self) -> TagVocabulary:
        assert self._vocabulary is not None, "DashScopeResource used outside a run"
        return self._vocabulary

    @property
    def question(self) -> Question:
        """What each vision call asks: the configured languages, the run's vocabulary."""
        assert self._question is not None, "DashScopeResource used outside a run"
        return self._question

    def provenance(self) -> Provenance:
        """What every caption of this resource's runs records of what made it."""
        provider, settings = self.provider, self.settings
        return Provenance(
            provider.model_label, settings.prompt_version, provider.offline, settings.languages
        )
