"""Configuration read from the environment, in one place.

Everything here is plain data so the CLI, the Dagster resources and the tests build the same
objects. Secrets (the API key, the database password) are kept out of ``repr`` so that a settings
object printed in a log or an exception never leaks them.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from enrich_pipeline.enrichment.images import ImagePolicy

BEIJING_BASE_URL = "https://dashscope.aliyuncs.com/compatible-mode/v1"
DEFAULT_VISION_MODEL = "qwen3-vl-plus"
DEFAULT_EMBEDDING_MODEL = "text-embedding-v4"
DEFAULT_PROMPT = (
    "Describe this image in one or two sentences for a product catalogue: the main objects, "
    "their colors and materials, the style and the setting. Answer in English."
)
# Bump when DEFAULT_PROMPT changes in a way that should make old captions eligible for
# re-captioning; it is recorded with every caption.
DEFAULT_PROMPT_VERSION = "v1"


class ConfigError(Exception):
    """A configuration problem the user must fix; its message is one clear line."""


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None


@dataclass(frozen=True)
class DbSettings:
    """Where the items live. ``conninfo`` is a libpq string or URL; empty means "embedded"."""

    conninfo: str = field(default="", repr=False)
    namespace: str = "cleantab"
    table: str = "items"
    # Set once the embedded server has been started for these settings.
    embedded_server: bool = False

    @property
    def embedded(self) -> bool:
        """True for the embedded demo database (started or still to start)."""
        return self.embedded_server or not self.conninfo

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DbSettings:
        env = os.environ if env is None else env
        namespace = env.get("ADBPG_NAMESPACE") or "cleantab"
        table = env.get("ADBPG_TABLE") or "items"
        url = env.get("ADBPG_URL") or env.get("ADBPG_DSN") or ""
        if url:
            return cls(conninfo=url, namespace=namespace, table=table)
        host = env.get("ADBPG_HOST") or ""
        if not host:
            return cls(conninfo="", namespace=namespace, table=table)
        # A socket directory in ADBPG_HOST works as in libpq: make_conninfo passes it through.
        parts = {
            "host": host,
            "port": env.get("ADBPG_PORT") or "5432",
            "dbname": env.get("ADBPG_DBNAME") or "postgres",
            "user": env.get("ADBPG_USER") or None,
            "password": env.get("ADBPG_PASSWORD") or None,
        }
        return cls(
            conninfo=make_conninfo(**{k: v for k, v in parts.items() if v}),
            namespace=namespace,
            table=table,
        )

    def with_embedded_server(self, conninfo: str) -> DbSettings:
        return replace(self, conninfo=conninfo, embedded_server=True)

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


@dataclass(frozen=True)
class DashScopeSettings:
    """How to reach the model provider and how hard to push it."""

    api_key: str = field(default="", repr=False)
    base_url: str = BEIJING_BASE_URL
    vision_model: str = DEFAULT_VISION_MODEL
    embedding_model: str = DEFAULT_EMBEDDING_MODEL
    embedding_dimensions: int = 1024
    prompt: str = DEFAULT_PROMPT
    prompt_version: str = DEFAULT_PROMPT_VERSION
    timeout: float = 60.0
    max_retries: int = 3
    backoff_initial: float = 1.0
    backoff_max: float = 30.0
    max_image_side: int = 1024
    max_caption_tokens: int = 200
    # Client-side limits so that a run at high concurrency stays under the provider's quota
    # instead of living on 429 retries (qwen-vl default: about 1,200 requests a minute).
    requests_per_minute: int = 1200
    tokens_per_minute: int = 0  # 0 disables the token limit
    embedding_requests_per_minute: int = 1800
    offline: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DashScopeSettings:
        env = os.environ if env is None else env
        return cls(
            api_key=env.get("DASHSCOPE_API_KEY", ""),
            base_url=env.get("DASHSCOPE_BASE_URL") or BEIJING_BASE_URL,
            vision_model=env.get("DASHSCOPE_VISION_MODEL") or DEFAULT_VISION_MODEL,
            embedding_model=env.get("DASHSCOPE_EMBEDDING_MODEL") or DEFAULT_EMBEDDING_MODEL,
            embedding_dimensions=_int(env, "DASHSCOPE_EMBEDDING_DIMENSIONS", 1024),
            prompt_version=env.get("ENRICH_PROMPT_VERSION") or DEFAULT_PROMPT_VERSION,
            timeout=_float(env, "DASHSCOPE_TIMEOUT", 60.0),
            max_retries=_int(env, "DASHSCOPE_MAX_RETRIES", 3),
            backoff_initial=_float(env, "DASHSCOPE_BACKOFF_INITIAL", 1.0),
            max_image_side=_int(env, "ENRICH_MAX_IMAGE_SIDE", 1024),
            requests_per_minute=_int(env, "DASHSCOPE_RPM", 1200),
            tokens_per_minute=_int(env, "DASHSCOPE_TPM", 0),
            embedding_requests_per_minute=_int(env, "DASHSCOPE_EMBEDDING_RPM", 1800),
            offline=_bool(env, "ENRICH_OFFLINE", False),
        )

    def require_key(self) -> None:
        if not self.offline and not self.api_key:
            raise ConfigError(
                "DASHSCOPE_API_KEY is not set: export it, or pass --offline to use the "
                "offline provider"
            )


@dataclass(frozen=True)
class RunSettings:
    """Knobs of one enrichment run; defaults are the legacy script's."""

    batch_size: int = 10
    max_items: int | None = 100
    concurrent: int = 5
    caption_embedding: bool = True
    max_attempts: int = 3
    lease_seconds: int = 120
    color_count: int = 5
    # Re-caption rows the pipeline captioned with another model or prompt version (explicit).
    recaption: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {self.batch_size}")
        if self.concurrent < 1:
            raise ConfigError(f"concurrency must be at least 1, got {self.concurrent}")
        if self.max_items is not None and self.max_items < 0:
            raise ConfigError(f"max items must not be negative, got {self.max_items}")


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def image_policy_from_env(
    env: Mapping[str, str] | None = None, *, local_files: bool = False
) -> ImagePolicy:
    """Image fetching limits. Private networks stay refused unless explicitly allowed.

    Local paths are read only where ``local_files`` says so (the embedded demo) or
    ``ENRICH_ALLOW_LOCAL_FILES`` asks for it: a path in a real table must not become a way to
    read the worker's files.
    """
    env = os.environ if env is None else env
    default = ImagePolicy()
    networks = frozenset(
        n.strip() for n in (env.get("ENRICH_ALLOWED_NETWORKS") or "").split(",") if n.strip()
    )
    for network in networks:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError as exc:
            raise ConfigError(f"ENRICH_ALLOWED_NETWORKS: {exc}") from None
    positive = {
        "ENRICH_IMAGE_MAX_BYTES": _int(env, "ENRICH_IMAGE_MAX_BYTES", default.max_bytes),
        "ENRICH_IMAGE_MAX_PIXELS": _int(env, "ENRICH_IMAGE_MAX_PIXELS", default.max_pixels),
        "ENRICH_IMAGE_TIMEOUT": _float(env, "ENRICH_IMAGE_TIMEOUT", default.timeout),
    }
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{name} must be positive, got {value!r}")
    redirects = _int(env, "ENRICH_IMAGE_MAX_REDIRECTS", default.max_redirects)
    if redirects < 0:
        raise ConfigError(f"ENRICH_IMAGE_MAX_REDIRECTS must not be negative, got {redirects}")
    return ImagePolicy(
        max_bytes=int(positive["ENRICH_IMAGE_MAX_BYTES"]),
        max_pixels=int(positive["ENRICH_IMAGE_MAX_PIXELS"]),
        timeout=float(positive["ENRICH_IMAGE_TIMEOUT"]),
        max_redirects=redirects,
        allow_private_networks=_bool(env, "ENRICH_ALLOW_PRIVATE_NETWORKS", False),
        # CIDRs exempt from the SSRF guard (an internal image CDN, say), without opening every
        # private network.
        allowed_networks=networks,
        allow_local_files=_bool(env, "ENRICH_ALLOW_LOCAL_FILES", local_files),
    )
