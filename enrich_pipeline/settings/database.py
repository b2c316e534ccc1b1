"""Where the items live: the database, the items table, the pool's limits."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Self

from pydantic import AliasChoices, Field, SecretStr, field_validator

from enrich_pipeline.redaction import conninfo_secrets
from enrich_pipeline.settings.conninfo import checked_conninfo, conninfo_from_parts, conninfo_shown
from enrich_pipeline.settings.framework import SettingsModel


class DbSettings(SettingsModel):
    """Where the items live. ``conninfo`` is a libpq string or URL; empty means "embedded"."""

    # Secret as a whole: the password may sit anywhere in it (user:pw@, password=, ?password=).
    conninfo: SecretStr = Field(
        SecretStr(""),
        description="libpq connection string or URL",
        validation_alias=AliasChoices("ADBPG_URL", "ADBPG_DSN"),
    )
    namespace: str = Field(
        "cleantab",
        description="schema of the items table",
        validation_alias="ADBPG_NAMESPACE",
        min_length=1,
        max_length=63,
    )
    table: str = Field(
        "items",
        description="items table",
        validation_alias="ADBPG_TABLE",
        min_length=1,
        max_length=63,
    )
    max_connections: int = Field(
        8,
        description="connections in the pool of one process (a run, a sensor, a CLI)",
        validation_alias="ADBPG_MAX_CONNECTIONS",
        ge=1,
        le=200,
    )
    statement_timeout_ms: int = Field(
        120_000,
        description="statement timeout of the pipeline's sessions, in ms",
        validation_alias="ADBPG_STATEMENT_TIMEOUT_MS",
        ge=100,
        le=86_400_000,
    )
    connect_timeout: int = Field(
        5,
        description="seconds to wait for a connection",
        validation_alias="ADBPG_CONNECT_TIMEOUT",
        ge=1,
        le=600,
    )
    failover_seconds: float = Field(
        60,
        description="how long a run waits for the database to come back (a failover drops "
        "connections for about 30 s)",
        validation_alias="ADBPG_FAILOVER_SECONDS",
        ge=0,
        le=3600,
    )
    # Set once the embedded server has been started for these settings.
    embedded_server: bool = False

    @property
    def embedded(self) -> bool:
        """True for the embedded demo database (started or still to start)."""
        return self.embedded_server or not self.conninfo.get_secret_value()

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        given: Mapping[str, Any] | None = None,
        sources: Mapping[str, str] | None = None,
    ) -> Self:
        """As every model's, and ``ADBPG_HOST`` with its ``ADBPG_*`` parts where no URL is set."""
        env = os.environ if env is None else env
        if not (env.get("ADBPG_URL") or env.get("ADBPG_DSN")) and env.get("ADBPG_HOST"):
            env = {**env, "ADBPG_URL": conninfo_from_parts(env)}
        return super().from_env(env, given, sources)

    @field_validator("conninfo")
    @classmethod
    def _valid_conninfo(cls, value: SecretStr) -> SecretStr:
        checked = checked_conninfo(value.get_secret_value())
        return value if checked == value.get_secret_value() else SecretStr(checked)

    def secrets(self) -> tuple[str, ...]:
        """The secrets in the connection string, in the forms a log line could show them."""
        return conninfo_secrets(self.conninfo.get_secret_value())

    def with_embedded_server(self, conninfo: str) -> DbSettings:
        return self.with_(conninfo=conninfo, embedded_server=True)

    def redacted(self) -> str:
        """The connection target with the password removed, for reports and logs."""
        if self.embedded:
            return "embedded PostgreSQL"
        return conninfo_shown(self.conninfo.get_secret_value())
