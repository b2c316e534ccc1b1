"""The one home of redaction: what counts as a secret, and how text is made safe to show.

Every message the project builds about a URL, a connection string or a provider's answer goes
through here before it reaches a report, a log line, an exception, a Dagster event or a table.
It sits at the bottom floor (standard library and psycopg's conninfo parser only), so every
other module may use it. Two tools:

- ``redact_source`` shows a URL (an image source, a base URL, a database URL) without its
  userinfo, with secret-looking query values masked, ``data:`` URLs shortened and control
  characters removed (log-line injection);
- ``hide_in_logs``/``scrub_secrets`` replace known secret values (the API key, the database
  password, base-URL credentials) wherever they appear, in library log records and in any text.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict

# Query parameters whose values are credentials: presigned URLs (OSS, S3, GCS, Azure SAS),
# gateways' ?api-key=..., generic tokens. One list for showing a URL and for finding its secrets.
SENSITIVE_QUERY_HINTS = (
    "sig",
    "token",
    "secret",
    "pass",
    "credential",
    "key",
    "auth",
    "x-amz-",
    "x-oss-",
    "x-goog-",
)
# Shorter strings are not hidden: replacing them would garble every log line that has them.
MIN_SECRET = 4
MASK = "***"
_MAX_DISPLAY = 200

# The loggers of the libraries that print what they were given: the connection pool (libpq's
# messages), the HTTP client under the openai SDK (request URLs, credentials included).
DB_LOGGERS = ("psycopg", "psycopg.pool")
HTTP_LOGGERS = ("httpx", "httpx2", "httpcore", "httpcore2", "openai", "openai._base_client")


def is_sensitive_name(name: str) -> bool:
    """Whether a query parameter (or header) of this name carries a credential."""
    lowered = unquote(name).lower()
    return any(hint in lowered for hint in SENSITIVE_QUERY_HINTS)


# --------------------------------------------------------------------------------------------
# Showing a URL


def redact_source(source: str) -> str:
    """A short, single-line form of ``source`` that is safe to log.

    Strips URL userinfo, masks secret-looking query values (presigned URLs), shortens ``data:``
    URLs to their media type and size, and removes control characters (log-line injection).
    """
    text = source.strip()
    if text[:5].lower() == "data:":
        head, sep, payload = text.partition(",")
        shown = f"{head[:60]}{sep}{payload[:16]}..." if len(text) > 80 else text
        return one_line(f"{shown} ({len(text)} chars)")
    try:
        parts = urlsplit(text)
    except ValueError:
        return one_line(_shorten(text))
    if parts.scheme.lower() in ("http", "https", "ftp", "file") or parts.netloc:
        netloc = parts.netloc.rpartition("@")[2]
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode(
                [(k, "REDACTED" if is_sensitive_name(k) else v) for k, v in pairs], safe="/:"
            )
        text = parts._replace(netloc=netloc, query=query, fragment="").geturl()
    return one_line(_shorten(text))


def _shorten(text: str) -> str:
    return text if len(text) <= _MAX_DISPLAY else text[: _MAX_DISPLAY - 3] + "..."


def one_line(text: str) -> str:
    """``text`` with every non-printable character (newlines included) shown as ``?``."""
    return "".join(ch if ch.isprintable() else "?" for ch in text)


# --------------------------------------------------------------------------------------------
# Finding the secrets a setting carries


def _spellings(found: list[str]) -> tuple[str, ...]:
    found += [unquote(f) for f in found]
    found += [quote(f, safe="") for f in found]
    return tuple(dict.fromkeys(f for f in found if len(f) >= MIN_SECRET))


def url_secrets(url: str) -> tuple[str, ...]:
    """The credentials a URL carries: its userinfo (the password, or a lone token before the
    ``@``) and the values of secret-looking query parameters, as written, decoded and encoded."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return ()
    found: list[str] = []
    userinfo = parts.netloc.rpartition("@")[0]
    if userinfo:
        user, _, password = userinfo.partition(":")
        found += [userinfo, password or user]
    for pair in parts.query.split("&"):
        name, _, value = pair.partition("=")
        if value and is_sensitive_name(name):
            found.append(value)
    return _spellings(found)


def conninfo_secrets(conninfo: str) -> tuple[str, ...]:
    """The password (and SSL key password) of a connection string, raw and URL-encoded."""
    if not conninfo:
        return ()
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        return ()
    found: list[str] = []
    for key in ("password", "sslpassword"):
        value = str(params.get(key) or "")
        if value:
            found += [value, quote(value, safe=""), quote(value)]
    return tuple(dict.fromkeys(found))


# --------------------------------------------------------------------------------------------
# Hiding known secrets in any text and in library log records


class _SecretFilter(logging.Filter):
    """Replaces every registered secret in the records of the loggers it is attached to."""

    def __init__(self) -> None:
        super().__init__()
        self._secrets: tuple[str, ...] = ()
        self._lock = threading.Lock()

    def add(self, secrets: Iterable[str]) -> None:
        with self._lock:
            merged = set(self._secrets) | {s for s in secrets if len(s) >= MIN_SECRET}
            # Longest first, so a secret that contains another is replaced whole.
            self._secrets = tuple(sorted(merged, key=len, reverse=True))

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secrets:
            return True
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is the logging module's business
            return True
        cleaned = self.scrub(message)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.scrub(record.exc_text)
        return True


_SECRET_FILTER = _SecretFilter()


def hide_in_logs(secrets: Iterable[str], loggers: Iterable[str]) -> None:
    """From now on, ``secrets`` appear as ``***`` in every record of ``loggers`` and in every
    text passed through ``scrub_secrets``."""
    _SECRET_FILTER.add(secrets)
    for name in loggers:
        logger = logging.getLogger(name)
        if _SECRET_FILTER not in logger.filters:
            logger.addFilter(_SECRET_FILTER)


def scrub_secrets(text: str) -> str:
    """``text`` with every secret registered by ``hide_in_logs`` replaced by ``***``."""
    return _SECRET_FILTER.scrub(text)
