"""The one home of redaction: what counts as a secret, and how text is made safe to show.

Every message the project builds about a URL, a connection string or a provider's answer goes
through here before it reaches a report, a log line, an exception, a Dagster event or a table.
It sits at the bottom floor (standard library and psycopg's conninfo parser only), so every
other module may use it. Two tools:

- ``redact_source`` shows a URL (an image source, a base URL, a database URL) without its
  userinfo, with secret-looking query values masked, ``data:`` URLs shortened and control
  characters removed (log-line injection);
- the process's registry of known secrets (``register_secrets``; ``hide_in_logs`` also filters
  given library loggers): the API key, the database password and the base URL's credentials
  are registered where a client or a connection is made with them, and from then on
  ``scrub_secrets`` replaces them, in every spelling and by the pieces providers print of a key
  (``sk-...abcd``), in any text; ``scrub_exception`` does it in an exception chain; and every
  log record the process makes is scrubbed as it is made.

The choke points that use it: the provider's errors (``providers.errors.classify``,
``ProviderError``, ``BatchError``), a row's error (``ItemError``), the failure ledger (written
and read), the command lines' report and database error lines, and log records (Dagster's
``context.log`` included).
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus, unquote, urlencode, urlsplit

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
        # The pair as sent in a Basic Authorization header, too.
        basic = base64.b64encode(unquote(userinfo).encode()).decode()
        found += [userinfo, password or user, basic]
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
# Hiding known secrets in any text, in exceptions and in log records

# A secret at least this long is random enough that a piece of it is as good as the whole: its
# head (``sk-abc1...``), its tail (``sk-...9f3a``, ``****9f3a``) and its last 8 characters are
# masked too, as providers print keys that way.
PARTIAL_MIN = 16
_TAIL = 4
_LAST = 8
# A token: where a secret (or a piece of it) sits in a text. No spaces, quotes, brackets or
# separators of a sentence or a JSON text.
_TOKEN = r"""[^\s"'`<>(){}\[\],;]"""
_TOKENS = re.compile(f"{_TOKEN}+")
# Tokens longer than this are not keys however they end (a data URL, a base64 dump).
_MAX_TOKEN = 200
# How a provider marks the elided middle of a key: "sk-...9f3a", "sk-…9f3a", "sk-****9f3a".
_ELIDED = re.compile(r"\.\.|…|\*\*")
# A credential sent as an HTTP Authorization value, whoever's it is: always masked.
_SCHEME = re.compile(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9\-._~+/%\\]{6,}=*")


def spellings(secret: str) -> tuple[str, ...]:
    """How ``secret`` can be written in a text: as is, URL-decoded, URL-encoded (both ways,
    either hex case), and JSON-escaped (slashes too, as some encoders write them)."""
    found = [secret, unquote(secret)]
    for form in list(found):
        found += [quote(form, safe=""), quote(form), quote_plus(form)]
    found += [_lower_hex(f) for f in found]
    for form in list(found):
        escaped = json.dumps(form)[1:-1]
        found += [escaped, escaped.replace("/", "\\/")]
    return tuple(dict.fromkeys(f for f in found if len(f) >= MIN_SECRET))


def _lower_hex(text: str) -> str:
    return re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), text)


@dataclass(frozen=True)
class _Pieces:
    """The pieces of a long secret that still give it away, as providers print keys."""

    head: str  # the key cut short: "sk-abc1..." (its fixed prefix and 4 more characters)
    last: str  # its last 8 characters, wherever they are: "key ending 90abcdef"
    tail: str  # its last 4, after an elision ("sk-...9f3a") or right after its prefix
    scheme: str  # its fixed prefix ("sk-", "sk-proj-"), "" when it has none
    head_re: re.Pattern[str]

    @classmethod
    def of(cls, secret: str) -> _Pieces:
        cut = max(secret.rfind("-", 0, 9), secret.rfind("_", 0, 9))
        scheme = secret[: cut + 1] if cut > 0 else ""
        head = secret[: len(scheme) + 4] if scheme else secret[:8]
        # The whole token that starts like the secret.
        head_re = re.compile(rf"(?<![A-Za-z0-9]){re.escape(head)}{_TOKEN}*")
        return cls(head, secret[-_LAST:], secret[-_TAIL:], scheme, head_re)

    def hide(self, token: str) -> str | None:
        """``token`` with the key it shows masked, or None when it shows none of this key."""
        core = token.rstrip(".:!?")
        if not core.endswith(self.tail) or len(token) > _MAX_TOKEN:
            return None
        if _ELIDED.search(core[: -len(self.tail)]):
            return MASK + token[len(core) :]
        at = core.find(self.scheme) if self.scheme else -1
        if at >= 0 and (at == 0 or not core[at - 1].isalnum()):
            return core[:at] + MASK + token[len(core) :]
        return None


@dataclass(frozen=True)
class _Known:
    """A snapshot of what is hidden: every spelling (longest first), and the pieces."""

    forms: tuple[str, ...] = ()
    pieces: tuple[_Pieces, ...] = ()


class _Secrets(logging.Filter):
    """The secrets known to this process, and the filter that hides them in log records.

    Plain substring searches and linear patterns only: a provider's message (or a log line) may
    be megabytes long, and its scrubbing must stay linear in its length."""

    def __init__(self) -> None:
        super().__init__()
        self._secrets: set[str] = set()
        self._known = _Known()
        self._lock = threading.Lock()

    def add(self, secrets: Iterable[str]) -> None:
        with self._lock:
            new = {s for s in secrets if len(s) >= MIN_SECRET} - self._secrets
            if not new:
                return
            self._secrets |= new
            forms = {f for s in self._secrets for f in spellings(s)}
            # A user:password pair is masked whole; its password alone gets the pieces.
            pieced = sorted(s for s in self._secrets if len(s) >= PARTIAL_MIN and ":" not in s)
            self._known = _Known(
                # Longest first, so a secret that contains another is replaced whole.
                tuple(sorted(forms, key=len, reverse=True)),
                tuple(_Pieces.of(s) for s in pieced),
            )

    def scrub(self, text: str) -> str:
        known = self._known
        for form in known.forms:
            if form in text:
                text = text.replace(form, MASK)
        for piece in known.pieces:
            if piece.head in text:
                text = piece.head_re.sub(MASK, text)
            if piece.last in text:
                text = text.replace(piece.last, MASK)
        tails = [p for p in known.pieces if p.tail in text]
        if tails:
            text = _TOKENS.sub(lambda m: _hide_token(m.group(), tails), text)
        return _SCHEME.sub(rf"\1\2{MASK}", text)

    def filter(self, record: logging.LogRecord) -> bool:
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


_SECRETS = _Secrets()
_FACTORY_LOCK = threading.Lock()
_factory_installed = False


def _hide_token(token: str, pieces: list[_Pieces]) -> str:
    for piece in pieces:
        hidden = piece.hide(token)
        if hidden is not None:
            return hidden
    return token


def _install_record_factory() -> None:
    """From now on every log record this process makes, whichever logger makes it (the
    pipeline's own, Dagster's ``context.log``, a library's), is scrubbed as it is made."""
    global _factory_installed
    with _FACTORY_LOCK:
        if _factory_installed:
            return
        made = logging.getLogRecordFactory()

        def scrubbed(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = made(*args, **kwargs)
            _SECRETS.filter(record)
            return record

        logging.setLogRecordFactory(scrubbed)
        _factory_installed = True


def register_secrets(secrets: Iterable[str]) -> None:
    """Make ``secrets`` known to this process: from now on they (and their pieces and other
    spellings, see ``spellings`` and ``PARTIAL_MIN``) appear as ``***`` in every text passed
    through ``scrub_secrets``, in every exception passed through ``scrub_exception`` and in
    every log record."""
    _SECRETS.add(secrets)
    _install_record_factory()


def hide_in_logs(secrets: Iterable[str], loggers: Iterable[str]) -> None:
    """``register_secrets``, and a filter on ``loggers`` too: the libraries' loggers whose
    records may be made before, or without, the record factory (``logging.makeLogRecord``)."""
    register_secrets(secrets)
    for name in loggers:
        logger = logging.getLogger(name)
        if _SECRETS not in logger.filters:
            logger.addFilter(_SECRETS)


def scrub_secrets(text: str) -> str:
    """``text`` with every registered secret (whole, in another spelling, or a telling piece of
    it) and every ``Bearer``/``Basic`` credential replaced by ``***``."""
    return _SECRETS.scrub(text)


def scrub_exception(exc: BaseException) -> BaseException:
    """``exc`` and the exceptions it was raised from, scrubbed in place (their arguments and
    ``message``), since they stay attached to the errors the pipeline raises: a traceback, the
    run worker's stderr and Dagster's error info show them. Returns ``exc``."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        args = tuple(scrub_secrets(a) if isinstance(a, str) else a for a in current.args)
        if args != current.args:
            current.args = args
        message = getattr(current, "message", None)
        if isinstance(message, str):
            cleaned = scrub_secrets(message)
            if cleaned != message:
                try:
                    current.message = cleaned  # type: ignore[attr-defined]
                except AttributeError:  # a read-only property: its args were scrubbed
                    pass
        current = current.__cause__ or current.__context__
    return exc
