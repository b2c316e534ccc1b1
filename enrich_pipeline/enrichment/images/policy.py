"""What an image load may do (:class:`ImagePolicy`) and how it fails (:class:`ImageLoadError`).

Every reader, the address guard and the decoder take the policy and raise the error; the error's
``code`` says what went wrong and its ``permanent`` flag tells the retry machinery whether
trying again can help.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

WORK_MAX_SIDE = 2048
"""Longest side of the decoded working copy; enough for K-Means and for a 1024 px vision input."""

DEFAULT_PIXELS_IN_FLIGHT = 50_000_000
"""One image at the 50-megapixel cap decoding at a time, or smaller ones up to as many pixels
(Pillow holds RGB at 4 bytes a pixel, and the reduction needs about as much again): the CLI
peaked at 470 MB on 50 MP PNGs at every ``--concurrent`` from 1 to 32, against 7.6 GB unbounded
at 32 (README "Memory", ``benchmarks/memory.py``)."""

# Pillow names camera JPEGs that carry a second (preview) picture "MPO"; they are ordinary JPEGs
# to everyone else, and refusing them as an "unsupported format" would surprise users.
FORMAT_ALIASES = {"MPO": "JPEG", "JPG": "JPEG", "TIF": "TIFF"}


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
    ``max_pixels_in_flight`` bounds the pixels decoded at once by the whole process (every load
    with the same value shares one :mod:`.budget`; 0: no bound).
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
    max_pixels_in_flight: int = DEFAULT_PIXELS_IN_FLIGHT

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.max_pixels <= 0 or self.work_max_side <= 0:
            raise ValueError("max_bytes, max_pixels and work_max_side must be positive")
        if self.max_pixels_in_flight < 0:
            raise ValueError("max_pixels_in_flight must be >= 0 (0: no bound)")
        if not self.timeout > 0:
            raise ValueError("timeout must be positive")
        if self.max_redirects < 0:
            raise ValueError("max_redirects must be >= 0")
        formats = frozenset(FORMAT_ALIASES.get(f.upper(), f.upper()) for f in self.allowed_formats)
        object.__setattr__(self, "allowed_formats", formats)
        # Parse now so a typo in configuration fails at startup, not on the first image.
        for network in self.allowed_networks:
            ipaddress.ip_network(network, strict=False)

    def exempt_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(n, strict=False) for n in sorted(self.allowed_networks))


DEFAULT_POLICY = ImagePolicy()


def load_error(code: str, what: str, display: str, *, permanent: bool = True) -> ImageLoadError:
    """The error for ``what`` went wrong with the source shown (redacted) as ``display``."""
    return ImageLoadError(code, f"{what} ({display})", permanent=permanent)


def too_large(policy: ImagePolicy, display: str) -> ImageLoadError:
    return load_error("too_large", f"image too large: more than {policy.max_bytes} bytes", display)
