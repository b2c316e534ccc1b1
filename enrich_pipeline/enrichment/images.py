"""Loading untrusted images safely, and shrinking them before they are sent to a vision model.

Image references come from user rows, so every source is treated as hostile: a URL may point at
the cloud metadata service or an internal admin page (SSRF), a body may be endless, a small file
may declare a gigapixel canvas, and "image/jpeg" may be an HTML error page. Each of these fails
with an :class:`ImageLoadError` whose ``code`` says what went wrong and whose ``permanent`` flag
tells the retry machinery whether trying again can help.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import io
import ipaddress
import math
import socket
import ssl
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, unquote_to_bytes, urljoin, urlsplit
from urllib.request import url2pathname

import numpy as np
import urllib3
from PIL import Image, UnidentifiedImageError
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    LocationValueError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)

from enrich_pipeline.enrichment import vision_tokens
from enrich_pipeline.redaction import one_line, redact_source

__all__ = [
    "WORK_MAX_SIDE",
    "ImageLoadError",
    "ImagePolicy",
    "LoadedImage",
    "VisionImage",
    "blocked_address_reason",
    "embedded_ipv4",
    "image_tokens",
    "load_image",
    "metadata_address",
    "prepare_for_vision",
]

WORK_MAX_SIDE = 2048
"""Longest side of the decoded working copy; enough for K-Means and for a 1024 px vision input."""

_CHUNK = 64 * 1024
# Qwen-VL sees an image as patches of 32x32 px (Qwen3-VL, current qwen-vl-max/plus) or 28x28 px
# (Qwen2.5-VL era, QVQ), one token each, capped per image: see vision_tokens.
_SNAP_MIN_PATCHES = 10
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# 408/425/429 and gateway errors say "not now", not "never": the row deserves another attempt.
_TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
_NOT_FOUND_STATUSES = frozenset({404, 410})
_USER_AGENT = "enrich-pipeline/0.1 (image captioning)"


# Pillow names camera JPEGs that carry a second (preview) picture "MPO"; they are ordinary JPEGs
# to everyone else, and refusing them as an "unsupported format" would surprise users.
_FORMAT_ALIASES = {"MPO": "JPEG", "JPG": "JPEG", "TIF": "TIFF"}

# EXIF orientation value -> the transpose that makes the picture upright (same table as
# PIL.ImageOps.exif_transpose, applied to the small working copy instead of the full image).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION_TAG = 0x0112

_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class ImageLoadError(Exception):
    """An image could not be loaded; ``str(err)`` is a one-line message safe to show users."""

    code: str
    permanent: bool

    def __init__(self, code: str, message: str, *, permanent: bool = True) -> None:
        super().__init__(message)
        self.code = code
        self.permanent = permanent

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only ``permanent`` would be lost by the default pickling of exceptions, and
        # errors may cross process boundaries (multiprocess executors).
        return (_rebuild_error, (self.code, str(self), self.permanent))


def _rebuild_error(code: str, message: str, permanent: bool) -> ImageLoadError:
    return ImageLoadError(code, message, permanent=permanent)


@dataclass(frozen=True)
class ImagePolicy:
    """Limits applied to every image load.

    ``timeout`` bounds each network operation *and* the whole fetch (all redirects, headers and
    body together), so a server that drips one byte a second cannot hold a worker forever.
    ``allowed_networks`` exempts specific CIDRs (say an internal image CDN) from the SSRF guard
    without opening every private network as ``allow_private_networks`` does.
    """

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 50_000_000
    timeout: float = 15.0
    max_redirects: int = 3
    allow_private_networks: bool = False
    allow_local_files: bool = True
    allowed_formats: frozenset[str] = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"})
    allowed_networks: frozenset[str] = frozenset()
    work_max_side: int = WORK_MAX_SIDE

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.max_pixels <= 0 or self.work_max_side <= 0:
            raise ValueError("max_bytes, max_pixels and work_max_side must be positive")
        if not self.timeout > 0:
            raise ValueError("timeout must be positive")
        if self.max_redirects < 0:
            raise ValueError("max_redirects must be >= 0")
        formats = frozenset(_FORMAT_ALIASES.get(f.upper(), f.upper()) for f in self.allowed_formats)
        object.__setattr__(self, "allowed_formats", formats)
        # Parse now so a typo in configuration fails at startup, not on the first image.
        for network in self.allowed_networks:
            ipaddress.ip_network(network, strict=False)

    def exempt_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(n, strict=False) for n in sorted(self.allowed_networks))


@dataclass
class LoadedImage:
    """A decoded RGB working copy plus facts about the original.

    ``original_width``/``original_height`` are the dimensions as displayed, i.e. after EXIF
    orientation, before any reduction.
    """

    source: str
    image: Image.Image
    original_width: int
    original_height: int
    content_sha256: str
    format: str = field(default="")

    def __repr__(self) -> str:
        # The source may be a multi-megabyte data: URL or carry credentials; never echo it.
        return (
            f"LoadedImage(source={redact_source(self.source)!r}, "
            f"size={self.image.size}, original={self.original_width}x{self.original_height}, "
            f"format={self.format!r}, sha256={self.content_sha256[:12]}...)"
        )


@dataclass(frozen=True)
class VisionImage:
    data_url: str
    width: int
    height: int
    tokens: int


_DEFAULT_POLICY = ImagePolicy()


# --------------------------------------------------------------------------------------------
# Messages


def _error(code: str, what: str, display: str, *, permanent: bool = True) -> ImageLoadError:
    return ImageLoadError(code, f"{what} ({display})", permanent=permanent)


# --------------------------------------------------------------------------------------------
# SSRF guard

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


# Cloud instance-metadata services (credentials live there): AWS/GCP/Azure/Alibaba/OpenStack
# IPv4, AWS ECS task metadata, Alibaba's 100.100.100.200, Tencent's 169.254.0.23, Azure's
# WireServer 168.63.129.16 (a public-looking address that answers only inside Azure), AWS's
# IPv6 endpoint and OpenStack's IPv6 anycast address (fe80::a9fe:a9fe).
_METADATA = tuple(
    ipaddress.ip_network(n)
    for n in (
        "169.254.169.254/32",
        "169.254.170.2/32",
        "169.254.0.23/32",
        "100.100.100.200/32",
        "168.63.129.16/32",
        "fd00:ec2::254/128",
        "fe80::a9fe:a9fe/128",
    )
)

# IPv6 forms that carry an IPv4 address, which then decides where the packets go: directly
# (the kernel sends ::ffff:a.b.c.d over IPv4), through a translator (SIIT, NAT64) or a tunnel
# (6to4, Teredo, ISATAP). Each such address is judged as the IPv4 address(es) it carries.
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # ::a.b.c.d (deprecated, RFC 4291)
_IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # ::ffff:0:a.b.c.d (SIIT, RFC 2765)
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # local-use NAT64 prefixes (RFC 8215)
# RFC 6052 prefix lengths a local-use NAT64 prefix may have inside 64:ff9b:1::/48; where the
# IPv4 address sits depends on it, so every position is judged (the usual /96 first). A
# position holding 0.0.0.0/8 is the zero padding of another layout: no translator sends there.
_NAT64_LOCAL_LENGTHS = (96, 64, 56, 48)
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
# ISATAP interface identifier (RFC 5214): [00|02]00:5efe:a.b.c.d under any /64 prefix (the
# u/g bits of the first octet may be set).
_ISATAP_MASK, _ISATAP_ID = 0xFCFFFFFF, 0x00005EFE


def _rfc6052_ipv4(ip: ipaddress.IPv6Address, prefix_length: int) -> ipaddress.IPv4Address:
    """The IPv4 address embedded after a NAT64 prefix of ``prefix_length`` bits (RFC 6052:
    the octet at bits 64-71 is reserved and skipped)."""
    packed = ip.packed
    if prefix_length == 96:
        return ipaddress.IPv4Address(packed[12:16])
    without_u = packed[:8] + packed[9:]
    start = prefix_length // 8
    return ipaddress.IPv4Address(without_u[start : start + 4])


def embedded_ipv4(address: str | IPAddress) -> tuple[ipaddress.IPv4Address, ...]:
    """The IPv4 addresses an IPv6 address carries (IPv4-mapped, IPv4-compatible, SIIT, NAT64
    well-known and local-use, 6to4, Teredo server and deobfuscated client, ISATAP); empty for
    an IPv4 address or an IPv6 address that carries none."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if not isinstance(ip, ipaddress.IPv6Address):
        return ()
    found: list[ipaddress.IPv4Address] = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    elif ip in _IPV4_TRANSLATED or ip in _NAT64:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    elif ip in _IPV4_COMPATIBLE and int(ip) > 1:  # not :: (unspecified) nor ::1 (loopback)
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    elif ip in _NAT64_LOCAL:
        candidates = (_rfc6052_ipv4(ip, n) for n in _NAT64_LOCAL_LENGTHS)
        found.extend(v4 for v4 in candidates if v4 not in _THIS_NETWORK)
    elif ip.sixtofour is not None:
        found.append(ip.sixtofour)
    elif ip.teredo is not None:
        server, client = ip.teredo  # ``ipaddress`` undoes the client's XOR obfuscation
        found.extend((client, server))
    if _is_isatap(ip):
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return tuple(dict.fromkeys(found))


def _is_isatap(ip: ipaddress.IPv6Address) -> bool:
    return (int(ip) >> 32) & _ISATAP_MASK == _ISATAP_ID


def _exempted(ip: IPAddress, exempt: Iterable[IPNetwork]) -> bool:
    return any(ip.version == net.version and ip in net for net in exempt)


def metadata_address(
    address: str | IPAddress, exempt: Iterable[IPNetwork] = ()
) -> IPAddress | None:
    """The cloud-metadata endpoint ``address`` reaches (itself, or an IPv4 address it carries),
    unless that endpoint is exempted explicitly; ``None`` otherwise."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    exempt = tuple(exempt)
    for candidate in (ip, *embedded_ipv4(ip)):
        if any(candidate.version == n.version and candidate in n for n in _METADATA):
            if not _exempted(candidate, exempt):
                return candidate
    return None


def blocked_address_reason(
    address: str | IPAddress, exempt: Iterable[IPNetwork] = ()
) -> str | None:
    """Why ``address`` must not be fetched from, or ``None`` when it is a public address.

    An IPv6 address that carries an IPv4 address is judged as that address (as every one of
    them, when it carries several).
    """
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    verdict = _judge(ip, tuple(exempt))
    return verdict[0] if verdict else None


def _judge(ip: IPAddress, exempt: tuple[IPNetwork, ...]) -> tuple[str, IPAddress] | None:
    """The reason ``ip`` is refused and the address that decided it (``ip`` itself or an IPv4
    address it carries), or ``None``."""
    if _exempted(ip, exempt):
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        carried = embedded_ipv4(ip)
        for v4 in carried:
            verdict = _judge(v4, exempt)
            if verdict is not None:
                return verdict
        if carried and not _is_isatap(ip):
            # The IPv6 wrapper is special-purpose; the carried address is where it goes. (An
            # ISATAP address's /64 prefix is a real network: it is judged as well, below.)
            return None
        if ip.is_site_local:
            return "site-local", ip
    reason = _reason_of(ip)
    return (reason, ip) if reason else None


def _reason_of(ip: IPAddress) -> str | None:
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private:
        return "private"
    # Catches what the named predicates miss, e.g. 100.64.0.0/10 (carrier-grade NAT).
    if not ip.is_global:
        return "non-public"
    if any(ip.version == n.version and ip in n for n in _METADATA):
        return "cloud metadata"  # a public-looking one, such as Azure's WireServer
    return None


def _refusal(ip: IPAddress, policy: ImagePolicy) -> str | None:
    """Why the guard refuses to connect to ``ip`` under ``policy``, naming the IPv4 address an
    IPv6 address carries when that is what decided; ``None`` to connect."""
    exempt = policy.exempt_networks()
    if policy.allow_private_networks:
        # Even with private networks open, instance-metadata endpoints (credentials live
        # there) stay refused unless a network lists them explicitly, in every IPv6 form that
        # carries them (::ffff:169.254.169.254, 64:ff9b::a9fe:a9fe, 2002:a9fe:a9fe::...).
        hit = metadata_address(ip, exempt)
        verdict = ("cloud metadata", hit) if hit is not None else None
    else:
        verdict = _judge(ip, exempt)
    if verdict is None:
        return None
    reason, culprit = verdict
    return reason if culprit == ip else f"{reason}, carrying {culprit}"


# --------------------------------------------------------------------------------------------
# Public entry points


def load_image(source: str, policy: ImagePolicy = _DEFAULT_POLICY) -> LoadedImage:
    """Fetch, validate and decode ``source`` into an RGB working copy.

    ``source`` is an http(s) URL, a ``data:`` URL (base64 or percent-encoded), a local path or a
    ``file://`` URL. Raises :class:`ImageLoadError` for every failure the source can cause.
    """
    if not isinstance(source, str) or not source.strip():
        raise ImageLoadError("bad_source", "empty image source")
    source = source.strip()
    display = redact_source(source)
    raw = _read_source(source, policy, display)
    return _decode(source, raw, policy, display)


def image_tokens(
    width: int,
    height: int,
    model: str = vision_tokens.DEFAULT_MODEL,
    *,
    high_resolution: bool = False,
) -> int:
    """Input tokens ``model`` bills for a ``width`` x ``height`` image, as DashScope counts
    them (its resize to the patch grid, the per-image cap, the two special tokens)."""
    return vision_tokens.image_tokens(width, height, model, high_resolution=high_resolution)


def prepare_for_vision(
    img: LoadedImage,
    max_side: int = 896,
    quality: int = 85,
    *,
    model: str = vision_tokens.DEFAULT_MODEL,
    high_resolution: bool = False,
) -> VisionImage:
    """Downscale and JPEG-encode ``img`` for a vision request to ``model``.

    Sides are snapped to the model's patch grid (32 or 28 px) because the service resizes to
    that grid anyway: sending the grid size avoids a second resample server-side and makes the
    token estimate exact. Snapping rounds down whenever rounding up would exceed ``max_side``
    or enlarge the image. An image above the model's per-image cap is sent at the size the
    service would shrink it to: more pixels than the cap buy nothing, they are not even seen.
    """
    if max_side < 1:
        raise ValueError("max_side must be positive")
    image = img.image if img.image.mode == "RGB" else img.image.convert("RGB")
    width, height = image.size
    patch = vision_tokens.patch_side(model)
    target = _vision_size(width, height, max_side, patch)
    if target[0] * target[1] > vision_tokens.max_pixels(model, high_resolution):
        target = vision_tokens.resized_size(*target, model, high_resolution=high_resolution)
    if target != (width, height):
        # Area averaging (BOX) is the right filter for shrinking and a third of Lanczos' cost
        # (about 6 ms against 20 ms for 1600x1200 -> 1008x756); the model resamples anyway.
        image = image.resize(target, Image.Resampling.BOX)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return VisionImage(
        data_url=f"data:image/jpeg;base64,{encoded}",
        width=target[0],
        height=target[1],
        tokens=image_tokens(*target, model, high_resolution=high_resolution),
    )


def _vision_size(width: int, height: int, max_side: int, patch: int = 32) -> tuple[int, int]:
    longest = max(width, height)
    scale = min(1.0, max_side / longest)
    # Snap the long side first and derive one scale from it, so both sides shrink alike and
    # the aspect ratio survives the rounding better than with two independent roundings.
    scale = _snap_to_grid(longest * scale, min(longest, max_side), patch) / longest
    return (
        _snap_to_grid(width * scale, min(width, max_side), patch),
        _snap_to_grid(height * scale, min(height, max_side), patch),
    )


def _snap_to_grid(side: float, limit: int, patch: int = 32) -> int:
    """``side`` rounded to a multiple of ``patch`` that does not exceed ``limit``.

    Sides under ten patches are left alone: there one patch is more than 10% of the side, so
    snapping would visibly distort a thumbnail, and the server pads it for a handful of tokens.
    """
    if side < _SNAP_MIN_PATCHES * patch:
        return max(1, min(limit, round(side)))
    nearest = round(side / patch) * patch
    if nearest <= limit:
        return nearest
    return max(patch, math.floor(min(side, limit) / patch) * patch)


# --------------------------------------------------------------------------------------------
# Reading bytes


def _read_source(source: str, policy: ImagePolicy, display: str) -> bytes:
    if source[:5].lower() == "data:":
        return _read_data_url(source, policy, display)
    try:
        parts = urlsplit(source)
    except ValueError as exc:
        raise _error("bad_source", f"malformed URL: {exc}", display) from None
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        return _fetch_http(source, policy, display)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise _error("bad_source", "file:// URLs must not name a remote host", display)
        return _read_local(url2pathname(unquote(parts.path)), policy, display)
    # A one-letter "scheme" is a Windows drive (C:\...), not a URL.
    if len(scheme) <= 1:
        return _read_local(source, policy, display)
    raise _error("bad_source", f"unsupported source scheme {scheme!r}", display)


def _read_local(path_text: str, policy: ImagePolicy, display: str) -> bytes:
    if not policy.allow_local_files:
        raise _error("bad_source", "local files are not allowed by the image policy", display)
    path = Path(path_text).expanduser()
    try:
        with path.open("rb") as handle:
            # Check the size before reading so a huge file is never pulled into memory; the
            # capped read still protects against files that grow or lie (FIFOs, /proc).
            if path.stat().st_size > policy.max_bytes:
                raise _too_large(policy, display)
            data = handle.read(policy.max_bytes + 1)
    except FileNotFoundError:
        raise _error("not_found", "image not found: no such file", display) from None
    except IsADirectoryError:
        raise _error("bad_source", "image path is a directory", display) from None
    except PermissionError:
        raise _error("not_found", "image not readable: permission denied", display) from None
    except OSError as exc:
        raise _error("not_found", f"image not readable: {exc.strerror or exc}", display) from None
    if len(data) > policy.max_bytes:
        raise _too_large(policy, display)
    return data


def _read_data_url(source: str, policy: ImagePolicy, display: str) -> bytes:
    header, sep, payload = source[5:].partition(",")
    if not sep:
        raise _error("bad_source", "malformed data: URL (no comma)", display)
    params = [p.strip().lower() for p in header.split(";")]
    media_type = params[0]
    _refuse_declared_type(media_type, display)
    is_base64 = "base64" in params[1:]
    # Refuse a clearly oversized payload before decoding copies it again; the slack covers
    # line breaks and percent-escapes inside the base64 text. The exact check follows decoding.
    if is_base64 and len(payload) // 4 * 3 > policy.max_bytes * 11 // 10:
        raise _too_large(policy, display)
    if is_base64:
        text = unquote(payload) if "%" in payload else payload
        text = "".join(text.split()).replace("-", "+").replace("_", "/")
        text += "=" * (-len(text) % 4)
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise _error("bad_source", "malformed data: URL (invalid base64)", display) from None
    else:
        data = unquote_to_bytes(payload)
    if len(data) > policy.max_bytes:
        raise _too_large(policy, display)
    return data


def _too_large(policy: ImagePolicy, display: str) -> ImageLoadError:
    return _error("too_large", f"image too large: more than {policy.max_bytes} bytes", display)


def _refuse_declared_type(content_type: str, display: str) -> None:
    """Fail fast on types that are certainly not raster images, before reading a body."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "image/svg+xml":
        raise _error("unsupported_format", "unsupported image format: SVG", display)
    if media.startswith("text/") or media in (
        "application/json",
        "application/xhtml+xml",
        "application/xml",
        "application/javascript",
    ):
        raise _error("not_an_image", f"not an image: content type {media}", display)


# --------------------------------------------------------------------------------------------
# HTTP


@dataclass(frozen=True)
class _Target:
    url: str
    scheme: str
    hostname: str
    port: int
    host_header: str
    request_path: str
    origin: tuple[str, str, int]
    basic_auth: str | None


def _parse_target(url: str, display: str) -> _Target:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _error("bad_source", f"malformed URL: {exc}", display) from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        # Redirects may only go to http(s): a hop to file:// or data: would be a way around the
        # network guard.
        raise _error("bad_source", f"unsupported URL scheme {scheme!r}", display)
    hostname = (parts.hostname or "").rstrip(".")
    if not hostname:
        raise _error("bad_source", "URL has no host", display)
    try:
        # Internationalised names travel as punycode in DNS, the Host header and SNI alike.
        hostname = hostname.encode("idna").decode("ascii")
    except UnicodeError:
        raise _error("bad_source", "invalid host name", display) from None
    bracketed = f"[{hostname}]" if ":" in hostname else hostname
    host_header = bracketed if port is None else f"{bracketed}:{port}"
    port = port or (443 if scheme == "https" else 80)
    path = parts.path or "/"
    if parts.query:
        path = f"{path}?{parts.query}"
    basic_auth = None
    if parts.username is not None:
        user = unquote(parts.username)
        password = unquote(parts.password or "")
        basic_auth = urllib3.util.make_headers(basic_auth=f"{user}:{password}")["authorization"]
    return _Target(
        url=url,
        scheme=scheme,
        hostname=hostname,
        port=port,
        host_header=host_header,
        request_path=path,
        origin=(scheme, hostname.lower(), port),
        basic_auth=basic_auth,
    )


def _fetch_http(url: str, policy: ImagePolicy, display: str) -> bytes:
    deadline = time.monotonic() + policy.timeout
    target = _parse_target(url, display)
    first_origin = target.origin
    credentials = target.basic_auth
    seen = {url}
    hop_display = display
    for _hop in range(policy.max_redirects + 1):
        addresses = _resolve_and_vet(target, policy, hop_display)
        # Credentials from the original URL go to its origin only, never to a redirect target.
        auth = credentials if target.origin == first_origin else None
        response, pool = _open(target, addresses, auth, deadline, policy, hop_display)
        try:
            if response.status in _REDIRECT_STATUSES:
                location = response.headers.get("Location")
                if not location:
                    raise _error(
                        "http_error",
                        f"HTTP {response.status} redirect without Location",
                        hop_display,
                    )
                next_url = urljoin(target.url, location.strip())
                if next_url in seen:
                    raise _error("too_many_redirects", "redirect loop", display)
                seen.add(next_url)
                hop_display = f"{redact_source(next_url)}, redirected from {display}"
                target = _parse_target(next_url, hop_display)
                continue
            _check_status(response.status, hop_display)
            _check_headers(response, policy, hop_display)
            return _read_body(response, deadline, policy, hop_display)
        finally:
            # close(), not release_conn(): returning a half-read connection to a pool would
            # make urllib3 drain the rest of a possibly endless body.
            response.close()
            pool.close()
    raise _error(
        "too_many_redirects", f"too many redirects: more than {policy.max_redirects}", display
    )


def _resolve_and_vet(target: _Target, policy: ImagePolicy, display: str) -> list[IPAddress]:
    """Resolve once and vet every address; the caller connects only to these addresses.

    Resolving here and handing IPs to the connection (instead of letting it resolve the name
    again) is what defeats DNS rebinding: a name that answers with a public IP for the check and
    127.0.0.1 for the connect never gets a second answer.
    """
    try:
        infos = socket.getaddrinfo(target.hostname, target.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        # NXDOMAIN will not fix itself; a failing resolver (EAI_AGAIN) may.
        permanent = exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5))
        code = "not_found" if permanent else "http_error"
        raise _error(
            code, f"cannot resolve host {target.hostname}", display, permanent=permanent
        ) from None
    except (UnicodeError, ValueError):
        raise _error("bad_source", "invalid host name", display) from None
    addresses: list[IPAddress] = []
    for info in infos:
        # Strip an IPv6 zone id ("fe80::1%eth0"); the address alone decides the guard.
        ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if ip not in addresses:
            addresses.append(ip)
    if not addresses:
        raise _error("not_found", f"cannot resolve host {target.hostname}", display)
    # Refuse if *any* answer is forbidden rather than skipping it: a mixed answer is the
    # signature of a rebinding attempt, and a legitimate image host never needs one.
    for ip in addresses:
        reason = _refusal(ip, policy)
        if reason is not None:
            raise _error(
                "blocked_address",
                f"blocked address: {target.hostname} resolves to {ip} ({reason})",
                display,
            )
    return addresses


def _open(
    target: _Target,
    addresses: Sequence[IPAddress],
    auth: str | None,
    deadline: float,
    policy: ImagePolicy,
    display: str,
) -> tuple[urllib3.BaseHTTPResponse, urllib3.HTTPConnectionPool]:
    """Send the request to the first vetted address that accepts a connection."""
    headers = {
        # The pool is keyed by IP, so the name the server expects must be sent explicitly.
        "Host": target.host_header,
        "User-Agent": _USER_AGENT,
        "Accept": "image/*;q=1.0, */*;q=0.1",
        "Accept-Encoding": "identity",
    }
    if auth:
        headers["Authorization"] = auth
    last_error: Exception | None = None
    for ip in addresses:
        remaining = _remaining(deadline, policy, display)
        timeout = urllib3.Timeout(connect=remaining, read=remaining)
        pool: urllib3.HTTPConnectionPool
        if target.scheme == "https":
            # server_hostname drives both SNI and certificate verification, so TLS still
            # authenticates the original name although the socket goes to a literal IP.
            pool = urllib3.HTTPSConnectionPool(
                str(ip),
                target.port,
                timeout=timeout,
                maxsize=1,
                retries=False,
                server_hostname=target.hostname,
                cert_reqs="CERT_REQUIRED",
            )
        else:
            pool = urllib3.HTTPConnectionPool(
                str(ip), target.port, timeout=timeout, maxsize=1, retries=False
            )
        try:
            response = pool.urlopen(
                "GET",
                target.request_path,
                headers=headers,
                redirect=False,
                retries=False,
                preload_content=False,
                assert_same_host=False,
                timeout=timeout,
            )
            return response, pool
        except NewConnectionError as exc:
            # Refused or unreachable on this address: the next vetted address may work.
            pool.close()
            last_error = exc
        except BaseException as exc:
            pool.close()
            raise _map_http_exception(exc, policy, display) from None
    raise _error(
        "http_error",
        f"cannot connect to {target.hostname}: {_reason(last_error)}",
        display,
        permanent=False,
    )


def _remaining(deadline: float, policy: ImagePolicy, display: str) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _timeout(policy, display)
    return remaining


def _timeout(policy: ImagePolicy, display: str) -> ImageLoadError:
    return _error(
        "timeout", f"image fetch timed out after {policy.timeout:g}s", display, permanent=False
    )


def _reason(exc: BaseException | None) -> str:
    if exc is None:
        return "no address"
    inner = getattr(exc, "reason", None) or exc.__cause__ or exc.__context__ or exc
    for candidate in (inner, exc):
        if isinstance(candidate, OSError) and candidate.errno is not None:
            return errno.errorcode.get(candidate.errno, str(candidate.errno))
    return type(inner).__name__


def _map_http_exception(exc: BaseException, policy: ImagePolicy, display: str) -> BaseException:
    if isinstance(exc, ImageLoadError):
        return exc
    if isinstance(exc, ConnectTimeoutError | ReadTimeoutError | TimeoutError):
        return _timeout(policy, display)
    if isinstance(exc, SSLError):
        # A certificate that fails verification does not heal between retries (someone has to
        # fix the host); a handshake cut short by the network might.
        if _caused_by(exc, ssl.SSLCertVerificationError):
            return _error("http_error", "TLS certificate verification failed", display)
        return _error("http_error", "TLS handshake failed", display, permanent=False)
    if isinstance(exc, LocationValueError):
        return _error("bad_source", "malformed URL", display)
    if isinstance(exc, ProtocolError | HTTPError | OSError):
        return _error("http_error", f"connection failed: {_reason(exc)}", display, permanent=False)
    return exc


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    pending: list[object] = [exc]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if id(current) in seen or not isinstance(current, BaseException):
            continue
        seen.add(id(current))
        if isinstance(current, kind):
            return True
        pending.extend((current.__cause__, current.__context__, *current.args))
    return False


def _check_status(status: int, display: str) -> None:
    if 200 <= status < 300:
        return
    if status in _NOT_FOUND_STATUSES:
        raise _error("not_found", f"image not found: HTTP {status}", display)
    permanent = status not in _TRANSIENT_STATUSES and status < 500
    raise _error("http_error", f"image fetch failed: HTTP {status}", display, permanent=permanent)


def _check_headers(response: urllib3.BaseHTTPResponse, policy: ImagePolicy, display: str) -> None:
    _refuse_declared_type(response.headers.get("Content-Type", ""), display)
    declared = response.headers.get("Content-Length")
    if declared is not None and declared.strip().isdigit() and int(declared) > policy.max_bytes:
        raise _too_large(policy, display)


def _read_body(
    response: urllib3.BaseHTTPResponse, deadline: float, policy: ImagePolicy, display: str
) -> bytes:
    """Read at most ``max_bytes`` before ``deadline``, whatever the server claims or does."""
    buffer = bytearray()
    sock = _socket_of(response)
    try:
        while True:
            remaining = _remaining(deadline, policy, display)
            if sock is not None:
                # The per-read timeout alone would let a server that sends a byte every few
                # seconds run forever; shrinking it to the time left makes the deadline hard.
                sock.settimeout(min(policy.timeout, remaining))
            chunk = response.read1(_CHUNK)
            if not chunk:
                break
            buffer += chunk
            if len(buffer) > policy.max_bytes:
                raise _too_large(policy, display)
    except ImageLoadError:
        raise
    except BaseException as exc:
        raise _map_http_exception(exc, policy, display) from None
    return bytes(buffer)


def _socket_of(response: urllib3.BaseHTTPResponse) -> socket.socket | None:
    connection = getattr(response, "connection", None)
    sock = getattr(connection, "sock", None)
    return sock if hasattr(sock, "settimeout") else None


# --------------------------------------------------------------------------------------------
# Decoding


def _decode(source: str, raw: bytes, policy: ImagePolicy, display: str) -> LoadedImage:
    if not raw:
        raise _error("not_an_image", "not an image: empty content", display)
    _refuse_markup(raw, display)
    try:
        # Only the allowed decoders are even tried: Pillow's rarer plugins are the usual home
        # of parser bugs, and untrusted bytes should never reach them.
        image = Image.open(io.BytesIO(raw), formats=_pillow_formats(policy.allowed_formats))
    except Image.DecompressionBombError:
        raise _error("too_many_pixels", "image has too many pixels", display) from None
    except UnidentifiedImageError:
        other = _identify_any(raw)
        if other is not None:
            raise _error(
                "unsupported_format", f"unsupported image format: {other}", display
            ) from None
        raise _error("not_an_image", "not an image: unrecognised content", display) from None
    except Exception as exc:
        raise _error("not_an_image", f"not an image: {type(exc).__name__}", display) from None

    image_format = _FORMAT_ALIASES.get(image.format or "", image.format or "")
    if image_format not in policy.allowed_formats:
        raise _error("unsupported_format", f"unsupported image format: {image_format}", display)
    width, height = image.size
    if width <= 0 or height <= 0:
        raise _error("not_an_image", "not an image: zero-sized", display)
    # The header alone gives the canvas size; refusing here means a 100 kB file that would
    # inflate to gigabytes is never decoded.
    if width * height > policy.max_pixels:
        raise _error(
            "too_many_pixels",
            f"image has too many pixels: {width}x{height} is more than {policy.max_pixels}",
            display,
        )
    orientation = _orientation(image)

    try:
        side = policy.work_max_side
        # JPEG can decode straight at 1/2, 1/4 or 1/8 scale (DCT scaling), which is both the
        # fastest resize and the biggest memory saving for camera photos.
        image.draft(None, (side, side))
        image.load()
        image = _to_rgb_or_rgba(image)
        image.thumbnail((side, side), Image.Resampling.BICUBIC, reducing_gap=2.0)
        if image.mode == "RGBA":
            # Done after the reduction (Pillow resizes RGBA premultiplied, so this is exact)
            # because compositing the small copy is far cheaper.
            background = Image.new("RGB", image.size, (255, 255, 255))
            background.paste(image, mask=image.getchannel("A"))
            image = background
    except Image.DecompressionBombError:
        raise _error("too_many_pixels", "image has too many pixels", display) from None
    except OSError as exc:
        if "truncated" in str(exc).lower():
            raise _error("truncated", "image is truncated (incomplete file)", display) from None
        raise _error("not_an_image", f"image data is corrupt: {_short(exc)}", display) from None
    except Exception as exc:
        raise _error("not_an_image", f"image data is corrupt: {_short(exc)}", display) from None

    transpose = _ORIENTATION_TRANSPOSE.get(orientation)
    if transpose is not None:
        image = image.transpose(transpose)
        if orientation >= 5:
            width, height = height, width
    return LoadedImage(
        source=source,
        image=image,
        original_width=width,
        original_height=height,
        content_sha256=hashlib.sha256(raw).hexdigest(),
        format=image_format,
    )


def _short(exc: BaseException) -> str:
    # Pillow messages sometimes embed object reprs (memory addresses); keep the first clause.
    text = str(exc).split(" <", 1)[0].strip() or type(exc).__name__
    return one_line(text[:120])


def _pillow_formats(allowed: frozenset[str]) -> list[str]:
    Image.init()
    names = set(allowed)
    if "JPEG" in names:
        names.add("MPO")
    return sorted(name for name in names if name in Image.OPEN)


def _identify_any(raw: bytes) -> str | None:
    """Name the format of bytes that the allowed decoders refused, for a useful message."""
    try:
        with Image.open(io.BytesIO(raw)) as other:
            return other.format
    except Exception:
        return None


def _refuse_markup(raw: bytes, display: str) -> None:
    """Name the usual impostors: HTML error pages and SVG, both text starting with '<'."""
    head = raw[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if not head.startswith(b"<"):
        return
    if b"<svg" in head:
        raise _error("unsupported_format", "unsupported image format: SVG", display)
    kind = "HTML" if b"<html" in head or b"<!doctype html" in head else "markup"
    raise _error("not_an_image", f"not an image: got {kind}", display)


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
        return int(value)
    except Exception:
        # Broken EXIF is common and harmless: show the image as stored.
        return 1


def _to_rgb_or_rgba(image: Image.Image) -> Image.Image:
    """Convert any decoded mode to RGB, or RGBA when it carries transparency."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        image = _high_depth_to_l(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        return image if image.mode == "RGBA" else image.convert("RGBA")
    return image if image.mode == "RGB" else image.convert("RGB")


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    # Pillow's convert() clips 16-bit values at 255 (a mostly white picture); scale instead.
    values = np.asarray(image, dtype=np.float64)
    peak = float(values.max()) if values.size else 0.0
    if peak > 255:
        values = values * (255.0 / (65535.0 if peak <= 65535 else peak))
    return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8))
