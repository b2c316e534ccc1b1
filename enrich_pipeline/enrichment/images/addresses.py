"""The SSRF guard's verdicts on addresses: which ones an image fetch must never connect to.

Pure functions of an IP address (and the policy's exemptions), so the guard can be read and
tested without a network. An image URL comes from a user row and may name the cloud metadata
service, loopback or a private network; an IPv6 address that carries an IPv4 address (mapped,
NAT64, 6to4, Teredo, ISATAP...) is judged as the address it carries. The HTTP reader
(:mod:`.fetch`) resolves a name once and asks :func:`refusal` about every answer.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from enrich_pipeline.enrichment.images.policy import ImagePolicy

__all__ = [
    "IPAddress",
    "IPNetwork",
    "blocked_address_reason",
    "embedded_ipv4",
    "metadata_address",
    "refusal",
]

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
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known NAT64 prefix (RFC 6052)
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


def refusal(ip: IPAddress, policy: ImagePolicy) -> str | None:
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
