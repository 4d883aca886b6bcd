"""A Web Push service (RFC 8030) that checks VAPID (RFC 8292) and decrypts the payload
(RFC 8291), with a decryption written here from the RFCs, independent of the adapter's.

``subscribe()`` plays the browser: it makes the subscription's key pair and auth secret and
returns what a site would store (endpoint, p256dh, auth).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.delivery.providers.fakes.server import FakeHttpServer, Reply, Request

_PATH = re.compile(r"/push/(?P<id>[A-Za-z0-9_-]+)")
_AUTHORIZATION = re.compile(r"vapid t=(?P<t>[^,\s]+),\s*k=(?P<k>[A-Za-z0-9_-]+)")
_TOPIC = re.compile(r"[A-Za-z0-9_-]{1,32}")


def b64(value: bytes) -> str:
    return base64.urlsafe_b64encode(value).rstrip(b"=").decode()


def unb64(value: str) -> bytes:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


@dataclass
class Delivered:
    """One push the service accepted, decrypted."""

    plaintext: bytes
    headers: dict[str, str]
    vapid_claims: dict[str, Any]
    vapid_key: str


@dataclass
class Subscription:
    """A browser's push subscription, with the private half the browser keeps."""

    id: str
    endpoint: str
    key: ec.EllipticCurvePrivateKey
    auth: bytes
    application_server_key: str | None = None
    gone: bool = False
    answer: tuple[int, dict[str, str]] | None = None
    delivered: list[Delivered] = field(default_factory=list)

    @property
    def p256dh(self) -> str:
        return b64(
            self.key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
        )

    @property
    def auth_b64(self) -> str:
        return b64(self.auth)


def hkdf_sha256(salt: bytes, ikm: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 with one expand block (every length here is at most 32)."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()[:length]


def decrypt(body: bytes, ua_key: ec.EllipticCurvePrivateKey, auth: bytes) -> bytes:
    """Open an aes128gcm Web Push body (RFC 8188 §2 header, RFC 8291 §3.4 keys).

    Raises:
        ValueError: A header or record that does not follow the RFCs, or a bad tag.
    """
    if len(body) < 21:
        raise ValueError("shorter than the aes128gcm header")
    salt = body[:16]
    (record_size,) = struct.unpack("!I", body[16:20])
    key_id_length = body[20]
    as_public = body[21 : 21 + key_id_length]
    records = body[21 + key_id_length :]
    if key_id_length != 65 or as_public[0] != 4:
        raise ValueError("the key id is not the sender's uncompressed P-256 key")
    if record_size < 18:
        raise ValueError("record size too small")
    ua_public = ua_key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    sender = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), as_public)
    ecdh_secret = ua_key.exchange(ec.ECDH(), sender)
    ikm = hkdf_sha256(auth, ecdh_secret, b"WebPush: info\x00" + ua_public + as_public, 32)
    cek = hkdf_sha256(salt, ikm, b"Content-Encoding: aes128gcm\x00", 16)
    nonce = hkdf_sha256(salt, ikm, b"Content-Encoding: nonce\x00", 12)
    plaintext = b""
    chunks = [records[i : i + record_size] for i in range(0, len(records), record_size)]
    for index, chunk in enumerate(chunks):
        iv = (int.from_bytes(nonce, "big") ^ index).to_bytes(12, "big")
        padded = AESGCM(cek).decrypt(iv, chunk, None)
        data = padded.rstrip(b"\x00")
        last = index == len(chunks) - 1
        if not data or data[-1:] != (b"\x02" if last else b"\x01"):
            raise ValueError("bad padding delimiter")
        plaintext += data[:-1]
    return plaintext


class FakePushService(FakeHttpServer):
    """A push service with endpoints under ``/push/<id>``."""

    def __init__(self) -> None:
        super().__init__()
        self.subscriptions: dict[str, Subscription] = {}

    def subscribe(self, application_server_key: str | None = None) -> Subscription:
        """What ``pushManager.subscribe()`` gives a site (bound to its VAPID key if given)."""
        sub_id = secrets.token_urlsafe(12)
        subscription = Subscription(
            id=sub_id,
            endpoint=f"{self.url}/push/{sub_id}",
            key=ec.generate_private_key(ec.SECP256R1()),
            auth=secrets.token_bytes(16),
            application_server_key=application_server_key,
        )
        self.subscriptions[sub_id] = subscription
        return subscription

    async def answer(self, request: Request) -> Reply:
        match = _PATH.fullmatch(request.path)
        subscription = self.subscriptions.get(match["id"]) if match else None
        if subscription is None or request.method != "POST":
            return _error(404, 102, "Request did not validate invalid token")
        if subscription.gone:
            return _error(410, 106, "Request did not validate: subscription expired")
        if len(request.body) > 4096:
            return _error(413, 104, "Payload too large")
        headers = request.headers
        if not headers.get("ttl", "").isdigit():
            return _error(400, 112, "Missing or invalid TTL header")
        if headers.get("content-encoding") != "aes128gcm":
            return _error(415, 110, "Unknown Content-Encoding")
        if headers.get("urgency", "normal") not in ("very-low", "low", "normal", "high"):
            return _error(400, 112, "Invalid Urgency header")
        if "topic" in headers and not _TOPIC.fullmatch(headers["topic"]):
            return _error(400, 113, "Invalid Topic header")
        vapid = _AUTHORIZATION.fullmatch(headers.get("authorization", ""))
        if vapid is None:
            return _error(401, 109, "Missing or malformed VAPID Authorization header")
        try:
            public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), unb64(vapid["k"]))
            claims = jwt.decode(
                vapid["t"],
                public,
                algorithms=["ES256"],
                audience=self.url,
                options={"require": ["aud", "exp", "sub"]},
            )
        except (ValueError, jwt.PyJWTError) as error:
            return _error(401, 109, f"Invalid VAPID token: {error}")
        if claims["exp"] > time.time() + 24 * 3600:
            return _error(401, 109, "VAPID exp more than 24 hours ahead")
        if not str(claims["sub"]).startswith(("mailto:", "https://")):
            return _error(401, 109, "VAPID sub must be a mailto: or https: URL")
        if subscription.application_server_key not in (None, vapid["k"]):
            return _error(403, 109, "VAPID key does not match the subscription's key")
        if subscription.answer is not None:
            status, reply_headers = subscription.answer
            return _error(status, 999, "Unavailable", reply_headers)
        try:
            plaintext = decrypt(request.body, subscription.key, subscription.auth)
        except Exception as error:  # a payload the browser could not open
            return _error(400, 110, f"Payload not decryptable: {error!r}")
        subscription.delivered.append(Delivered(plaintext, headers, claims, vapid["k"]))
        message_id = secrets.token_urlsafe(16)
        return Reply(
            201,
            headers={"location": f"{self.url}/m/{message_id}", "ttl": headers["ttl"]},
        )


def _error(status: int, errno: int, message: str, headers: dict[str, str] | None = None) -> Reply:
    # Mozilla autopush's error body; other push services answer text, both are handled.
    return Reply.json(
        status,
        {"code": status, "errno": errno, "error": "", "message": message},
        headers,
    )
