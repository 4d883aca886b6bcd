"""Apple Push Notification service: HTTP/2 with token (JWT) authentication.

Credentials: ``team_id`` and ``key_id`` (10 characters each, from the developer account),
``private_key`` (the ``.p8`` file's PEM text: an ES256 P-256 key), ``bundle_id`` (the app's
bundle id, sent as ``apns-topic``), ``environment`` (``production``, the default, or
``sandbox`` for development builds) or ``endpoint`` (overrides both).

Auth: an ES256 JWT (``iss`` = team, ``kid`` = key id, ``iat``) shared by every send of that
key, replaced after 50 minutes (Apple refuses tokens older than an hour, and refreshes more
often than every 20 minutes with ``TooManyProviderTokenUpdates``).

Sent: ``POST /3/device/<token>`` over HTTP/2 with ``apns-topic``, ``apns-push-type``
(``alert``; ``background`` for a data-only push), ``apns-priority`` (10; 5 for background, as
Apple requires), ``apns-expiration`` (from the TTL), ``apns-id`` (a UUID derived from the
idempotency key: a retry of the same message carries the same id) and ``apns-collapse-id``
(from the key too, so a duplicate that reaches the device replaces the first instead of
showing twice). The payload's ``aps`` holds the alert, badge, sound and ``mutable-content``
when there is an image (a Notification Service Extension downloads it); the data and a
``tidings`` object (message id, deep link, image URL) sit beside it.

Answers: 200 is SENT (``apns-id``). 410 (``Unregistered``, ``ExpiredToken``) and 400
``BadDeviceToken`` fail and mark the token dead; 403 ``ExpiredProviderToken`` replaces the JWT
and is RETRY; 429 and 5xx are RETRY; other 4xx fail.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import ssl
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key

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
    HttpClient,
    endpoint_from,
    json_body,
    not_sent,
    require_text,
    result_for_status,
)

__all__ = [
    "DEAD_TOKEN_REASONS",
    "ENDPOINTS",
    "MAX_PAYLOAD",
    "ApnsAdapter",
    "apns_id_for",
    "collapse_id_for",
]

ENDPOINTS = {
    "production": "https://api.push.apple.com",
    "sandbox": "https://api.sandbox.push.apple.com",
    "development": "https://api.sandbox.push.apple.com",
}
#: Largest payload APNs takes for a regular notification, in bytes.
MAX_PAYLOAD = 4096
#: Reasons that say the device token will never take a notification again.
DEAD_TOKEN_REASONS = frozenset({"Unregistered", "BadDeviceToken", "ExpiredToken"})
#: A provider JWT is replaced once this old (Apple: valid for one hour).
JWT_REFRESH_AFTER = 50 * 60
#: Apple refuses a new JWT for the same key sooner than this after the previous one.
JWT_MIN_AGE = 20 * 60
_NAMESPACE = uuid.UUID("6f1c1a52-3f0e-4c55-9d1f-7a1e2b6c0d11")
_TEN_CHARACTERS = re.compile(r"[A-Z0-9]{10}")
_BUNDLE_ID = re.compile(r"[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+")
_DEVICE_TOKEN = re.compile(r"[0-9a-fA-F]{64,200}")
_RESERVED_KEYS = frozenset({"aps", "tidings"})


def apns_id_for(idempotency_key: str) -> str:
    """The ``apns-id`` of a message: the same key always gives the same UUID."""
    return str(uuid.uuid5(_NAMESPACE, idempotency_key))


def collapse_id_for(idempotency_key: str) -> str:
    """The ``apns-collapse-id``: 64 bytes at most, the same for the same key."""
    return hashlib.sha256(idempotency_key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class _Config:
    team_id: str
    key_id: str
    private_key: str
    bundle_id: str
    endpoint: str

    @property
    def jwt_key(self) -> tuple[str, str, str]:
        return (self.team_id, self.key_id, hashlib.sha256(self.private_key.encode()).hexdigest())


@dataclass(frozen=True, slots=True)
class _ProviderToken:
    value: str
    issued_at: float


class ApnsAdapter:
    """Sends iOS pushes to APNs.

    Args:
        client: An httpx client to use for every team (tests); otherwise one HTTP/2 client
            per team, since an APNs connection belongs to the team whose token opened it.
        timeout: Seconds to wait for APNs.
        verify: TLS verification for the clients made here (a test CA's context).
        clock: Unix time, for the JWT's ``iat`` and ``apns-expiration`` (tests move it).
        collapse_duplicates: Send ``apns-collapse-id`` derived from the idempotency key.
    """

    name = "apns"
    channel = Channel.IOS_PUSH

    def __init__(
        self,
        *,
        client: httpx.AsyncClient | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        verify: ssl.SSLContext | bool = True,
        clock: Callable[[], float] = time.time,
        collapse_duplicates: bool = True,
    ) -> None:
        self._client = client
        self._timeout = timeout
        self._verify = verify
        self._clock = clock
        self._collapse = collapse_duplicates
        self._clients: dict[str, HttpClient] = {}
        self._tokens: dict[tuple[str, str, str], _ProviderToken] = {}

    def check_credentials(self, credentials: Mapping[str, Any]) -> None:
        config = _config(credentials)
        _signing_key(config.private_key)

    async def send(
        self, message: OutboundMessage, credentials: Mapping[str, Any]
    ) -> ProviderResult:
        try:
            config = _config(credentials)
            token = self._provider_token(config)
        except CredentialsError as error:
            return not_sent(self.name, f"credentials: {error}")
        content = message.content
        if not isinstance(content, PushContent):
            return not_sent(self.name, "an APNs notification needs push content")
        device = message.recipient.address.strip()
        if not _DEVICE_TOKEN.fullmatch(device):
            return ProviderResult(
                Outcome.FAILED, detail=f"{self.name}:BadDeviceToken", token_invalid=True
            )
        payload, push_type = _payload(message, content)
        if len(payload) > MAX_PAYLOAD:
            return not_sent(self.name, f"PayloadTooLarge ({len(payload)} > {MAX_PAYLOAD} bytes)")
        apns_id = apns_id_for(message.idempotency_key)
        headers = {
            "authorization": f"bearer {token.value}",
            "apns-topic": config.bundle_id,
            "apns-push-type": push_type,
            "apns-priority": "5" if push_type == "background" else "10",
            "apns-id": apns_id,
            "content-type": "application/json",
        }
        if message.ttl_seconds is not None:
            # 0 means "deliver now or never"; otherwise the moment APNs may stop trying.
            ttl = max(0, message.ttl_seconds)
            headers["apns-expiration"] = "0" if ttl == 0 else str(int(self._clock()) + ttl)
        if self._collapse:
            headers["apns-collapse-id"] = collapse_id_for(message.idempotency_key)
        answer = await self._http(config.team_id).request(
            self.name,
            "POST",
            f"{config.endpoint}/3/device/{device}",
            content=payload,
            headers=headers,
        )
        if isinstance(answer, ProviderResult):
            return answer
        return self._classify(answer, config, token, apns_id)

    def _classify(
        self, response: httpx.Response, config: _Config, token: _ProviderToken, apns_id: str
    ) -> ProviderResult:
        if response.is_success:
            return result_for_status(
                self.name, response, provider_message_id=response.headers.get("apns-id", apns_id)
            )
        reason = str(json_body(response).get("reason") or "")
        if reason == "ExpiredProviderToken":
            self._expire(config, token)
            return result_for_status(self.name, response, reason, outcome=Outcome.RETRY)
        dead = response.status_code == 410 or reason in DEAD_TOKEN_REASONS
        return result_for_status(self.name, response, reason, token_invalid=dead)

    def _provider_token(self, config: _Config) -> _ProviderToken:
        now = self._clock()
        cached = self._tokens.get(config.jwt_key)
        if cached is not None and now - cached.issued_at < JWT_REFRESH_AFTER:
            return cached
        value = jwt.encode(
            {"iss": config.team_id, "iat": int(now)},
            _signing_key(config.private_key),
            algorithm="ES256",
            headers={"kid": config.key_id},
        )
        token = _ProviderToken(value, now)
        self._tokens[config.jwt_key] = token
        return token

    def _expire(self, config: _Config, token: _ProviderToken) -> None:
        """Drop a token APNs called expired, unless it is too young to be replaced yet."""
        cached = self._tokens.get(config.jwt_key)
        if cached is token and self._clock() - token.issued_at >= JWT_MIN_AGE:
            del self._tokens[config.jwt_key]

    def _http(self, team_id: str) -> HttpClient:
        http = self._clients.get(team_id)
        if http is None:
            http = HttpClient(
                client=self._client, timeout=self._timeout, http2=True, verify=self._verify
            )
            self._clients[team_id] = http
        return http

    async def close(self) -> None:
        clients, self._clients = self._clients, {}
        for http in clients.values():
            await http.aclose()


def _payload(message: OutboundMessage, content: PushContent) -> tuple[bytes, str]:
    aps: dict[str, Any] = {}
    alert = {k: v for k, v in (("title", content.title), ("body", content.body)) if v}
    if alert:
        aps["alert"] = alert
        if content.sound:
            aps["sound"] = content.sound
        if content.image_url:
            aps["mutable-content"] = 1
    if content.badge is not None:
        aps["badge"] = content.badge
    push_type = "alert" if aps else "background"
    if push_type == "background":
        aps["content-available"] = 1
    tidings: dict[str, str] = {"message_id": message.message_id}
    if content.deep_link:
        tidings["deep_link"] = content.deep_link
    if content.image_url:
        tidings["image_url"] = content.image_url
    body: dict[str, Any] = {
        str(k): str(v) for k, v in content.data.items() if k not in _RESERVED_KEYS
    }
    body |= {"aps": aps, "tidings": tidings}
    encoded = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    return encoded, push_type


def _config(credentials: Mapping[str, Any]) -> _Config:
    team_id = require_text(credentials, "team_id")
    if not _TEN_CHARACTERS.fullmatch(team_id):
        raise CredentialsError("team_id: 10 characters, A-Z and 0-9")
    key_id = require_text(credentials, "key_id")
    if not _TEN_CHARACTERS.fullmatch(key_id):
        raise CredentialsError("key_id: 10 characters, A-Z and 0-9")
    bundle_id = require_text(credentials, "bundle_id")
    if not _BUNDLE_ID.fullmatch(bundle_id):
        raise CredentialsError("bundle_id: a bundle id like com.example.app")
    environment = credentials.get("environment") or "production"
    if environment not in ENDPOINTS:
        raise CredentialsError("environment: production or sandbox")
    return _Config(
        team_id=team_id,
        key_id=key_id,
        private_key=require_text(credentials, "private_key"),
        bundle_id=bundle_id,
        endpoint=endpoint_from(credentials, ENDPOINTS[environment]),
    )


@functools.lru_cache(maxsize=256)
def _signing_key(pem: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise CredentialsError("private_key: not a PEM private key (the .p8 file)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise CredentialsError("private_key: not a valid EC P-256 (ES256) key")
    return key
