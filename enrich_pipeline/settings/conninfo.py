"""Database connection strings: checked before anything connects, built from ``ADBPG_*`` parts,
shown without their password. Nothing here quotes a connection string back: libpq's own
messages may hold the password, so they are reduced to what they say is wrong."""

from __future__ import annotations

import re
from collections.abc import Mapping

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from enrich_pipeline.settings.framework import ConfigError

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


def conninfo_from_parts(env: Mapping[str, str]) -> str:
    """The connection string of ``ADBPG_HOST``, ``ADBPG_PORT``, ``ADBPG_DBNAME``,
    ``ADBPG_USER`` and ``ADBPG_PASSWORD``."""
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


def conninfo_shown(conninfo: str) -> str:
    """``user@host:port/dbname``: the connection target without the password."""
    try:
        params = conninfo_to_dict(conninfo)
    except Exception:
        return "<unparsable connection string>"
    user, host = params.get("user") or "?", params.get("host", "localhost")
    return f"{user}@{host}:{params.get('port', 5432)}/{params.get('dbname', '?')}"
