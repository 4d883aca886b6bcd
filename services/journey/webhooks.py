"""Webhook nodes: the SSRF guard, the signature, and the HTTP call.

The guard refuses URLs that could reach the platform's own network: schemes other than http(s),
credentials in the URL, and hosts that are, or resolve to, loopback, private, link-local,
multicast, reserved or unspecified addresses (IPv4 and IPv6, IPv4-mapped included). The call
goes through the runtime's webhook client (one per engine process, connections kept alive), which
connects to the address it checked (no second DNS lookup a rebinding attacker could answer
differently), sending the original host name in ``Host`` and for TLS (SNI).

The signature is ``X-Tidings-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret,
"<t>.<body>")>``: the receiver recomputes it over the raw body and refuses stale timestamps.

A webhook call is at least once: the engine makes it before the step's transaction commits, so a
crash right after the call repeats it; ``X-Tidings-Idempotency-Key`` (the same for a repeat)
lets the receiver drop the duplicate.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from services.runtime.http_client import AddressRefused, HttpClient
from services.runtime.webhooks import (
    SIGNATURE_HEADER,
    AddressPolicy,
    address_refusal,
    sign,
)

__all__ = [
    "WebhookCall",
    "WebhookRefused",
    "WebhookResult",
    "call_webhook",
    "check_literal_url",
]

IDEMPOTENCY_HEADER = "X-Tidings-Idempotency-Key"
_ALLOWED_SCHEMES = ("http", "https")
#: What a journey allowed to reach private networks may call (every non-public class).
_ANY_ADDRESS = AddressPolicy(allow_loopback=True, allow_private=True, allow_link_local=True)


class WebhookRefused(Exception):
    """The URL may not be called (the SSRF guard)."""


def _split(url: str) -> tuple[str, str, int]:
    """Scheme, host and port of ``url``, or WebhookRefused."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise WebhookRefused(f"not a valid URL: {exc}") from None
    if parts.scheme not in _ALLOWED_SCHEMES:
        raise WebhookRefused("only http and https URLs may be called")
    if parts.username is not None or parts.password is not None:
        raise WebhookRefused("credentials in the URL are refused; send them in a header")
    host = parts.hostname or ""
    if not host:
        raise WebhookRefused("the URL has no host")
    return parts.scheme, host, port or (443 if parts.scheme == "https" else 80)


def check_literal_url(url: str, *, allow_private: bool) -> None:
    """Validation-time check of a URL without template tags: no DNS lookup.

    Raises:
        WebhookRefused: The scheme is wrong, or the host is a refused address literal or a
            local name (``localhost``).
    """
    _, host, _ = _split(url)
    if allow_private:
        return
    if host == "localhost" or host.endswith((".localhost", ".local", ".internal")):
        raise WebhookRefused(f"host {host!r} is a local name")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return  # a name: checked when called, against what it resolves to
    if address_refusal(address, AddressPolicy()) is not None:
        raise WebhookRefused(f"address {host} is not public")


@dataclass(frozen=True)
class WebhookCall:
    """A rendered webhook call."""

    method: str
    url: str
    body: str
    headers: dict[str, str] = field(default_factory=dict)
    timeout: float = 10.0
    secret: str = ""
    idempotency_key: str = ""


@dataclass(frozen=True)
class WebhookResult:
    """What came of a call: success is a 2xx answer."""

    success: bool
    status: int
    detail: str


async def call_webhook(
    client: HttpClient, call: WebhookCall, *, allow_private: bool
) -> WebhookResult:
    """Make the call through the SSRF guard; never raises for network or HTTP failures."""
    try:
        _split(call.url)
    except WebhookRefused as exc:
        return WebhookResult(False, 0, f"refused: {exc}")
    body = call.body.encode()
    headers = {**call.headers, "User-Agent": "tidings-journey/1"}
    if call.idempotency_key:
        headers[IDEMPOTENCY_HEADER] = call.idempotency_key
    if call.secret:
        headers[SIGNATURE_HEADER] = sign(call.secret, int(time.time()), body)
    if body and not any(k.lower() == "content-type" for k in headers):
        headers["Content-Type"] = "application/json"
    try:
        response = await client.request(
            call.method,
            call.url,
            headers=headers,
            body=body,
            policy=_ANY_ADDRESS if allow_private else AddressPolicy(),
            timeout=call.timeout,
        )
    except AddressRefused as exc:
        return WebhookResult(False, 0, f"refused: {exc}")
    except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError) as exc:
        return WebhookResult(False, 0, f"{type(exc).__name__}: {exc}"[:300])
    return WebhookResult(200 <= response.status < 300, response.status, "")
