"""How to reach the model provider (DashScope, or any OpenAI-compatible server) and how hard to
push it."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationInfo, field_validator

from enrich_pipeline.enrichment.words import LANGUAGE_CODE
from enrich_pipeline.redaction import redact_source, url_secrets
from enrich_pipeline.settings.framework import (
    ConfigError,
    CredentialedUrl,
    SecretUrl,
    SettingsModel,
)
from enrich_pipeline.settings.image_models import IMAGE_MODELS, image_model
from enrich_pipeline.settings.prices import parse_prices

BEIJING_BASE_URL = "https://dashscope.aliyuncs.com/compatible-mode/v1"
DEFAULT_PROMPT = (
    "Describe this image in one or two sentences for a product catalogue: the main objects, "
    "their colors and materials, the style and the setting. Answer in English."
)
MAX_URL = 2000
MAX_LANGUAGES = 5
# text-embedding-v4's documented output sizes (v3 takes the ones up to 1024).
EMBEDDING_DIMENSIONS = (64, 128, 256, 512, 768, 1024, 1536, 2048)


class DashScopeSettings(SettingsModel):
    """How to reach the model provider and how hard to push it."""

    api_key: SecretStr = Field(
        SecretStr(""), description="DashScope API key", validation_alias="DASHSCOPE_API_KEY"
    )
    base_url: CredentialedUrl = Field(
        BEIJING_BASE_URL,
        description="OpenAI-compatible base URL (Beijing, Singapore, or any compatible server)",
        validation_alias="DASHSCOPE_BASE_URL",
    )
    vision_model: str = Field(
        "qwen3-vl-plus",
        description="Qwen-VL model for captions",
        validation_alias="DASHSCOPE_VISION_MODEL",
        min_length=1,
        max_length=200,
    )
    embedding_model: str = Field(
        "text-embedding-v4",
        description="text embedding model for captions",
        validation_alias="DASHSCOPE_EMBEDDING_MODEL",
        min_length=1,
        max_length=200,
    )
    embedding_dimensions: int = Field(
        1024,
        description="dimensions of caption embeddings",
        validation_alias="DASHSCOPE_EMBEDDING_DIMENSIONS",
    )
    # Off by default: image vectors are a second paid call per image (RESEARCH20 §4 prices).
    image_embedding_model: str = Field(
        "",
        description="multimodal embedding model for image vectors (e.g. "
        "tongyi-embedding-vision-plus); empty: images are not embedded",
        validation_alias="ENRICH_IMAGE_EMBEDDING_MODEL",
        max_length=200,
    )
    image_embedding_dimensions: int | None = Field(
        None,
        description="dimensions of image embeddings (default: the model's default)",
        validation_alias="ENRICH_IMAGE_EMBEDDING_DIMENSIONS",
        ge=1,
        le=16_000,
    )
    # Not documented for the multimodal embedding models (RESEARCH20 §2, NOT FOUND): the vision
    # model's default, so that image vectors never pace a run below the captions they follow;
    # a 429 is throttling like any other call's.
    image_embedding_requests_per_minute: int = Field(
        1200,
        description="request quota of the image embedding model per minute (0: not limited)",
        validation_alias="ENRICH_IMAGE_EMBEDDING_RPM",
        ge=0,
        le=10**6,
    )
    prompt: str = Field(
        DEFAULT_PROMPT, description="the caption prompt", min_length=1, max_length=20_000
    )
    # Bump when the prompt changes in a way that should make old captions eligible for
    # re-captioning; it is recorded with every caption.
    prompt_version: str = Field(
        "v1",
        description="version recorded with every caption",
        validation_alias="ENRICH_PROMPT_VERSION",
        min_length=1,
        max_length=100,
    )
    answer_format: Literal["auto", "json_schema", "json_object", "text"] = Field(
        "auto",
        description="how the caption and tags are asked for: auto (what the model's "
        "documentation lists), json_schema, json_object, or text (caption only, tags by "
        "keyword rules)",
        validation_alias="ENRICH_ANSWER_FORMAT",
    )
    caption_languages: str = Field(
        "en",
        description="caption languages, comma-separated (e.g. zh,en): one call answers all; "
        "metadata.caption holds the first, caption_i18n every one",
        validation_alias="ENRICH_CAPTION_LANGUAGES",
    )
    timeout: float = Field(
        60.0,
        description="seconds a model call may take",
        validation_alias="DASHSCOPE_TIMEOUT",
        gt=0,
        le=3600,
    )
    max_retries: int = Field(
        3,
        description="retries of a transient API failure",
        validation_alias="DASHSCOPE_MAX_RETRIES",
        ge=0,
        le=20,
    )
    backoff_initial: float = Field(
        1.0,
        description="first retry backoff, in s",
        validation_alias="DASHSCOPE_BACKOFF_INITIAL",
        gt=0,
        le=600,
    )
    backoff_max: float = Field(30.0, description="longest retry backoff, in s", gt=0, le=3600)
    # 8: with the default 3 retries a row pays at most 4 unusable answers in a run, so 8 in a
    # row are at least two images answered nothing usable on every try, with no caption between;
    # the stop then caps a blank-answering model's waste at about 8 calls (plus those in flight)
    # a run, while a model that captions most images never gets there.
    unusable_stop: int = Field(
        8,
        description="stop the run after this many paid answers in a row without a usable "
        "caption (blank or unreadable), for at least two images",
        validation_alias="DASHSCOPE_UNUSABLE_STOP",
        ge=2,
        le=1000,
    )
    max_image_side: int = Field(
        896,
        description="longer side of the image sent to the model, in px (snapped to the model's "
        "patch grid)",
        validation_alias="ENRICH_MAX_IMAGE_SIDE",
        ge=64,
        le=2048,
    )
    max_caption_tokens: int = Field(200, description="max_tokens of a caption call", ge=16, le=8192)
    # The largest legitimate answers: an embeddings batch of 10 vectors (DashScope's batch cap)
    # of 2,048 dimensions as JSON floats of up to ~24 bytes is about 0.5 MB; a caption of
    # 8,192 tokens (the max_tokens cap) is under 0.8 MB even with every character \u-escaped.
    # 4 MiB leaves five times that, and bounds what each call in flight can hold.
    max_answer_bytes: int = Field(
        4 * 1024 * 1024,
        description="largest answer read from the provider, in bytes, as sent and as inflated "
        "(a Batch API result file: per line)",
        validation_alias="DASHSCOPE_MAX_ANSWER_BYTES",
        ge=64 * 1024,
        le=1024**3,
    )
    # Client-side limits so that a run at high concurrency stays under the provider's quota
    # instead of living on 429 retries. DashScope's qwen-vl defaults: about 1,200 requests and
    # 1,000,000 tokens a minute per account and model, also enforced per second (RPM/60,
    # TPM/60); check the console (Monitoring) or GET /api/v1/quotas for the account's own.
    requests_per_minute: int = Field(
        1200,
        description="request quota of the vision model per minute (0: not limited, e.g. a "
        "local server)",
        validation_alias="DASHSCOPE_RPM",
        ge=0,
        le=10**6,
    )
    tokens_per_minute: int = Field(
        1_000_000,
        description="token quota of the vision model per minute, input plus output (0: not "
        "limited)",
        validation_alias="DASHSCOPE_TPM",
        ge=0,
        le=10**9,
    )
    rate_per_second: bool = Field(
        True,
        description="also pace per second (RPM/60, TPM/60), as DashScope enforces",
        validation_alias="DASHSCOPE_RATE_PER_SECOND",
    )
    rate_margin: float = Field(
        0.05,
        description="share of each second held back for network jitter (0.05: pace at 95% of "
        "the quota)",
        validation_alias="DASHSCOPE_RATE_MARGIN",
        ge=0,
        le=1,
    )
    shared_quota: bool | None = Field(
        None,
        description="share one rate budget per model with every process on the same database "
        "(default: on with a configured database, off for the embedded demo)",
        validation_alias="ENRICH_SHARED_QUOTA",
    )
    prices: str = Field(
        "",
        description="price table for cost estimates, merged over the region's list prices",
        validation_alias="ENRICH_PRICES",
    )
    embedding_requests_per_minute: int = Field(
        1800,
        description="request quota of the embedding model per minute (0: not limited)",
        validation_alias="DASHSCOPE_EMBEDDING_RPM",
        ge=0,
        le=10**6,
    )
    offline: bool = Field(
        False, description="use the offline provider on purpose", validation_alias="ENRICH_OFFLINE"
    )

    @field_validator("api_key")
    @classmethod
    def _printable_key(cls, value: SecretStr) -> SecretStr:
        # A key with a line break or a space inside would be sent as a broken header, and
        # the HTTP library's error quotes the header (the key) back.
        if any(ch.isspace() or not ch.isprintable() for ch in value.get_secret_value()):
            raise ValueError("must not contain spaces, line breaks or control characters")
        return value

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: SecretUrl) -> SecretUrl:
        if len(value.get_secret_value()) > MAX_URL:
            raise ValueError(f"must be at most {MAX_URL} characters")
        try:
            parts = urlsplit(value.get_secret_value())
            parts.port  # noqa: B018 - raises on a junk port
        except ValueError:
            raise ValueError("not a valid URL") from None
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        return value

    @field_validator("prices")
    @classmethod
    def _prices(cls, value: str) -> str:
        if value.strip():
            parse_prices(value)
        return value

    @field_validator("caption_languages")
    @classmethod
    def _languages(cls, value: str) -> str:
        codes = [c.strip() for c in value.split(",") if c.strip()]
        if not codes:
            raise ValueError("name at least one language, e.g. en or zh,en")
        bad = [c for c in codes if not LANGUAGE_CODE.fullmatch(c)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a language code such as en, zh or zh-Hant")
        unique = list(dict.fromkeys(codes))
        if len(unique) > MAX_LANGUAGES:
            raise ValueError(f"at most {MAX_LANGUAGES} languages (one call answers them all)")
        return ",".join(unique)

    @property
    def languages(self) -> tuple[str, ...]:
        """The caption languages in order; the first is ``metadata.caption``'s."""
        return tuple(self.caption_languages.split(","))

    @field_validator("embedding_dimensions")
    @classmethod
    def _known_dimensions(cls, value: int) -> int:
        if value not in EMBEDDING_DIMENSIONS:
            raise ValueError(f"must be one of {', '.join(map(str, EMBEDDING_DIMENSIONS))}")
        return value

    @field_validator("image_embedding_model")
    @classmethod
    def _known_image_model(cls, value: str) -> str:
        name = value.strip()
        if name and image_model(name) is None:
            raise ValueError(
                f"not a documented multimodal embedding model; one of {', '.join(IMAGE_MODELS)}"
            )
        return name

    @field_validator("image_embedding_dimensions")
    @classmethod
    def _image_dimensions(cls, value: int | None, info: ValidationInfo) -> int | None:
        # Runs on the default too (validate_default): the model's own default is filled in.
        model = image_model(info.data.get("image_embedding_model") or "")
        if model is None:
            if value is not None and "image_embedding_model" in info.data:
                raise ValueError("set ENRICH_IMAGE_EMBEDDING_MODEL too, or unset this")
            return value
        if value is None:
            return model.default_dimensions
        if value not in model.dimensions:
            raise ValueError(
                f"{model.name} makes vectors of {', '.join(map(str, model.dimensions))} dimensions"
            )
        return value

    @property
    def url(self) -> str:
        """The base URL as configured, credentials included: for the HTTP client and for
        finding the region, never for showing (``base_url_shown``)."""
        return self.base_url.get_secret_value()

    @property
    def base_url_shown(self) -> str:
        """The base URL without the credentials it may carry, for reports, logs and tables."""
        return redact_source(self.url)

    def secrets(self) -> tuple[str, ...]:
        """The key and the base URL's credentials (user:password@, secret-looking query
        values): what no log line, report, table or event may show."""
        return (*url_secrets(self.url), self.api_key.get_secret_value())

    def require_key(self) -> None:
        if not self.offline and not self.api_key.get_secret_value():
            raise ConfigError(
                "DASHSCOPE_API_KEY is not set: export it, or pass --offline to use the "
                "offline provider"
            )
