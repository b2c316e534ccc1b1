"""The one settings tree: every knob's default, bounds, help text and variable, declared once.

The command lines take their flags' defaults and help from here, the Dagster ``Config`` classes
and resources their fields, the sensor its limits. Values are validated once, by pydantic; a bad
value becomes a ``ConfigError`` whose message is one line naming where the value came from (the
environment variable, the flag or the config field), never a traceback.

Secrets (the API key, the database password inside a connection string) are kept out of
``repr`` and out of every error message.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any, Self
from urllib.parse import urlsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from enrich_pipeline.enrichment.images import ImagePolicy
from enrich_pipeline.redaction import (
    DB_LOGGERS,
    HTTP_LOGGERS,
    conninfo_secrets,
    hide_in_logs,
    redact_source,
    url_secrets,
)

BEIJING_BASE_URL = "https://dashscope.aliyuncs.com/compatible-mode/v1"
DEFAULT_PROMPT = (
    "Describe this image in one or two sentences for a product catalogue: the main objects, "
    "their colors and materials, the style and the setting. Answer in English."
)
# text-embedding-v4's documented output sizes (v3 takes the ones up to 1024).
EMBEDDING_DIMENSIONS = (64, 128, 256, 512, 768, 1024, 1536, 2048)
PRICES_FORMAT = (
    'JSON like {"qwen3-vl-plus": [0.2, 1.6], "currency": "USD"} (per million input and '
    "output tokens; currency optional)"
)


def parse_prices(raw: str) -> tuple[dict[str, tuple[float, float]], str | None]:
    """``ENRICH_PRICES``: ``{model: [input, output] per million tokens}`` and an optional
    ``"currency"``. Raises ValueError with a one-line reason. Pure, so the settings tree can
    validate it when a command starts, before any call is made."""
    try:
        given = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"must be {PRICES_FORMAT}: {exc}") from None
    if not isinstance(given, dict):
        raise ValueError(f"must be a JSON object: {PRICES_FORMAT}")
    currency = given.pop("currency", None)
    if currency is not None and (not isinstance(currency, str) or not currency.strip()):
        raise ValueError(f'currency must be a name such as "USD", not {currency!r}')
    prices: dict[str, tuple[float, float]] = {}
    for model, pair in given.items():
        if not (
            isinstance(pair, list)
            and len(pair) == 2
            and all(
                isinstance(v, int | float)
                and not isinstance(v, bool)
                and math.isfinite(v)
                and v >= 0
                for v in pair
            )
        ):
            raise ValueError(
                f"{model!r} must be two numbers [input, output] (non-negative, per million "
                f"tokens), not {pair!r}"
            )
        prices[str(model)] = (float(pair[0]), float(pair[1]))
    return prices, currency.strip().upper() if currency else None


class ConfigError(Exception):
    """A configuration problem the user must fix; its message is one clear line."""


def setting(
    default: Any,
    description: str,
    *,
    env: str | None = None,
    secret: bool = False,
    url: bool = False,
    **bounds: Any,
) -> Any:
    """A settings field: its default, its help text, the variable it is read from, its bounds
    (``ge``, ``le``, ``gt``, ``min_length``...). ``secret``: never shown; ``url``: may carry
    credentials, shown redacted (in ``repr`` and in errors)."""
    extra: dict[str, Any] = {"env": env} if env else {}
    if secret:
        extra["secret"] = True
    if url:
        extra["url"] = True
    return Field(
        default, description=description, repr=not secret, json_schema_extra=extra, **bounds
    )


def env_name(model: type[BaseModel], name: str) -> str | None:
    extra = model.model_fields[name].json_schema_extra
    return extra.get("env") if isinstance(extra, dict) else None  # type: ignore[return-value]


def _is_url(model: type[BaseModel], name: str) -> bool:
    info = model.model_fields.get(name)
    extra = info.json_schema_extra if info is not None else None
    return isinstance(extra, dict) and bool(extra.get("url"))


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


class _Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    @classmethod
    def build(cls, values: Mapping[str, Any], sources: Mapping[str, str] | None = None) -> Self:
        """Validate ``values``; an error names the value's source (variable, flag, config key).

        Every bad value is in the one line (the first one leads), so a user with two junk
        variables fixes both at once.
        """
        try:
            return cls.model_validate(dict(values))
        except ValidationError as exc:
            problems = [cls._problem(error, sources or {}) for error in exc.errors()]
            raise ConfigError("; ".join(dict.fromkeys(problems))) from None

    @classmethod
    def _problem(cls, error: Any, sources: Mapping[str, str]) -> str:
        name = str(error["loc"][0]) if error["loc"] else ""
        where = sources.get(name) or env_name(cls, name) or name
        info = cls.model_fields.get(name)
        secret = info is not None and not info.repr
        value = error.get("input")
        if secret:
            got = ""
        elif _is_url(cls, name) and isinstance(value, str):
            got = f", got {redact_source(value)!r}"
        else:
            got = f", got {value!r}"
        message = error["msg"].removeprefix("Value error, ")
        return f"{where}: {message[:1].lower()}{message[1:]}{got}"

    def __repr_args__(self) -> Any:
        # A URL field may carry credentials (user:password@, ?api-key=): shown redacted.
        for name, value in super().__repr_args__():
            if name and isinstance(value, str) and _is_url(type(self), name):
                yield name, redact_source(value)
            else:
                yield name, value

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
        values: dict[str, Any] = {}
        named: dict[str, str] = {}
        for name in cls.model_fields:
            var = env_name(cls, name)
            raw = env.get(var, "") if var else ""
            if raw.strip():
                values[name] = raw.strip()
                named[name] = var  # type: ignore[assignment]
        for name, value in (given or {}).items():
            values[name] = value
            named[name] = (sources or {}).get(name, name)
        return cls.build(values, named)

    def with_(self, **changes: Any) -> Self:
        """A validated copy with some fields changed."""
        return type(self).build({**self.model_dump(), **changes})


class DbSettings(_Settings):
    """Where the items live. ``conninfo`` is a libpq string or URL; empty means "embedded"."""

    conninfo: str = setting("", "libpq connection string or URL", env="ADBPG_URL", secret=True)
    namespace: str = setting(
        "cleantab", "schema of the items table", env="ADBPG_NAMESPACE", min_length=1, max_length=63
    )
    table: str = setting("items", "items table", env="ADBPG_TABLE", min_length=1, max_length=63)
    max_connections: int = setting(
        8,
        "connections in the pool of one process (a run, a sensor, a CLI)",
        env="ADBPG_MAX_CONNECTIONS",
        ge=1,
        le=200,
    )
    statement_timeout_ms: int = setting(
        120_000,
        "statement timeout of the pipeline's sessions, in ms",
        env="ADBPG_STATEMENT_TIMEOUT_MS",
        ge=100,
        le=86_400_000,
    )
    connect_timeout: int = setting(
        5, "seconds to wait for a connection", env="ADBPG_CONNECT_TIMEOUT", ge=1, le=600
    )
    failover_seconds: float = setting(
        60,
        "how long a run waits for the database to come back (a failover drops connections "
        "for about 30 s)",
        env="ADBPG_FAILOVER_SECONDS",
        ge=0,
        le=3600,
    )
    # Set once the embedded server has been started for these settings.
    embedded_server: bool = False

    @property
    def embedded(self) -> bool:
        """True for the embedded demo database (started or still to start)."""
        return self.embedded_server or not self.conninfo

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        given: Mapping[str, Any] | None = None,
        sources: Mapping[str, str] | None = None,
    ) -> Self:
        env = os.environ if env is None else env
        if not (env.get("ADBPG_URL") or env.get("ADBPG_DSN")) and env.get("ADBPG_HOST"):
            env = {**env, "ADBPG_URL": _conninfo_from_parts(env)}
        elif env.get("ADBPG_DSN") and not env.get("ADBPG_URL"):
            env = {**env, "ADBPG_URL": env["ADBPG_DSN"]}
        return super().from_env(env, given, sources)

    @field_validator("conninfo")
    @classmethod
    def _valid_conninfo(cls, value: str) -> str:
        return checked_conninfo(value)

    @model_validator(mode="after")
    def _hidden_in_logs(self) -> Self:
        # From the moment it is read, the password appears as *** in the database driver's
        # and the pool's log lines.
        hide_in_logs(self.secrets(), DB_LOGGERS)
        return self

    def secrets(self) -> tuple[str, ...]:
        """The secrets in the connection string, in the forms a log line could show them."""
        return conninfo_secrets(self.conninfo)

    def with_embedded_server(self, conninfo: str) -> DbSettings:
        return self.with_(conninfo=conninfo, embedded_server=True)

    def redacted(self) -> str:
        """The connection target with the password removed, for reports and logs."""
        if self.embedded:
            return "embedded PostgreSQL"
        try:
            params = conninfo_to_dict(self.conninfo)
        except Exception:
            return "<unparsable connection string>"
        params.pop("password", None)
        user, host = params.get("user") or "?", params.get("host", "localhost")
        return f"{user}@{host}:{params.get('port', 5432)}/{params.get('dbname', '?')}"


# A "%" that does not start a %XX escape: libpq refuses the whole URL, and its message quotes the
# token (the password, say) back to every log and terminal.
_BARE_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_QUOTED = re.compile(r'"[^"]*"')


def checked_conninfo(value: str) -> str:
    """``value`` if libpq can parse it; a URL whose password (or any part) holds a bare ``%``
    is read leniently (the ``%`` is meant literally: nothing else can be meant) and
    re-encoded. Anything else unparsable is an error that quotes nothing back."""
    if not value:
        return value
    try:
        params = conninfo_to_dict(value)
    except psycopg.ProgrammingError as exc:
        fixed = _BARE_PERCENT.sub("%25", value)
        is_url = value.lstrip().lower().startswith(("postgresql://", "postgres://"))
        try:
            if not is_url or fixed == value:
                raise
            params = conninfo_to_dict(fixed)
            value = fixed
        except psycopg.ProgrammingError:
            # libpq quotes the offending token, which may be the password: never echo it
            # (quoted punctuation such as "=" stays: it says what is missing).
            reason = _QUOTED.sub(_unquoted, (str(exc).strip().splitlines() or ["?"])[0])
            raise ValueError(f"not a valid libpq connection string or URL ({reason})") from None
    for port in str(params.get("port") or "").split(","):
        if port.strip() and not (port.strip().isdigit() and 1 <= int(port) <= 65535):
            raise ValueError(f"port must be a number from 1 to 65535, got {port.strip()!r}")
    return value


def _unquoted(match: re.Match[str]) -> str:
    token = match[0][1:-1]
    return match[0] if len(token) <= 2 and not any(c.isalnum() for c in token) else '"..."'


def _conninfo_from_parts(env: Mapping[str, str]) -> str:
    port = (env.get("ADBPG_PORT") or "").strip() or "5432"
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"ADBPG_PORT: must be a port number (1-65535), got {port!r}")
    # A socket directory in ADBPG_HOST works as in libpq: make_conninfo passes it through.
    parts = {
        "host": env.get("ADBPG_HOST"),
        "port": port,
        "dbname": env.get("ADBPG_DBNAME") or "postgres",
        "user": env.get("ADBPG_USER") or None,
        "password": env.get("ADBPG_PASSWORD") or None,
    }
    return make_conninfo(**{k: v for k, v in parts.items() if v})


class DashScopeSettings(_Settings):
    """How to reach the model provider and how hard to push it."""

    api_key: str = setting("", "DashScope API key", env="DASHSCOPE_API_KEY", secret=True)
    base_url: str = setting(
        BEIJING_BASE_URL,
        "OpenAI-compatible base URL (Beijing, Singapore, or any compatible server)",
        env="DASHSCOPE_BASE_URL",
        url=True,
        min_length=1,
        max_length=2000,
    )
    vision_model: str = setting(
        "qwen3-vl-plus",
        "Qwen-VL model for captions",
        env="DASHSCOPE_VISION_MODEL",
        min_length=1,
        max_length=200,
    )
    embedding_model: str = setting(
        "text-embedding-v4",
        "text embedding model for captions",
        env="DASHSCOPE_EMBEDDING_MODEL",
        min_length=1,
        max_length=200,
    )
    embedding_dimensions: int = setting(
        1024, "dimensions of caption embeddings", env="DASHSCOPE_EMBEDDING_DIMENSIONS"
    )
    prompt: str = setting(DEFAULT_PROMPT, "the caption prompt", min_length=1, max_length=20_000)
    # Bump when the prompt changes in a way that should make old captions eligible for
    # re-captioning; it is recorded with every caption.
    prompt_version: str = setting(
        "v1",
        "version recorded with every caption",
        env="ENRICH_PROMPT_VERSION",
        min_length=1,
        max_length=100,
    )
    timeout: float = setting(
        60.0, "seconds a model call may take", env="DASHSCOPE_TIMEOUT", gt=0, le=3600
    )
    max_retries: int = setting(
        3, "retries of a transient API failure", env="DASHSCOPE_MAX_RETRIES", ge=0, le=20
    )
    backoff_initial: float = setting(
        1.0, "first retry backoff, in s", env="DASHSCOPE_BACKOFF_INITIAL", gt=0, le=600
    )
    backoff_max: float = setting(30.0, "longest retry backoff, in s", gt=0, le=3600)
    max_image_side: int = setting(
        896,
        "longer side of the image sent to the model, in px (snapped to the model's patch grid)",
        env="ENRICH_MAX_IMAGE_SIDE",
        ge=64,
        le=2048,
    )
    max_caption_tokens: int = setting(200, "max_tokens of a caption call", ge=16, le=8192)
    # Client-side limits so that a run at high concurrency stays under the provider's quota
    # instead of living on 429 retries. DashScope's qwen-vl defaults: about 1,200 requests and
    # 1,000,000 tokens a minute per account and model, also enforced per second (RPM/60,
    # TPM/60); check the console (Monitoring) or GET /api/v1/quotas for the account's own.
    requests_per_minute: int = setting(
        1200,
        "request quota of the vision model per minute (0: not limited, e.g. a local server)",
        env="DASHSCOPE_RPM",
        ge=0,
        le=10**6,
    )
    tokens_per_minute: int = setting(
        1_000_000,
        "token quota of the vision model per minute, input plus output (0: not limited)",
        env="DASHSCOPE_TPM",
        ge=0,
        le=10**9,
    )
    rate_per_second: bool = setting(
        True,
        "also pace per second (RPM/60, TPM/60), as DashScope enforces",
        env="DASHSCOPE_RATE_PER_SECOND",
    )
    rate_margin: float = setting(
        0.05,
        "share of each second held back for network jitter (0.05: pace at 95% of the quota)",
        env="DASHSCOPE_RATE_MARGIN",
        ge=0,
        le=1,
    )
    shared_quota: bool | None = setting(
        None,
        "share one rate budget per model with every process on the same database "
        "(default: on with a configured database, off for the embedded demo)",
        env="ENRICH_SHARED_QUOTA",
    )
    prices: str = setting(
        "",
        "price table for cost estimates, merged over the region's list prices",
        env="ENRICH_PRICES",
    )
    embedding_requests_per_minute: int = setting(
        1800,
        "request quota of the embedding model per minute (0: not limited)",
        env="DASHSCOPE_EMBEDDING_RPM",
        ge=0,
        le=10**6,
    )
    offline: bool = setting(False, "use the offline provider on purpose", env="ENRICH_OFFLINE")

    @field_validator("api_key")
    @classmethod
    def _printable_key(cls, value: str) -> str:
        # A key with a line break or a space inside would be sent as a broken header, and
        # the HTTP library's error quotes the header (the key) back.
        if any(ch.isspace() or not ch.isprintable() for ch in value):
            raise ValueError("must not contain spaces, line breaks or control characters")
        return value

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises on a junk port
        except ValueError:
            raise ValueError("not a valid URL") from None
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        return value

    @property
    def base_url_shown(self) -> str:
        """The base URL without the credentials it may carry, for reports, logs and tables."""
        return redact_source(self.base_url)

    def url_secrets(self) -> tuple[str, ...]:
        """The credentials inside the base URL (user:password@, secret-looking query values)."""
        return url_secrets(self.base_url)

    @field_validator("prices")
    @classmethod
    def _prices(cls, value: str) -> str:
        if value.strip():
            parse_prices(value)
        return value

    @field_validator("embedding_dimensions")
    @classmethod
    def _known_dimensions(cls, value: int) -> int:
        if value not in EMBEDDING_DIMENSIONS:
            raise ValueError(f"must be one of {', '.join(map(str, EMBEDDING_DIMENSIONS))}")
        return value

    @model_validator(mode="after")
    def _hidden_in_logs(self) -> Self:
        # From the moment they are read, the key and the base URL's credentials appear as ***
        # in the HTTP client's log lines (which show request URLs), whichever path logs them.
        hide_in_logs((*self.url_secrets(), self.api_key), HTTP_LOGGERS)
        return self

    def require_key(self) -> None:
        if not self.offline and not self.api_key:
            raise ConfigError(
                "DASHSCOPE_API_KEY is not set: export it, or pass --offline to use the "
                "offline provider"
            )


# The Dagster job's chunk size. The legacy CLI writes every 10 rows; a Dagster chunk is a
# step per op, so chunks of 10 would cost five steps per 10 rows in event-log writes and step
# start-up. 100 keeps a chunk's loss on a crash small and the step overhead under 1%.
DAGSTER_BATCH_SIZE = 100


class RunSettings(_Settings):
    """Knobs of one enrichment run; defaults are the legacy script's."""

    batch_size: int = setting(
        10, "items per chunk (each chunk is written as soon as it is done)", ge=1, le=10_000
    )
    max_items: int | None = setting(
        100, "items to process at most in this run (None: no limit)", ge=1, le=10**9
    )
    concurrent: int = setting(5, "model calls in flight at once", ge=1, le=256)
    caption_embedding: bool = setting(True, "embed the captions")
    max_attempts: int = setting(
        3,
        "attempts before a transiently failing row is left out",
        env="ENRICH_MAX_ATTEMPTS",
        ge=1,
        le=100,
    )
    lease_seconds: int = setting(
        120,
        "claim lease in s: rows of a run that died come back after it (live runs renew theirs)",
        env="ENRICH_LEASE_SECONDS",
        ge=1,
        le=7 * 86_400,
    )
    color_count: int = setting(5, "dominant colors per image at most", ge=1, le=12)
    recaption: bool = setting(
        False, "re-caption rows captioned with another model or prompt version"
    )


class ImageSettings(_Settings):
    """Image fetching limits. Private networks stay refused unless explicitly allowed."""

    max_bytes: int = setting(
        20 * 1024 * 1024,
        "largest image file, in bytes",
        env="ENRICH_IMAGE_MAX_BYTES",
        gt=0,
        le=1024 * 1024 * 1024,
    )
    max_pixels: int = setting(
        50_000_000, "largest image, in pixels", env="ENRICH_IMAGE_MAX_PIXELS", gt=0, le=10**9
    )
    timeout: float = setting(
        15.0, "seconds to fetch one image", env="ENRICH_IMAGE_TIMEOUT", gt=0, le=600
    )
    max_redirects: int = setting(
        5, "redirects followed per image", env="ENRICH_IMAGE_MAX_REDIRECTS", ge=0, le=20
    )
    allow_private_networks: bool = setting(
        False,
        "allow image URLs on loopback/private/link-local addresses",
        env="ENRICH_ALLOW_PRIVATE_NETWORKS",
    )
    allowed_networks: str = setting(
        "", "comma-separated CIDRs exempt from the SSRF guard", env="ENRICH_ALLOWED_NETWORKS"
    )
    # None: only where the database is the embedded demo.
    allow_local_files: bool | None = setting(
        None, "allow local paths in the image column", env="ENRICH_ALLOW_LOCAL_FILES"
    )

    @field_validator("allowed_networks")
    @classmethod
    def _networks(cls, value: str) -> str:
        for network in (n.strip() for n in value.split(",")):
            if network:
                try:
                    ipaddress.ip_network(network, strict=False)
                except ValueError as exc:
                    raise ValueError(str(exc)) from None
        return value

    def policy(self, *, local_files: bool = False) -> ImagePolicy:
        """The domain's image policy. Local paths are read only where ``local_files`` says so
        (the embedded demo) or the setting asks for it: a path in a real table must not become
        a way to read the worker's files."""
        return ImagePolicy(
            max_bytes=self.max_bytes,
            max_pixels=self.max_pixels,
            timeout=self.timeout,
            max_redirects=self.max_redirects,
            allow_private_networks=self.allow_private_networks,
            # CIDRs exempt from the SSRF guard (an internal image CDN, say), without opening
            # every private network.
            allowed_networks=frozenset(
                n.strip() for n in self.allowed_networks.split(",") if n.strip()
            ),
            allow_local_files=local_files
            if self.allow_local_files is None
            else self.allow_local_files,
        )


class AutomationSettings(_Settings):
    """The Dagster deployment's sensors, run queue and op pools."""

    sensor_interval: int = setting(
        30,
        "seconds between ticks of the pending-rows sensor",
        env="ENRICH_SENSOR_INTERVAL",
        ge=1,
        le=86_400,
    )
    batch_poll_interval: int = setting(
        60,
        "seconds between polls of open DashScope batches",
        env="ENRICH_BATCH_POLL_INTERVAL",
        ge=1,
        le=86_400,
    )
    max_concurrent_runs: int = setting(
        4, "runs at once in the Dagster queue", env="ENRICH_MAX_CONCURRENT_RUNS", ge=1, le=100
    )
    dashscope_pool_slots: int = setting(
        4, "caption/embedding steps at once", env="ENRICH_DASHSCOPE_POOL_SLOTS", ge=1, le=100
    )
    adbpg_pool_slots: int = setting(
        8, "claim/write steps at once", env="ENRICH_ADBPG_POOL_SLOTS", ge=1, le=100
    )


# DashScope's Batch API: requests and bytes in one batch file.
BATCH_MAX_LINES = 50_000
BATCH_MAX_BYTES = 500 * 1024 * 1024


class BatchSettings(_Settings):
    """Batch mode (DashScope's Batch API) submissions."""

    max_items: int | None = setting(
        None, "rows to submit at most (None: every pending row)", ge=1, le=10**9
    )
    max_lines: int = setting(BATCH_MAX_LINES, "lines per batch file", ge=1, le=BATCH_MAX_LINES)
    max_bytes: int = setting(BATCH_MAX_BYTES, "bytes per batch file", ge=1, le=BATCH_MAX_BYTES)
    # The rows stay claimed a little longer than the provider's window; every poll renews
    # them, so they come back to the online path on their own only if nobody polls any more.
    lease_seconds: int = setting(
        25 * 3600, "claim lease of submitted rows, in s", ge=3600, le=15 * 86_400
    )
    chunk_size: int = setting(100, "rows claimed and loaded at once", ge=1, le=10_000)


class Settings(_Settings):
    """Everything a process needs, read from the environment in one go."""

    db: DbSettings = Field(default_factory=DbSettings)
    dashscope: DashScopeSettings = Field(default_factory=DashScopeSettings)
    run: RunSettings = Field(default_factory=RunSettings)
    images: ImageSettings = Field(default_factory=ImageSettings)
    tag_vocabulary: str = setting(
        "", "JSON file extending the tag vocabulary", env="ENRICH_TAG_VOCABULARY"
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
        models: dict[str, type[_Settings]] = {
            "db": DbSettings,
            "dashscope": DashScopeSettings,
            "run": RunSettings,
            "images": ImageSettings,
        }
        parts: dict[str, Any] = {
            "tag_vocabulary": (env.get("ENRICH_TAG_VOCABULARY") or "").strip(),
        }
        problems: list[str] = []
        for name, model in models.items():
            if name in given:
                continue
            try:
                parts[name] = model.from_env(env)
            except ConfigError as exc:
                problems.append(str(exc))
        try:
            settings = cls.build({**parts, **given}, sources)
        except ConfigError as exc:
            problems.append(str(exc))
        if problems:
            raise ConfigError("; ".join(problems))
        return settings
