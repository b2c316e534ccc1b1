"""What the one redaction hides once a secret is known: the secret in every spelling a text can
hold it (URL-encoded, JSON-escaped, in a Basic header), the pieces providers print of a key
(``sk-...abcd``, ``sk-abc1...``, its last characters), and any ``Bearer``/``Basic`` credential;
and a credentialed base URL is shown redacted wherever settings are printed or dumped."""

from __future__ import annotations

import base64
import json
import logging
import uuid
from urllib.parse import quote, quote_plus

import pytest

from enrich_pipeline.enrichment.records import ItemError
from enrich_pipeline.providers.base import ProviderError
from enrich_pipeline.redaction import register_secrets, scrub_exception, scrub_secrets
from enrich_pipeline.settings import ConfigError, DashScopeSettings

CORE = uuid.uuid4().hex
KEY = f"sk-{CORE[:12]}/{CORE[12:24]}+{CORE[24:]}="
SHORT = f"pw{CORE[:4]}"  # under 16 characters: hidden whole, never by its pieces


@pytest.fixture(scope="module", autouse=True)
def _known() -> None:
    register_secrets([KEY, SHORT])


@pytest.mark.parametrize(
    "form",
    [
        KEY,
        f"Bearer {KEY}",
        quote(KEY, safe=""),
        quote(KEY, safe="").lower(),
        quote_plus(KEY),
        json.dumps(KEY)[1:-1].replace("/", "\\/"),
        f"{KEY[:10]}...",  # the head, cut short
        f"sk-...{KEY[-4:]}",
        f"sk-****{KEY[-6:]}",
        f"…{KEY[-4:]}",
        f"sk-{KEY[-6:]}",  # the prefix and the last characters
        KEY[-8:],  # the last 8 characters on their own
        SHORT,
    ],
)
def test_a_known_secret_is_hidden_in_every_spelling_and_telling_piece(form: str) -> None:
    shown = scrub_secrets(f'provider said: "{form}" (request 42)')
    assert "***" in shown, shown
    for i in range(len(KEY) - 7):
        assert KEY[i : i + 8] not in shown, shown
    assert SHORT not in shown
    assert shown.startswith('provider said: "') and shown.endswith('" (request 42)'), shown


def test_text_around_a_secret_is_kept_and_short_or_unrelated_words_are_not_masked() -> None:
    text = "the bearer of bad news: sk-... is not a key; pw is not a password; abcd ends here"
    assert scrub_secrets(text) == text
    assert scrub_secrets(f"Authorization: Basic {base64.b64encode(b'user:secretpw').decode()}") == (
        "Authorization: Basic ***"
    )


def test_errors_log_records_and_exception_chains_built_with_a_secret_are_scrubbed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert KEY not in str(ProviderError("x", f"HTTP 500: {KEY}", permanent=False))
    assert KEY not in ItemError("x", f"echo {KEY}", True, "caption").message
    logging.getLogger("enrich_pipeline.anything").warning("failed: %s", f"Bearer {KEY}")
    assert KEY not in caplog.text and "Bearer ***" in caplog.text
    try:
        try:
            raise ValueError(f"upstream: {KEY}")
        except ValueError as inner:
            raise RuntimeError(f"outer {quote(KEY, safe='')}") from inner
    except RuntimeError as exc:
        scrub_exception(exc)
        assert KEY not in str(exc.__cause__) and "%2F" not in str(exc), (exc, exc.__cause__)


def test_a_credentialed_base_url_is_held_as_a_secret_and_shown_redacted() -> None:
    password = f"gw{CORE}"
    url = f"https://user:{password}@gw.example.test/compatible-mode/v1?api-key={password}"
    settings = DashScopeSettings(api_key=KEY, base_url=url)
    assert settings.url == url  # the HTTP client still gets the credentials
    shown = [
        repr(settings),
        str(settings),
        str(settings.model_dump()),
        settings.model_dump_json(),
        str(settings.base_url),
        settings.base_url_shown,
    ]
    for text in shown:
        assert password not in text and "gw.example.test" in text, text
    assert settings.with_(timeout=3.0).url == url
    assert password in settings.secrets()
    with pytest.raises(ConfigError) as info:
        DashScopeSettings.from_env({"DASHSCOPE_BASE_URL": url.replace("https", "gopher")})
    assert password not in str(info.value) and "DASHSCOPE_BASE_URL" in str(info.value)
    with pytest.raises(ValueError) as raw:  # pydantic's own message, built in code
        DashScopeSettings(base_url=url.replace("https", "gopher"))
    assert password not in str(raw.value)


def test_a_dagster_storage_error_quoting_its_password_is_shown_without_it() -> None:
    from enrich_pipeline.cli.dagster import _storage_error

    password = f"st0rage-{CORE[:10]}@x"
    url = f"postgresql+psycopg2://dagster:{quote(password, safe='')}@db.internal:5432/dagster"
    cause = RuntimeError(f'password authentication failed for user "dagster" ({password})')
    error = RuntimeError("could not open the run storage")
    error.__cause__ = cause

    line = _storage_error({"DAGSTER_PG_URL": url}, error)

    assert line.startswith("DAGSTER_PG_URL: cannot open Dagster's run storage at ")
    assert "password authentication failed" in line and "db.internal" in line
    assert password not in line and quote(password, safe="") not in line
