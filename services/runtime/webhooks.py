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


def address_refusal(address: IPAddress, policy: AddressPolicy) -> str | None:
    """Why ``address`` may not be called under ``policy``, or None when it may."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
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
