"""What every settings model shares: where its values come from, how a bad one is reported.

Each field names its environment variable once, as its ``validation_alias`` (an
``AliasChoices`` where an older name is still read); the command lines take their flags'
defaults and help from the fields (``describe``, ``env_name``), the Dagster config fields their
descriptions and bounds (``bounds``). Values are validated once, by pydantic; a bad value
becomes a ``ConfigError`` whose message is one line naming where the value came from (the
variable, the flag or the config field), never a traceback.

A model built in code (``DbSettings(conninfo=...)``, ``with_``) is exactly what it was given;
the environment is read where ``from_env`` says so, through pydantic-settings' own variable
source, so a test or a Dagster config never picks up a variable behind the caller's back.

Secrets are ``SecretStr`` fields: never shown by ``repr``, ``model_dump`` or an error. A
``CredentialedUrl`` field may carry credentials (``user:password@``, ``?api-key=``): it holds a
``SecretUrl``, shown redacted by ``str``, ``repr``, ``model_dump`` (JSON too) and errors; the
URL itself is ``get_secret_value()``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Annotated, Any, Self

from pydantic import AliasChoices, BaseModel, PlainSerializer, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from enrich_pipeline.redaction import redact_source


class ConfigError(Exception):
    """A configuration problem the user must fix; its message is one clear line."""


class _ShownRedacted:
    """Marks a URL field that may carry credentials."""


class SecretUrl(SecretStr):
    """A URL that may carry credentials: shown without them (``redact_source``) wherever it is
    printed or dumped, given whole only by ``get_secret_value()`` (to the HTTP client)."""

    def _display(self) -> str:
        return redact_source(self.get_secret_value())


CredentialedUrl = Annotated[
    SecretUrl, _ShownRedacted(), PlainSerializer(lambda url: str(url), when_used="json")
]


def variables(model: type[BaseModel], name: str) -> tuple[str, ...]:
    """The variables a field is read from, the preferred one first (none: not read from the
    environment)."""
    alias = model.model_fields[name].validation_alias
    if isinstance(alias, str):
        return (alias,)
    if isinstance(alias, AliasChoices):
        return tuple(choice for choice in alias.choices if isinstance(choice, str))
    return ()


def env_name(model: type[BaseModel], name: str) -> str | None:
    """The variable that sets a field, as the help and the errors name it."""
    return next(iter(variables(model, name)), None)


def describe(model: type[BaseModel], name: str) -> str:
    """The field's help text, with the variable that sets it."""
    info = model.model_fields[name]
    var = env_name(model, name)
    return f"{info.description}" + (f" ({var})" if var else "")


def bounds(info: FieldInfo) -> dict[str, Any]:
    """``ge``/``le``/``gt``/``lt`` of a field, to give a Dagster config field the same ones."""
    out: dict[str, Any] = {}
    for item in info.metadata:
        for key in ("ge", "le", "gt", "lt"):
            if getattr(item, key, None) is not None:
                out[key] = getattr(item, key)
    return out


def _is_secret(info: FieldInfo | None) -> bool:
    return info is not None and info.annotation is SecretStr


def _is_url(info: FieldInfo | None) -> bool:
    return info is not None and any(isinstance(m, _ShownRedacted) for m in info.metadata)


class _Variables(EnvSettingsSource):
    """pydantic-settings' variable source over a given mapping (``os.environ`` or a test's),
    limited to the variables the model names: a field without one is never read, whatever
    variable happens to share its name. Values are stripped; a blank one counts as unset."""

    def __init__(self, model: type[BaseSettings], env: Mapping[str, str]) -> None:
        known = {var for name in model.model_fields for var in variables(model, name)}
        self._given = {k: v.strip() for k, v in env.items() if k in known and v.strip()}
        super().__init__(model, case_sensitive=True, env_ignore_empty=True)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return self._given


class SettingsModel(BaseSettings):
    """A settings model: frozen, no unknown keys, defaults validated too."""

    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        validate_default=True,
        # A value may be a secret: pydantic's own message (a model built in code) does not
        # quote it; ``build`` words every error itself.
        hide_input_in_errors=True,
        validate_by_name=True,
        validate_by_alias=True,
        case_sensitive=True,
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Built in code, a model holds what it was given; ``from_env`` reads the variables.
        return (init_settings,)

    @classmethod
    def build(cls, values: Mapping[str, Any], sources: Mapping[str, str] | None = None) -> Self:
        """Validate ``values`` (by field name); an error names the value's source (variable,
        flag, config key).

        Every bad value is in the one line (the first one leads), so a user with two junk
        variables fixes both at once.
        """
        try:
            return cls.model_validate(dict(values))
        except ValidationError as exc:
            problems = [cls._problem(error, sources or {}) for error in exc.errors()]
            raise ConfigError("; ".join(dict.fromkeys(problems))) from None

    @classmethod
    def _field_at(cls, key: str) -> str:
        """The field an error's location names: its name, or one of its variables."""
        if key in cls.model_fields:
            return key
        return next((n for n in cls.model_fields if key in variables(cls, n)), key)

    @classmethod
    def _problem(cls, error: Any, sources: Mapping[str, str]) -> str:
        name = cls._field_at(str(error["loc"][0])) if error["loc"] else ""
        info = cls.model_fields.get(name)
        where = sources.get(name) or (env_name(cls, name) if info else None) or name
        value = error.get("input")
        if _is_secret(info) or len(error["loc"]) > 1:
            # A secret, or a value inside a part (``db``'s ``conninfo``, say): not echoed.
            got = ""
        elif _is_url(info) and isinstance(value, str | SecretStr):
            shown = value if isinstance(value, str) else value.get_secret_value()
            got = f", got {redact_source(shown)!r}"
        else:
            got = f", got {value!r}"
        message = error["msg"].removeprefix("Value error, ")
        return f"{where}: {message[:1].lower()}{message[1:]}{got}"

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        given: Mapping[str, Any] | None = None,
        sources: Mapping[str, str] | None = None,
    ) -> Self:
        """Defaults, then the environment, then ``given`` (flags, config fields; a key that is
        present wins, None included). ``sources`` names where each given value came from."""
        env = os.environ if env is None else env
        found = _Variables(cls, env)()
        values: dict[str, Any] = {}
        named: dict[str, str] = {}
        for key, value in found.items():
            name = cls._field_at(key)
            values[name] = value
            # The variable actually set, where a field has more than one.
            named[name] = next(v for v in variables(cls, name) if (env.get(v) or "").strip())
        for name, value in (given or {}).items():
            values[name] = value
            named[name] = (sources or {}).get(name, name)
        return cls.build(values, named)

    def with_(self, **changes: Any) -> Self:
        """A validated copy with some fields changed."""
        return type(self).build(
            {**{n: getattr(self, n) for n in type(self).model_fields}, **changes}
        )
