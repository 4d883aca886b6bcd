"""What every outgoing webhook of Tidings shares: the signature and the SSRF address rule.

Delivery's webhook channel and journey's webhook node both call URLs an app chose; both sign the
body the same way (so a receiver verifies one scheme, like Stripe's ``t=…,v1=…``) and both refuse
the same non-public addresses unless the app allowed them.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from dataclasses import dataclass

__all__ = [
    "SIGNATURE_HEADER",
    "AddressPolicy",
    "IPAddress",
    "address_refusal",
    "sign",
    "verify_signature",
]

SIGNATURE_HEADER = "X-Tidings-Signature"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify_signature(
    secret: str, header: str, body: bytes, *, now: float, tolerance: float = 300.0
) -> bool:
    """What a receiver does: check the signature and that it is recent (replay protection)."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance:
        return False
    expected = sign(secret, timestamp, body).split("v1=", 1)[1]
    return hmac.compare_digest(expected, fields.get("v1", ""))


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Cloud metadata services; refused as link-local (and never "private").
_METADATA = frozenset(
    {
        ipaddress.ip_address("169.254.169.254"),
        ipaddress.ip_address("169.254.170.2"),
        ipaddress.ip_address("100.100.100.200"),
        ipaddress.ip_address("fd00:ec2::254"),
    }
)


@dataclass(frozen=True, slots=True)
class AddressPolicy:
    """Which non-public address classes a webhook may reach (all refused by default)."""

    allow_loopback: bool = False
    allow_private: bool = False
    allow_link_local: bool = False


#: NAT64's well-known prefix (RFC 6052): the last 32 bits are the IPv4 address reached.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _embedded_v4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address leads to by translation or tunnelling, if any."""
    if address.sixtofour is not None:  # 2002:AABB:CCDD::/48 tunnels to A.B.C.D
        return address.sixtofour
    if address.teredo is not None:  # 2001::/32: the client's (de-obfuscated) address
        return address.teredo[1]
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def address_refusal(address: IPAddress, policy: AddressPolicy) -> str | None:
    """Why ``address`` may not be called under ``policy``, or None when it may.

    An IPv6 address that carries an IPv4 one (IPv4-mapped, 6to4, Teredo, NAT64) reaches that
    IPv4 address, so it is judged by it as well: ``2002:7f00:1::`` is loopback.
    """
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        else:
            embedded = _embedded_v4(address)
            if embedded is not None:
                refusal = address_refusal(embedded, policy)
                if refusal is not None:
                    return f"{address} leads to {refusal}"
                if address in _NAT64:  # "reserved" by range, but a public IPv4 behind it
                    return None
    if address.is_unspecified or address.is_multicast:
        return f"{address} is not a unicast address"
    if address in _METADATA or address.is_link_local:
        return None if policy.allow_link_local else f"{address} is link-local or metadata"
    if address.is_loopback:
        return None if policy.allow_loopback else f"{address} is loopback"
    if address.is_reserved:
        return f"{address} is reserved"
    if not address.is_global:  # RFC 1918, ULA, CGNAT, documentation ranges...
        return None if policy.allow_private else f"{address} is private"
    return None
