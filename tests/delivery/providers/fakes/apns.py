"""An APNs server: HTTP/2 over TLS (ALPN h2), provider JWTs verified with the key's public
half, the request headers checked as Apple documents them, and APNs' error answers.

Device tokens can be set to answer errors on demand (``unregistered``, ``answers``).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from tests.delivery.providers.fakes.server import FakeHttpServer, Reply, Request
from tests.delivery.providers.fakes.tls import TlsFiles

_PATH = re.compile(r"/3/device/(?P<token>[^/]+)")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_PUSH_TYPES = {"alert", "background", "location", "voip", "complication", "fileprovider", "mdm"}


@dataclass
class Notification:
    """A notification APNs accepted."""

    device_token: str
    headers: dict[str, str]
    payload: dict[str, Any]
    jwt_claims: dict[str, Any]
    http_version: str


@dataclass
class SigningKey:
    """A developer account's APNs auth key, as APNs knows it (public half only)."""

    team_id: str
    public_key: ec.EllipticCurvePublicKey
    topics: frozenset[str]


class FakeApns(FakeHttpServer):
    """APNs at ``https://localhost:<port>``.

    Attributes:
        keys: Key id → the key APNs verifies JWTs with.
        unregistered: Device tokens of uninstalled apps (410 Unregistered).
        answers: Device token → (status, reason) to answer instead (429, 500, 503...).
        accepted: The notifications accepted.
        tokens_seen: Each distinct provider JWT, in order.
        now: The fake's clock (JWT age, token-update rate).
    """

    def __init__(self, tls: TlsFiles, *, now: Callable[[], float] = time.time) -> None:
        super().__init__(tls=tls)
        self.keys: dict[str, SigningKey] = {}
        self.unregistered: set[str] = set()
        self.answers: dict[str, tuple[int, str]] = {}
        self.accepted: list[Notification] = []
        self.tokens_seen: list[str] = []
        self.now = now
        self._token_updates: dict[str, float] = {}

    def register_key(
        self, key_id: str, team_id: str, public_key: ec.EllipticCurvePublicKey, *topics: str
    ) -> None:
        self.keys[key_id] = SigningKey(team_id, public_key, frozenset(topics))

    async def answer(self, request: Request) -> Reply:
        apns_id = request.headers.get("apns-id") or str(uuid.uuid4()).upper()
        reply = self._check(request, apns_id)
        reply.headers["apns-id"] = apns_id
        return reply

    def _check(self, request: Request, apns_id: str) -> Reply:
        match = _PATH.fullmatch(request.path)
        if match is None:
            return _error(404, "BadPath")
        if request.method != "POST":
            return _error(405, "MethodNotAllowed")
        claims_or_error = self._authenticate(request.headers.get("authorization", ""))
        if isinstance(claims_or_error, Reply):
            return claims_or_error
        claims, key = claims_or_error
        headers = request.headers
        topic = headers.get("apns-topic")
        if not topic:
            return _error(400, "MissingTopic")
        if topic not in key.topics:
            return _error(400, "TopicDisallowed")
        if headers.get("apns-push-type", "alert") not in _PUSH_TYPES:
            return _error(400, "InvalidPushType")
        priority = headers.get("apns-priority", "10")
        if priority not in ("1", "5", "10") or (
            headers.get("apns-push-type") == "background" and priority != "5"
        ):
            return _error(400, "BadPriority")
        if "apns-id" in headers and not _UUID.fullmatch(headers["apns-id"]):
            return _error(400, "BadMessageId")
        if len(headers.get("apns-collapse-id", "").encode()) > 64:
            return _error(400, "BadCollapseId")
        if "apns-expiration" in headers and not headers["apns-expiration"].isdigit():
            return _error(400, "BadExpirationDate")
        device_token = match["token"]
        if not _HEX64.fullmatch(device_token.lower()):
            return _error(400, "BadDeviceToken")
        if not request.body:
            return _error(400, "PayloadEmpty")
        if len(request.body) > 4096:
            return _error(413, "PayloadTooLarge")
        try:
            payload = json.loads(request.body)
        except ValueError:
            return _error(400, "BadPayload")  # not one of Apple's documented reasons
        if not isinstance(payload, dict) or not isinstance(payload.get("aps"), dict):
            return _error(400, "BadPayload")
        if device_token in self.unregistered:
            return _error(410, "Unregistered", timestamp=int(self.now() * 1000))
        if device_token in self.answers:
            status, reason = self.answers[device_token]
            return _error(status, reason)
        self.accepted.append(
            Notification(device_token, headers, payload, claims, request.http_version)
        )
        return Reply(200)

    def _authenticate(self, authorization: str) -> tuple[dict[str, Any], SigningKey] | Reply:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return _error(403, "MissingProviderToken")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return _error(403, "InvalidProviderToken")
        key = self.keys.get(str(header.get("kid")))
        if key is None or header.get("alg") != "ES256":
            return _error(403, "InvalidProviderToken")
        try:
            claims = jwt.decode(
                token,
                key.public_key,
                algorithms=["ES256"],
                issuer=key.team_id,
                options={"require": ["iss", "iat"], "verify_iat": False},
            )
        except jwt.PyJWTError:
            return _error(403, "InvalidProviderToken")
        age = self.now() - claims["iat"]
        if age > 3600:
            return _error(403, "ExpiredProviderToken")
        if age < -60:
            return _error(403, "InvalidProviderToken")
        if token not in self.tokens_seen:
            kid = str(header["kid"])
            previous = self._token_updates.get(kid)
            if previous is not None and self.now() - previous < 20 * 60:
                return _error(429, "TooManyProviderTokenUpdates")
            self._token_updates[kid] = self.now()
            self.tokens_seen.append(token)
        return claims, key


def _error(status: int, reason: str, timestamp: int | None = None) -> Reply:
    body: dict[str, Any] = {"reason": reason}
    if timestamp is not None:
        body["timestamp"] = timestamp
    return Reply.json(status, body)
