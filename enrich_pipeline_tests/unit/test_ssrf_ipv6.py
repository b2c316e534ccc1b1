"""Every IPv6 address that carries an IPv4 address is judged as that IPv4
address, so the cloud-metadata block (which stays on with ``ENRICH_ALLOW_PRIVATE_NETWORKS``)
and the private-network block cannot be bypassed by writing the same host in IPv6.

The forms: IPv4-mapped ``::ffff:a.b.c.d``, IPv4-compatible ``::a.b.c.d``, SIIT
``::ffff:0:a.b.c.d``, NAT64 ``64:ff9b::/96`` and local-use ``64:ff9b:1::/48`` (every RFC 6052
layout), 6to4 ``2002::/16``, Teredo ``2001::/32`` (the client address XOR-obfuscated), ISATAP
``...:5efe:a.b.c.d``. Every refusal here happens before a connection is attempted (literal
addresses need no DNS), so nothing leaves the machine.
"""

from __future__ import annotations

import ipaddress

import pytest

from enrich_pipeline.enrichment.images import (
    ImageLoadError,
    ImagePolicy,
    blocked_address_reason,
    embedded_ipv4,
    load_image,
    metadata_address,
)

OPEN = ImagePolicy(allow_private_networks=True, timeout=2.0)
DEFAULT = ImagePolicy(timeout=2.0)


def v4(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def teredo(client: str, server: str = "65.54.227.120", port: int = 40000) -> str:
    """A Teredo address (RFC 4380): prefix, server, flags, then the client's port and address
    XOR 0xFF.. (obfuscated)."""
    value = (
        (0x20010000 << 96)
        | (v4(server) << 64)
        | (0x8000 << 48)
        | ((port ^ 0xFFFF) << 32)
        | (v4(client) ^ 0xFFFFFFFF)
    )
    return str(ipaddress.IPv6Address(value))


def rfc6052(prefix: str, prefix_length: int, address: str) -> str:
    """``address`` embedded after a NAT64 prefix as RFC 6052 lays it out (bits 64-71 skipped)."""
    base = bytearray(ipaddress.IPv6Address(prefix).packed)
    octets = ipaddress.IPv4Address(address).packed
    if prefix_length == 96:
        base[12:16] = octets
    else:
        positions = [p for p in range(prefix_length // 8, 16) if p != 8][:4]
        for position, octet in zip(positions, octets, strict=True):
            base[position] = octet
    return str(ipaddress.IPv6Address(bytes(base)))


def forms(address: str) -> dict[str, str]:
    """Every IPv6 form of an IPv4 address that this guard must see through."""
    n = v4(address)
    hexed = f"{n >> 16:x}:{n & 0xFFFF:x}"
    out = {
        "IPv4-mapped": f"::ffff:{address}",
        "IPv4-mapped, hex": f"::ffff:{hexed}",
        "IPv4-mapped, long form": f"0:0:0:0:0:ffff:{hexed}",
        "IPv4-compatible": f"::{address}",
        "IPv4-translated (SIIT)": f"::ffff:0:{address}",
        "NAT64 well-known": f"64:ff9b::{address}",
        "NAT64 well-known, hex": f"64:ff9b::{hexed}",
        "6to4": f"2002:{hexed}::1",
        "6to4, other subnet": f"2002:{hexed}:beef::42",
        "Teredo client": teredo(address),
        "Teredo server": teredo("8.8.8.8", server=address),
        "ISATAP, link-local": f"fe80::5efe:{address}",
        "ISATAP, global prefix, u bit": f"2001:4860:1:2:200:5efe:{address}",
    }
    for length in (48, 56, 64, 96):
        out[f"NAT64 local-use /{length}"] = rfc6052("64:ff9b:1::", length, address)
    return out


METADATA = ["169.254.169.254", "100.100.100.200", "169.254.170.2"]
INTERNAL = {"127.0.0.1": "loopback", "10.1.2.3": "private", "192.168.0.10": "private"}


@pytest.mark.parametrize("address", METADATA + list(INTERNAL))
@pytest.mark.parametrize("form", list(forms("1.2.3.4")))
def test_each_ipv6_form_carries_its_ipv4_address(address: str, form: str) -> None:
    ipv6 = forms(address)[form]
    assert ipaddress.IPv4Address(address) in embedded_ipv4(ipv6), (form, ipv6)


@pytest.mark.parametrize("address", METADATA)
@pytest.mark.parametrize("form", list(forms("1.2.3.4")))
def test_metadata_endpoints_are_recognised_in_every_ipv6_form(address: str, form: str) -> None:
    ipv6 = forms(address)[form]
    assert metadata_address(ipv6) == ipaddress.IPv4Address(address), (form, ipv6)
    # Judged as the IPv4 address, whatever the IPv6 wrapper would be on its own. (A Teredo
    # server is judged beside its public client; a local-use NAT64 address is judged at every
    # RFC 6052 position, and another position may be the first to refuse it.)
    if form != "Teredo server" and not form.startswith("NAT64 local-use"):
        assert blocked_address_reason(ipv6) == blocked_address_reason(address), (form, ipv6)
    assert blocked_address_reason(ipv6) is not None


@pytest.mark.parametrize(("address", "reason"), list(INTERNAL.items()))
@pytest.mark.parametrize("form", list(forms("1.2.3.4")))
def test_internal_addresses_are_refused_in_every_ipv6_form(
    address: str, reason: str, form: str
) -> None:
    ipv6 = forms(address)[form]
    if form.startswith("NAT64 local-use"):
        assert blocked_address_reason(ipv6) is not None, (form, ipv6)
    else:
        assert blocked_address_reason(ipv6) == reason, (form, ipv6)


@pytest.mark.parametrize("form", list(forms("1.2.3.4")))
def test_metadata_stays_refused_with_private_networks_open(form: str) -> None:
    """The cloud-metadata address written in IPv6, with ``ENRICH_ALLOW_PRIVATE_NETWORKS=true``."""
    ipv6 = forms("169.254.169.254")[form]
    with pytest.raises(ImageLoadError) as info:
        load_image(f"http://[{ipv6}]/latest/meta-data/iam/security-credentials/", OPEN)
    assert info.value.code == "blocked_address", (form, str(info.value))
    assert "cloud metadata" in str(info.value) and "169.254.169.254" in str(info.value)
    assert info.value.permanent


@pytest.mark.parametrize("form", list(forms("1.2.3.4")))
def test_alibaba_metadata_stays_refused_with_private_networks_open(form: str) -> None:
    ipv6 = forms("100.100.100.200")[form]
    with pytest.raises(ImageLoadError) as info:
        load_image(f"http://[{ipv6}]/latest/meta-data/", OPEN)
    assert info.value.code == "blocked_address" and "cloud metadata" in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "http://2852039166/latest/meta-data/",  # 169.254.169.254 as one number
        "http://0xa9fea9fe/latest/meta-data/",
        "http://0251.0376.0251.0376/latest/meta-data/",
        "http://169.254.43518/latest/meta-data/",
        "http://[fe80::a9fe:a9fe]/openstack/latest/meta_data.json",  # OpenStack over IPv6
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://168.63.129.16/machine?comp=goalstate",  # Azure WireServer, a public address
    ],
)
def test_other_spellings_of_metadata_endpoints_are_refused(url: str) -> None:
    for policy in (OPEN, DEFAULT):
        with pytest.raises(ImageLoadError) as info:
            load_image(url, policy)
        assert info.value.code == "blocked_address", (url, str(info.value))


@pytest.mark.parametrize("form", list(forms("1.2.3.4")))
def test_internal_forms_are_refused_by_default(form: str) -> None:
    ipv6 = forms("10.1.2.3")[form]
    with pytest.raises(ImageLoadError) as info:
        load_image(f"http://[{ipv6}]/photo.png", DEFAULT)
    assert info.value.code == "blocked_address" and "private" in str(info.value)
    assert "carrying 10.1.2.3" in str(info.value)  # the refusal says what the address hides


@pytest.mark.parametrize("form", [f for f in forms("1.2.3.4") if not f.startswith("ISATAP")])
def test_forms_of_public_addresses_are_judged_public(form: str) -> None:
    """Judged as the IPv4 address means both ways: a public one is not refused for its
    wrapper (ISATAP excepted: its /64 prefix is a real network and decides too)."""
    ipv6 = forms("8.8.8.8")[form]
    if form == "Teredo server":
        ipv6 = teredo("8.8.4.4", server="8.8.8.8")
    assert blocked_address_reason(ipv6) is None, (form, ipv6)
    assert metadata_address(ipv6) is None


def test_isatap_is_refused_when_its_prefix_or_its_ipv4_address_is_internal() -> None:
    assert blocked_address_reason("2001:4860:1:2:0:5efe:8.8.8.8") is None
    assert blocked_address_reason("2001:4860:1:2:0:5efe:10.0.0.1") == "private"
    assert blocked_address_reason("fd00:1:2:3:0:5efe:8.8.8.8") == "private"


def test_teredo_client_is_deobfuscated() -> None:
    address = teredo("169.254.169.254")
    # The obfuscated bits are not the address: a naive reading of the low 32 bits misses it.
    assert ipaddress.IPv4Address(int(ipaddress.IPv6Address(address)) & 0xFFFFFFFF) != (
        ipaddress.IPv4Address("169.254.169.254")
    )
    assert embedded_ipv4(address)[0] == ipaddress.IPv4Address("169.254.169.254")


def test_plain_ipv6_addresses_carry_nothing() -> None:
    for address in ("::", "::1", "2606:4700:4700::1111", "fe80::1", "fd00::1", "8.8.8.8"):
        assert embedded_ipv4(address) == ()
    assert blocked_address_reason("::1") == "loopback"
    assert blocked_address_reason("::") == "unspecified"


def test_an_exempt_metadata_network_is_exempt_in_every_form() -> None:
    """``ENRICH_ALLOWED_NETWORKS`` listing the endpoint is the one way to reach it."""
    exempt = ImagePolicy(allowed_networks=frozenset({"169.254.169.254/32"})).exempt_networks()
    for form, ipv6 in forms("169.254.169.254").items():
        assert metadata_address(ipv6, exempt) is None, form
        if form == "ISATAP, link-local":  # its fe80::/64 prefix is not exempted
            assert blocked_address_reason(ipv6, exempt) == "link-local"
        elif form.startswith("NAT64 local-use") and not form.endswith("/96"):
            # Other RFC 6052 positions of the same bits read other, unexempted addresses
            # (169.254.0.0, 254.169.254.0): judged at every position, it stays refused.
            assert blocked_address_reason(ipv6, exempt) is not None
        elif form != "Teredo server":
            assert blocked_address_reason(ipv6, exempt) is None, form
    # Exempting the endpoint does not exempt its neighbours.
    assert blocked_address_reason("::ffff:169.254.169.253", exempt) == "link-local"
