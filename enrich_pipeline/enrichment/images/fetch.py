"""Fetching an image over HTTP(S) from a URL a user supplied, without becoming an SSRF proxy.

The host name is resolved once and every answer is vetted by the address guard
(:mod:`.addresses`) before the connection goes to exactly those addresses, so DNS rebinding gets
no second answer; each redirect hop is parsed, resolved and vetted again and may only go to
http(s); credentials in the URL go to its own origin only. One deadline bounds the whole fetch
(every hop, headers and body) and the body is read to ``policy.max_bytes`` at most.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urljoin, urlsplit

import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    LocationValueError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)

from enrich_pipeline.enrichment.images.addresses import IPAddress, refusal
from enrich_pipeline.enrichment.images.decode import refuse_declared_type
from enrich_pipeline.enrichment.images.policy import (
    ImageLoadError,
    ImagePolicy,
    load_error,
    too_large,
)
from enrich_pipeline.redaction import redact_source

_CHUNK = 64 * 1024
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# 408/425/429 and gateway errors say "not now", not "never": the row deserves another attempt.
_TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
_NOT_FOUND_STATUSES = frozenset({404, 410})
_USER_AGENT = "enrich-pipeline/0.1 (image captioning)"


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
        raise load_error("bad_source", f"malformed URL: {exc}", display) from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        # Redirects may only go to http(s): a hop to file:// or data: would be a way around the
        # network guard.
        raise load_error("bad_source", f"unsupported URL scheme {scheme!r}", display)
    hostname = (parts.hostname or "").rstrip(".")
    if not hostname:
        raise load_error("bad_source", "URL has no host", display)
    try:
        # Internationalised names travel as punycode in DNS, the Host header and SNI alike.
        hostname = hostname.encode("idna").decode("ascii")
    except UnicodeError:
        raise load_error("bad_source", "invalid host name", display) from None
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


def fetch_http(url: str, policy: ImagePolicy, display: str) -> bytes:
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
                    raise load_error(
                        "http_error",
                        f"HTTP {response.status} redirect without Location",
                        hop_display,
                    )
                next_url = urljoin(target.url, location.strip())
                if next_url in seen:
                    raise load_error("too_many_redirects", "redirect loop", display)
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
    raise load_error(
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
        raise load_error(
            code, f"cannot resolve host {target.hostname}", display, permanent=permanent
        ) from None
    except (UnicodeError, ValueError):
        raise load_error("bad_source", "invalid host name", display) from None
    addresses: list[IPAddress] = []
    for info in infos:
        # Strip an IPv6 zone id ("fe80::1%eth0"); the address alone decides the guard.
        ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if ip not in addresses:
            addresses.append(ip)
    if not addresses:
        raise load_error("not_found", f"cannot resolve host {target.hostname}", display)
    # Refuse if *any* answer is forbidden rather than skipping it: a mixed answer is the
    # signature of a rebinding attempt, and a legitimate image host never needs one.
    for ip in addresses:
        reason = refusal(ip, policy)
        if reason is not None:
            raise load_error(
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
    raise load_error(
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
    return load_error(
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
            return load_error("http_error", "TLS certificate verification failed", display)
        return load_error("http_error", "TLS handshake failed", display, permanent=False)
    if isinstance(exc, LocationValueError):
        return load_error("bad_source", "malformed URL", display)
    if isinstance(exc, ProtocolError | HTTPError | OSError):
        return load_error(
            "http_error", f"connection failed: {_reason(exc)}", display, permanent=False
        )
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
        raise load_error("not_found", f"image not found: HTTP {status}", display)
    permanent = status not in _TRANSIENT_STATUSES and status < 500
    raise load_error(
        "http_error", f"image fetch failed: HTTP {status}", display, permanent=permanent
    )


def _check_headers(response: urllib3.BaseHTTPResponse, policy: ImagePolicy, display: str) -> None:
    refuse_declared_type(response.headers.get("Content-Type", ""), display)
    declared = response.headers.get("Content-Length")
    if declared is not None and declared.strip().isdigit() and int(declared) > policy.max_bytes:
        raise too_large(policy, display)


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
                raise too_large(policy, display)
    except ImageLoadError:
        raise
    except BaseException as exc:
        raise _map_http_exception(exc, policy, display) from None
    return bytes(buffer)


def _socket_of(response: urllib3.BaseHTTPResponse) -> socket.socket | None:
    connection = getattr(response, "connection", None)
    sock = getattr(connection, "sock", None)
    return sock if hasattr(sock, "settimeout") else None
