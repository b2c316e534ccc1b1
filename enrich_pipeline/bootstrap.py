"""One function builds what a run needs from the settings: the store, the provider, the image
policy and the tag vocabulary, with the embedded-or-deployed choice made here and only here.

The command lines, the Dagster resources and the launcher all start through ``open_runtime``
(or, for a provider alone, ``build_provider``), so they start the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from enrich_pipeline.db import embedded
from enrich_pipeline.db.quota import RateBudgetTable
from enrich_pipeline.db.store import Store
from enrich_pipeline.enrichment.images import ImagePolicy
from enrich_pipeline.enrichment.tags import DEFAULT_VOCABULARY, TagVocabulary
from enrich_pipeline.pipeline.engine import Engine
from enrich_pipeline.providers.base import Provider
from enrich_pipeline.providers.dashscope import DashScopeProvider
from enrich_pipeline.providers.offline import OfflineProvider
from enrich_pipeline.settings import (
    ConfigError,
    DashScopeSettings,
    DbSettings,
    RunSettings,
    Settings,
)


def build_provider(
    settings: DashScopeSettings, *, embedded_db: bool, db: DbSettings | None = None
) -> Provider:
    """The embedded demo falls back to offline with no key; a real database never does.

    With ``ENRICH_SHARED_QUOTA`` on (the default with a configured database) the provider paces
    on the rate budget in ``db`` (by default the database of the environment), shared with
    every other process on it."""
    offline = OfflineProvider(settings.embedding_dimensions, settings.image_embedding_dimensions)
    if settings.offline:
        return offline
    if not settings.api_key.get_secret_value():
        if embedded_db:
            return offline
        raise ConfigError(
            "DASHSCOPE_API_KEY is not set: export it (or pass --offline to use the offline "
            "provider on purpose)"
        )
    return DashScopeProvider(settings, budget=shared_budget(settings, embedded_db, db))


def shared_budget(
    settings: DashScopeSettings, embedded_db: bool, db: DbSettings | None = None
) -> RateBudgetTable | None:
    """The account's shared rate budget, or None to pace this process alone: on by default
    against a configured database (Dagster runs, CLI runs and batch collects all reach it), off
    for the embedded demo unless asked for."""
    wanted = settings.shared_quota if settings.shared_quota is not None else not embedded_db
    if not wanted or not (settings.requests_per_minute or settings.tokens_per_minute):
        return None
    db = db or DbSettings.from_env()
    if not db.conninfo.get_secret_value():
        if settings.shared_quota is not True:
            return None  # no database configured to share through
        db = embedded.resolve(db, seed=False)
    return RateBudgetTable(db)


def load_vocabulary(path: str) -> TagVocabulary:
    """The default vocabulary, extended by the user's file when one is configured."""
    if not path:
        return DEFAULT_VOCABULARY
    if not Path(path).is_file():
        raise ConfigError(f"ENRICH_TAG_VOCABULARY: no such file: {path}")
    try:
        return TagVocabulary.from_file(path)
    except ValueError as exc:
        raise ConfigError(f"ENRICH_TAG_VOCABULARY: {exc}") from None


def run_policies(settings: Settings, *, embedded: bool) -> tuple[ImagePolicy, TagVocabulary]:
    """How images are fetched (local paths only for the embedded demo) and tags derived."""
    return settings.images.policy(local_files=embedded), load_vocabulary(settings.tag_vocabulary)


@dataclass
class Runtime:
    """What a run needs, built once per process (or Dagster run) and closed at its end."""

    settings: Settings
    store: Store
    provider: Provider
    image_policy: ImagePolicy
    vocabulary: TagVocabulary

    def engine(self, run: RunSettings | None = None) -> Engine:
        return Engine(
            self.store,
            self.provider,
            self.settings.dashscope,
            run or self.settings.run,
            image_policy=self.image_policy,
            vocabulary=self.vocabulary,
        )

    def close(self) -> None:
        self.provider.close()
        self.store.close()


def open_store(settings: Settings, *, seed: bool = True, admin: bool = False) -> Store:
    """The configured database, or the embedded one (seeded with samples), checked and set up
    (``Store.setup``)."""
    store = Store(embedded.resolve(settings.db, seed=seed))
    try:
        store.setup(admin=admin)
    except BaseException:
        store.close()
        raise
    return store


def open_runtime(settings: Settings, *, seed: bool = True) -> Runtime:
    """Provider first (a missing key costs nothing), then the database, then the policies."""
    provider = build_provider(settings.dashscope, embedded_db=settings.db.embedded, db=settings.db)
    try:
        policy, vocabulary = run_policies(settings, embedded=settings.db.embedded)
        store = open_store(settings, seed=seed)
    except BaseException:
        provider.close()
        raise
    return Runtime(settings.with_(db=store.settings), store, provider, policy, vocabulary)
