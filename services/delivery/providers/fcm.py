"""Firebase Cloud Messaging, HTTP v1 API, with a service account's OAuth2 token.

Credentials: the service account's JSON key, as its fields (``project_id``, ``client_email``,
``private_key``, ``private_key_id``, ``token_uri``) or whole under ``service_account`` (the
file's text or object); optional ``endpoint`` (default ``https://fcm.googleapis.com``).

Auth (RFC 7523): an RS256 JWT signed with the account's key is exchanged at ``token_uri`` for
an access token, cached until shortly before it expires and shared by every send of that
account. Then ``POST /v1/projects/<project_id>/messages:send`` with ``message.token``, the
notification, the data (strings only: FCM refuses anything else) and ``android.ttl``.

Answers: 200 is SENT (``name``). ``UNREGISTERED`` (404) and ``INVALID_ARGUMENT`` on
``message.token`` fail and mark the token dead; other 4xx fail; 401 drops the access token,
fetches a new one and sends once more, then is RETRY; 429 ``QUOTA_EXCEEDED`` and 5xx are
RETRY with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import rsa
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

__all__ = ["DEFAULT_ENDPOINT", "DEFAULT_TOKEN_URI", "SCOPE", "FcmAdapter"]

DEFAULT_ENDPOINT = "https://fcm.googleapis.com"
DEFAULT_TOKEN_URI = "https://oauth2.googleapis.com/token"
SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
_GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
#: Lifetime of the signed assertion (Google's maximum).
_ASSERTION_LIFETIME = 3600
#: An access token is replaced this long before Google says it expires.
_EXPIRY_MARGIN = 300
_FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
_BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"


@dataclass(frozen=True, slots=True)
class _Account:
    project_id: str
    client_email: str
    private_key: str
    private_key_id: str
    token_uri: str
    endpoint: str

    @property
    def cache_key(self) -> tuple[str, str, str]:
        return (self.token_uri, self.client_email, self.private_key_id or self.private_key)


@dataclass(frozen=True, slots=True)
class _AccessToken:
    value: str
    refresh_at: float


class FcmAdapter:
    """Sends Android pushes through FCM HTTP v1.

    Args:
        client: An httpx client to use (tests); one is made otherwise.
        timeout: Seconds to wait for Google.
        clock: Unix time, for the assertion's ``iat`` and the token cache (tests move it).
    """

    name = "fcm"
    channel = Channel.ANDROID_PUSH

    def __init__(
        self,
        *,
        client: httpx.AsyncClient | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._http = HttpClient(client=client, timeout=timeout)
        self._clock = clock
        self._tokens: dict[tuple[str, str, str], _AccessToken] = {}
        self._locks: dict[tuple[str, str, str], asyncio.Lock] = {}

    def check_credentials(self, credentials: Mapping[str, Any]) -> None:
        account = _account(credentials)
        _signing_key(account.private_key)

    async def send(
        self, message: OutboundMessage, credentials: Mapping[str, Any]
    ) -> ProviderResult:
        try:
            account = _account(credentials)
        except CredentialsError as error:
            return not_sent(self.name, f"credentials: {error}")
        content = message.content
        if not isinstance(content, PushContent):
            return not_sent(self.name, "an FCM message needs push content")
        if not message.recipient.address:
            return not_sent(self.name, "no registration token")
        body = {"message": _message(message, content)}
        url = f"{account.endpoint}/v1/projects/{account.project_id}/messages:send"
        answer = await self._post(account, url, body)
        if isinstance(answer, httpx.Response) and _unauthenticated(answer):
            # The access token was revoked or expired early: one new one, one more try.
            answer = await self._post(account, url, body)
            if isinstance(answer, httpx.Response) and _unauthenticated(answer):
                return result_for_status(
                    self.name, answer, "UNAUTHENTICATED", outcome=Outcome.RETRY
                )
        if isinstance(answer, ProviderResult):
            return answer
        return self._classify(answer)

    async def _post(
        self, account: _Account, url: str, body: dict[str, Any]
    ) -> httpx.Response | ProviderResult:
        token = await self._access_token(account)
        if isinstance(token, ProviderResult):
            return token
        answer = await self._http.request(
            self.name, "POST", url, json=body, headers={"authorization": f"Bearer {token}"}
        )
        if isinstance(answer, httpx.Response) and _unauthenticated(answer):
            self._drop_token(account, token)
        return answer

    def _classify(self, response: httpx.Response) -> ProviderResult:
        data = json_body(response)
        if response.is_success:
            return result_for_status(self.name, response, provider_message_id=str(data.get("name")))
        error = data.get("error") if isinstance(data.get("error"), dict) else {}
        assert isinstance(error, dict)
        code = _fcm_error_code(data) or str(error.get("status") or "")
        message = str(error.get("message") or "")
        reason = f"{code}: {message}" if code and message else code or message
        dead = code == "UNREGISTERED" or (
            code == "INVALID_ARGUMENT" and "message.token" in _violated_fields(data)
        )
        return result_for_status(self.name, response, reason, token_invalid=dead)

    async def _access_token(self, account: _Account) -> str | ProviderResult:
        key = account.cache_key
        cached = self._tokens.get(key)
        if cached is not None and self._clock() < cached.refresh_at:
            return cached.value
        # One exchange per account at a time: concurrent sends wait for it instead of each
        # asking Google for a token of their own.
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            cached = self._tokens.get(key)
            if cached is not None and self._clock() < cached.refresh_at:
                return cached.value
            return await self._exchange(account)

    async def _exchange(self, account: _Account) -> str | ProviderResult:
        try:
            signing_key = _signing_key(account.private_key)
        except CredentialsError as error:
            return not_sent(self.name, f"credentials: {error}")
        now = int(self._clock())
        assertion = jwt.encode(
            {
                "iss": account.client_email,
                "scope": SCOPE,
                "aud": account.token_uri,
                "iat": now,
                "exp": now + _ASSERTION_LIFETIME,
            },
            signing_key,
            algorithm="RS256",
            headers={"kid": account.private_key_id} if account.private_key_id else None,
        )
        answer = await self._http.request(
            self.name,
            "POST",
            account.token_uri,
            data={"grant_type": _GRANT_TYPE, "assertion": assertion},
        )
        if isinstance(answer, ProviderResult):
            return answer
        data = json_body(answer)
        token = data.get("access_token")
        if not answer.is_success or not isinstance(token, str) or not token:
            reason = ": ".join(str(data[k]) for k in ("error", "error_description") if data.get(k))
            return result_for_status(
                self.name,
                answer,
                f"oauth2 {reason or answer.status_code}",
                outcome=None if not answer.is_success else Outcome.RETRY,
            )
        lifetime = data.get("expires_in")
        lifetime = float(lifetime) if isinstance(lifetime, int | float) else 3600.0
        margin = min(_EXPIRY_MARGIN, lifetime / 2)
        self._tokens[account.cache_key] = _AccessToken(token, now + lifetime - margin)
        return token

    def _drop_token(self, account: _Account, token: str) -> None:
        cached = self._tokens.get(account.cache_key)
        if cached is not None and cached.value == token:  # not one a concurrent send renewed
            del self._tokens[account.cache_key]

    @property
    def max_in_flight(self) -> int:
        """Calls that can be on the wire at once (the connection pool's size)."""
        return self._http.max_in_flight

    async def close(self) -> None:
        await self._http.aclose()


def _message(message: OutboundMessage, content: PushContent) -> dict[str, Any]:
    data = {str(k): str(v) for k, v in content.data.items()}
    data["tidings_message_id"] = message.message_id
    if content.deep_link:
        data["tidings_deep_link"] = content.deep_link
    body: dict[str, Any] = {"token": message.recipient.address, "data": data}
    notification = {
        k: v
        for k, v in (("title", content.title), ("body", content.body), ("image", content.image_url))
        if v
    }
    android: dict[str, Any] = {"priority": "high" if notification else "normal"}
    if notification:
        body["notification"] = notification
        extra: dict[str, Any] = {}
        if content.sound:
            extra["sound"] = content.sound
        if content.badge is not None:
            extra["notification_count"] = content.badge
        if extra:
            android["notification"] = extra
    if message.ttl_seconds is not None:
        android["ttl"] = f"{max(0, message.ttl_seconds)}s"
    body["android"] = android
    return body


def _unauthenticated(response: httpx.Response) -> bool:
    """A 401 about our access token (THIRD_PARTY_AUTH_ERROR is about the app's APNs/web key)."""
    return response.status_code == 401 and not _fcm_error_code(json_body(response))


def _fcm_error_code(data: Mapping[str, Any]) -> str:
    for detail in _details(data):
        if detail.get("@type") == _FCM_ERROR and detail.get("errorCode"):
            return str(detail["errorCode"])
    return ""


def _violated_fields(data: Mapping[str, Any]) -> set[str]:
    fields: set[str] = set()
    for detail in _details(data):
        if detail.get("@type") == _BAD_REQUEST:
            for violation in detail.get("fieldViolations") or []:
                if isinstance(violation, dict):
                    fields.add(str(violation.get("field")))
    return fields


def _details(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    error = data.get("error")
    details = error.get("details") if isinstance(error, dict) else None
    return [d for d in details if isinstance(d, dict)] if isinstance(details, list) else []


def _account(credentials: Mapping[str, Any]) -> _Account:
    source: Mapping[str, Any] = credentials
    embedded = credentials.get("service_account")
    if embedded is not None:
        if isinstance(embedded, str):
            try:
                embedded = json.loads(embedded)
            except ValueError:
                raise CredentialsError("service_account: not JSON") from None
        if not isinstance(embedded, Mapping):
            raise CredentialsError("service_account: not a service account key")
        source = embedded
    kind = source.get("type")
    if kind is not None and kind != "service_account":
        raise CredentialsError(f"type: a service account key is needed, not {kind!r}")
    email = require_text(source, "client_email")
    if "@" not in email:
        raise CredentialsError("client_email: not an email address")
    return _Account(
        project_id=_project_id(source),
        client_email=email,
        private_key=require_text(source, "private_key"),
        private_key_id=str(source.get("private_key_id") or ""),
        token_uri=endpoint_from(source, DEFAULT_TOKEN_URI, field="token_uri"),
        endpoint=endpoint_from(credentials, DEFAULT_ENDPOINT),
    )


def _project_id(source: Mapping[str, Any]) -> str:
    project_id = require_text(source, "project_id")
    if not all(c.isalnum() or c in "-_." for c in project_id):
        raise CredentialsError("project_id: not a Firebase project id")
    return project_id


@functools.lru_cache(maxsize=256)
def _signing_key(pem: str) -> rsa.RSAPrivateKey:
    try:
        key = load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise CredentialsError("private_key: not a PEM private key") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise CredentialsError("private_key: not an RSA key")
    return key
