"""Loading an image from where a row says it is: :func:`load_image`.

A source is an http(s) URL (read by :mod:`.fetch`, behind the address guard), a ``data:`` URL,
a local path or a ``file://`` URL. Every source is capped at ``policy.max_bytes`` before its
bytes are decoded (:mod:`.decode`).
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from urllib.parse import unquote, unquote_to_bytes, urlsplit
from urllib.request import url2pathname

from enrich_pipeline.enrichment.images.decode import (
    LoadedImage,
    decode,
    refuse_declared_type,
)
from enrich_pipeline.enrichment.images.fetch import fetch_http
from enrich_pipeline.enrichment.images.policy import (
    DEFAULT_POLICY,
    ImageLoadError,
    ImagePolicy,
    load_error,
    too_large,
)
from enrich_pipeline.redaction import redact_source


def load_image(source: str, policy: ImagePolicy = DEFAULT_POLICY) -> LoadedImage:
    """Fetch, validate and decode ``source`` into an RGB working copy.

    ``source`` is an http(s) URL, a ``data:`` URL (base64 or percent-encoded), a local path or a
    ``file://`` URL. Raises :class:`ImageLoadError` for every failure the source can cause.
    """
    if not isinstance(source, str) or not source.strip():
        raise ImageLoadError("bad_source", "empty image source")
    source = source.strip()
    display = redact_source(source)
    raw = _read_source(source, policy, display)
    return decode(source, raw, policy, display)


def _read_source(source: str, policy: ImagePolicy, display: str) -> bytes:
    if source[:5].lower() == "data:":
        return _read_data_url(source, policy, display)
    try:
        parts = urlsplit(source)
    except ValueError as exc:
        raise load_error("bad_source", f"malformed URL: {exc}", display) from None
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        return fetch_http(source, policy, display)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise load_error("bad_source", "file:// URLs must not name a remote host", display)
        return _read_local(url2pathname(unquote(parts.path)), policy, display)
    # A one-letter "scheme" is a Windows drive (C:\...), not a URL.
    if len(scheme) <= 1:
        return _read_local(source, policy, display)
    raise load_error("bad_source", f"unsupported source scheme {scheme!r}", display)


def _read_local(path_text: str, policy: ImagePolicy, display: str) -> bytes:
    if not policy.allow_local_files:
        raise load_error("bad_source", "local files are not allowed by the image policy", display)
    path = Path(path_text).expanduser()
    try:
        with path.open("rb") as handle:
            # Check the size before reading so a huge file is never pulled into memory; the
            # capped read still protects against files that grow or lie (FIFOs, /proc).
            if path.stat().st_size > policy.max_bytes:
                raise too_large(policy, display)
            data = handle.read(policy.max_bytes + 1)
    except FileNotFoundError:
        raise load_error("not_found", "image not found: no such file", display) from None
    except IsADirectoryError:
        raise load_error("bad_source", "image path is a directory", display) from None
    except PermissionError:
        raise load_error("not_found", "image not readable: permission denied", display) from None
    except OSError as exc:
        raise load_error(
            "not_found", f"image not readable: {exc.strerror or exc}", display
        ) from None
    if len(data) > policy.max_bytes:
        raise too_large(policy, display)
    return data


def _read_data_url(source: str, policy: ImagePolicy, display: str) -> bytes:
    header, sep, payload = source[5:].partition(",")
    if not sep:
        raise load_error("bad_source", "malformed data: URL (no comma)", display)
    params = [p.strip().lower() for p in header.split(";")]
    media_type = params[0]
    refuse_declared_type(media_type, display)
    is_base64 = "base64" in params[1:]
    # Refuse a clearly oversized payload before decoding copies it again; the slack covers
    # line breaks and percent-escapes inside the base64 text. The exact check follows decoding.
    if is_base64 and len(payload) // 4 * 3 > policy.max_bytes * 11 // 10:
        raise too_large(policy, display)
    if is_base64:
        text = unquote(payload) if "%" in payload else payload
        text = "".join(text.split()).replace("-", "+").replace("_", "/")
        text += "=" * (-len(text) % 4)
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise load_error(
                "bad_source", "malformed data: URL (invalid base64)", display
            ) from None
    else:
        data = unquote_to_bytes(payload)
    if len(data) > policy.max_bytes:
        raise too_large(policy, display)
    return data
