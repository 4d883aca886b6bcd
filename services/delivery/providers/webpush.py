"""Web Push: VAPID (RFC 8292) and payload encryption (RFC 8291, aes128gcm of RFC 8188).

Credentials: ``vapid_private_key`` (PEM, or the base64url raw 32-byte key that web-push tools
print), ``vapid_subject`` (``mailto:`` or ``https:``, how the push service reaches the
sender), optional ``vapid_public_key`` (checked against the private key: it is the
``applicationServerKey`` the site subscribed with, so a mismatch is refused by every push
service), and ``allow_loopback``, ``allow_private``, ``allow_link_local`` (default false). The
recipient is the subscription: its endpoint URL and its ``p256dh``/``auth`` keys.

The endpoint comes from a browser (a client key may register it), so it goes through the
webhooks' SSRF guard (:mod:`services.runtime.http_client`): the host is resolved here, every
address checked, and the call connects to the checked address. Loopback, private, link-local
and metadata addresses (IPv4 ones carried by IPv6: mapped, 6to4, Teredo, NAT64, included) are
refused unless the channel's credentials allow that class: FAILED, marked dead, no call.

Sent: ``POST <endpoint>`` with the JSON notification encrypted for the subscription,
``Authorization: vapid t=<ES256 JWT>, k=<public key>``, ``TTL``, ``Urgency`` (high for a
visible notification, normal for data only) and ``Topic`` (from the idempotency key, so a
duplicate still waiting on the push service replaces the first instead of showing twice).

Answers: 201 (any 2xx) is SENT (``Location``); 404/410 fail and mark the subscription dead;
413 (payload too large) and other 4xx fail; 408, 425, 429 and 5xx are RETRY with
``Retry-After``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import http_ece  # type: ignore[import-untyped]
import httpx
import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
)

from services.delivery.providers.base import (
    Channel,
    CredentialsError,
    OutboundMessage,
    Outcome,
    ProviderResult,
    PushContent,
)
from services.delivery.providers.http import (
    DEFAULT_TIMEOUT,
    json_body,
    not_sent,
    require_text,
    result_for_status,
)
from services.runtime.http_client import AddressRefused, AnswerLost, HttpClient
from services.runtime.webhooks import AddressPolicy

__all__ = [
    "DEFAULT_TTL",
    "MAX_PAYLOAD",
    "WebPushAdapter",
    "b64url_decode",
    "b64url_encode",
    "encrypt_payload",
]

#: Seconds a push service keeps an undelivered message when the send sets no TTL (4 weeks).
DEFAULT_TTL = 28 * 24 * 3600
#: Largest plaintext that fits the 4096-byte body every push service must accept (RFC 8291 §4):
#: 4096 less the aes128gcm header (86), the AEAD tag (16) and the padding delimiter (1).
MAX_PAYLOAD = 4096 - 86 - 16 - 1
#: A VAPID JWT lives this long (RFC 8292 allows up to 24 h) and is reused for an hour of it.
_JWT_LIFETIME = 12 * 3600
_JWT_REUSE = 3600
#: Calls on the wire at once, over all push services.
MAX_IN_FLIGHT = 100
_ADDRESS_FLAGS = ("allow_loopback", "allow_private", "allow_link_local")


def b64url_decode(value: str) -> bytes:
    """Base64url without padding, as Web Push keys are written (padding tolerated).

    Raises:
        ValueError: When the text is not base64url.
    """
    text = value.strip()
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("not base64url") from None


def b64url_encode(value: bytes) -> str:
    """Base64url without padding."""
    return base64.urlsafe_b64encode(value).rstrip(b"=").decode()


def encrypt_payload(
    plaintext: bytes,
    p256dh: bytes,
    auth: bytes,
    *,
    salt: bytes | None = None,
    sender_key: ec.EllipticCurvePrivateKey | None = None,
) -> bytes:
    """Encrypt a push message for one subscription (RFC 8291).

    A fresh sender key pair and salt are made for every message unless given (tests use the
    RFC's own values). The body is one aes128gcm record whose header carries the salt, the
    record size and the sender's public key.

    Args:
        plaintext: The message.
        p256dh: The subscription's public key (uncompressed P-256 point, 65 bytes).
        auth: The subscription's 16-byte auth secret.
        salt: 16 random bytes.
        sender_key: The ephemeral P-256 key.
    """
    key = sender_key or ec.generate_private_key(ec.SECP256R1())
    # http_ece's "dh + auth_secret" mode is RFC 8291's key derivation: IKM from the ECDH
    # secret with auth as salt and "WebPush: info" || ua_public || as_public as info, and the
    # sender's public key as the header's key id.
    body: bytes = http_ece.encrypt(
        plaintext,
        salt=salt or os.urandom(16),
        private_key=key,
        dh=p256dh,
        auth_secret=auth,
        version="aes128gcm",
    )
    return body


@dataclass(frozen=True, slots=True)
class _Vapid:
    key: ec.EllipticCurvePrivateKey
    public: str  # base64url uncompressed point: the "k" of the Authorization header
    subject: str


class WebPushAdapter:
    """Sends browser pushes through each subscription's push service.

    Args:
        client: The guarded HTTP client (one pooled client per adapter by default).
        timeout: Seconds to wait for a push service (the whole call).
        clock: Unix time, for the VAPID JWT's ``exp`` (tests move it).
        allow_insecure_endpoints: Accept ``http://`` endpoints (local test servers). Real
            push services are all ``https``; refusing the rest keeps a forged subscription
            from pointing our servers at a plain-HTTP internal address.
    """

    name = "webpush"
    channel = Channel.WEB_PUSH

    def __init__(
        self,
        *,
        client: HttpClient | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        clock: Callable[[], float] = time.time,
        allow_insecure_endpoints: bool = False,
    ) -> None:
        self._http = client or HttpClient()
        self._timeout = timeout
        # The guarded client does not bound its connections: this does.
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._clock = clock
        self._allow_insecure = allow_insecure_endpoints
        self._jwts: dict[tuple[str, str, str], tuple[str, float]] = {}

    def check_credentials(self, credentials: Mapping[str, Any]) -> None:
        _vapid(credentials)
        _address_policy(credentials)

    async def send(
        self, message: OutboundMessage, credentials: Mapping[str, Any]
    ) -> ProviderResult:
        try:
            vapid = _vapid(credentials)
            address_policy = _address_policy(credentials)
        except CredentialsError as error:
            return not_sent(self.name, f"credentials: {error}")
        content = message.content
        if not isinstance(content, PushContent):
            return not_sent(self.name, "a web push needs push content")
        recipient = message.recipient
        try:
            endpoint = httpx.URL(recipient.address)
            p256dh = b64url_decode(recipient.web_push_p256dh)
            auth = b64url_decode(recipient.web_push_auth)
        except (httpx.InvalidURL, ValueError):
            return self._dead("subscription endpoint or keys unreadable")
        if endpoint.scheme != "https" and not (self._allow_insecure and endpoint.scheme == "http"):
            return self._dead("subscription endpoint is not https")
        if not endpoint.host:
            return self._dead("subscription endpoint has no host")
        if len(p256dh) != 65 or p256dh[0] != 4 or len(auth) != 16:
            return self._dead("subscription keys malformed (p256dh or auth)")
        plaintext = _notification(message, content)
        if len(plaintext) > MAX_PAYLOAD:
            return not_sent(self.name, f"payload too large ({len(plaintext)} > {MAX_PAYLOAD})")
        try:
            body = encrypt_payload(plaintext, p256dh, auth)
        except ValueError:  # p256dh is not a point on the curve
            return self._dead("subscription key p256dh is not a P-256 point")
        visible = bool(content.title or content.body)
        headers = {
            "authorization": self._authorization(vapid, endpoint),
            "content-encoding": "aes128gcm",
            "content-type": "application/octet-stream",
            "ttl": str(DEFAULT_TTL if message.ttl_seconds is None else max(0, message.ttl_seconds)),
            "urgency": "high" if visible else "normal",
            "topic": _topic(message.idempotency_key),
        }
        async with self._slots:
            return await self._post(str(endpoint), headers, body, address_policy)

    async def _post(
        self, url: str, headers: dict[str, str], body: bytes, address_policy: AddressPolicy
    ) -> ProviderResult:
        try:
            answer = await self._http.request(
                "POST",
                url,
                headers=headers,
                body=body,
                policy=address_policy,
                timeout=self._timeout,
            )
        except AddressRefused as refused:
            # A subscription that points at our own network never becomes deliverable.
            return self._dead(f"subscription endpoint address refused: {refused}")
        except ValueError as error:
            return self._dead(f"subscription endpoint unusable: {error}")
        except AnswerLost as lost:
            return ProviderResult(
                Outcome.RETRY,
                detail=f"{self.name}:no answer (the request went out): {lost}",
                maybe_delivered=True,
            )
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as error:
            kind = "timeout" if isinstance(error, TimeoutError) else "unreachable"
            return ProviderResult(
                Outcome.RETRY, detail=f"{self.name}:{kind}: {error or type(error).__name__}"
            )
        response = httpx.Response(answer.status, headers=dict(answer.headers), content=answer.body)
        return self._classify(response)

    def _classify(self, response: httpx.Response) -> ProviderResult:
        if response.is_success:
            return result_for_status(
                self.name, response, provider_message_id=response.headers.get("location", "")
            )
        data = json_body(response)
        reason = f"{response.status_code} {data.get('message') or response.reason_phrase}"
        return result_for_status(
            self.name, response, reason.strip(), token_invalid=response.status_code in (404, 410)
        )

    def _dead(self, reason: str) -> ProviderResult:
        return ProviderResult(Outcome.FAILED, detail=f"{self.name}:{reason}", token_invalid=True)

    def _authorization(self, vapid: _Vapid, endpoint: httpx.URL) -> str:
        audience = _origin(endpoint)
        cache_key = (vapid.public, vapid.subject, audience)
        now = self._clock()
        cached = self._jwts.get(cache_key)
        if cached is not None and now < cached[1]:
            return cached[0]
        token = jwt.encode(
            {"aud": audience, "exp": int(now) + _JWT_LIFETIME, "sub": vapid.subject},
            vapid.key,
            algorithm="ES256",
        )
        header = f"vapid t={token}, k={vapid.public}"
        self._jwts[cache_key] = (header, now + _JWT_REUSE)
        return header

    @property
    def max_in_flight(self) -> int:
        """Calls that can be on the wire at once."""
        return MAX_IN_FLIGHT

    async def close(self) -> None:
        self._http.close()


def _notification(message: OutboundMessage, content: PushContent) -> bytes:
    """The JSON the site's service worker receives in its ``push`` event."""
    payload: dict[str, Any] = {"message_id": message.message_id}
    for key, value in (
        ("title", content.title),
        ("body", content.body),
        ("image", content.image_url),
        ("url", content.deep_link),
        ("sound", content.sound),
    ):
        if value:
            payload[key] = value
    if content.badge is not None:
        payload["badge"] = content.badge
    if content.data:
        payload["data"] = {str(k): str(v) for k, v in content.data.items()}
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def _origin(url: httpx.URL) -> str:
    default = {"https": 443, "http": 80}.get(url.scheme)
    port = f":{url.port}" if url.port is not None and url.port != default else ""
    return f"{url.scheme}://{url.host}{port}"


def _topic(idempotency_key: str) -> str:
    # RFC 8030 §5.4: at most 32 characters of the base64url alphabet.
    return b64url_encode(hashlib.sha256(idempotency_key.encode()).digest())[:32]


def _address_policy(credentials: Mapping[str, Any]) -> AddressPolicy:
    """Which non-public endpoint addresses the app allows (the webhook channel's flags)."""
    flags = {}
    for name in _ADDRESS_FLAGS:
        value = credentials.get(name, False)
        if not isinstance(value, bool):
            raise CredentialsError(f"{name}: true or false")
        flags[name] = value
    return AddressPolicy(**flags)


def _vapid(credentials: Mapping[str, Any]) -> _Vapid:
    key = _private_key(require_text(credentials, "vapid_private_key"))
    public = b64url_encode(
        key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    )
    given = credentials.get("vapid_public_key")
    if given and (not isinstance(given, str) or given.strip().rstrip("=") != public):
        raise CredentialsError("vapid_public_key: does not match vapid_private_key")
    subject = require_text(credentials, "vapid_subject")
    if not subject.startswith(("mailto:", "https://")):
        raise CredentialsError("vapid_subject: a mailto: or https: URL")
    return _Vapid(key=key, public=public, subject=subject)


@functools.lru_cache(maxsize=256)
def _private_key(text: str) -> ec.EllipticCurvePrivateKey:
    if text.startswith("-----BEGIN"):
        try:
            key = load_pem_private_key(text.encode(), password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise CredentialsError("vapid_private_key: not a PEM private key") from None
    else:
        try:
            raw = b64url_decode(text)
        except ValueError:
            raise CredentialsError("vapid_private_key: neither PEM nor base64url") from None
        if len(raw) != 32:
            raise CredentialsError("vapid_private_key: a raw key is 32 bytes")
        try:
            key = ec.derive_private_key(int.from_bytes(raw, "big"), ec.SECP256R1())
        except ValueError:
            raise CredentialsError("vapid_private_key: not a P-256 private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise CredentialsError("vapid_private_key: not a P-256 (ES256) key")
    return key
