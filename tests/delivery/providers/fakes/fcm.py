"""Google's OAuth2 token endpoint and FCM HTTP v1 ``messages:send``, in one local server.

The token endpoint verifies the RS256 assertion with the service account's public key (iss,
aud, scope, lifetime) like Google does, and hands out access tokens that ``messages:send``
requires. Registration tokens can be set to answer FCM's real errors.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
)

from tests.delivery.providers.fakes.server import FakeHttpServer, Reply, Request

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
_SEND_PATH = re.compile(r"/v1/projects/(?P<project>[^/]+)/messages:send")
_TTL = re.compile(r"\d+(\.\d{1,9})?s")
_FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
_BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"


@dataclass(frozen=True)
class ServiceAccount:
    """A service account key, as the JSON file Firebase hands out."""

    project_id: str
    client_email: str
    private_key_id: str
    key: rsa.RSAPrivateKey

    def json(self, token_uri: str) -> dict[str, str]:
        pem = self.key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()
        return {
            "type": "service_account",
            "project_id": self.project_id,
            "private_key_id": self.private_key_id,
            "private_key": pem,
            "client_email": self.client_email,
            "client_id": "1234567890",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": token_uri,
        }


def make_service_account(project_id: str = "tidings-test") -> ServiceAccount:
    return ServiceAccount(
        project_id=project_id,
        client_email=f"firebase-adminsdk@{project_id}.iam.gserviceaccount.com",
        private_key_id=secrets.token_hex(20),
        key=rsa.generate_private_key(public_exponent=65537, key_size=2048),
    )


class FakeFcm(FakeHttpServer):
    """OAuth2 token endpoint at ``/token`` and FCM at ``/v1/projects/<id>/messages:send``.

    Attributes:
        token_errors: Registration token → FCM error to answer: ``UNREGISTERED``,
            ``INVALID_TOKEN``, ``QUOTA_EXCEEDED``, ``UNAVAILABLE``, ``SENDER_ID_MISMATCH``.
        retry_after: The ``Retry-After`` of 429/503 answers.
        refuse_access_tokens: Answer 401 to every send, even with a fresh access token.
        token_endpoint_down: The token endpoint answers 503.
        assertions: The verified claims of each token request.
        sent: The ``message`` of each accepted send.
    """

    def __init__(self, account: ServiceAccount, *, expires_in: int = 3599) -> None:
        super().__init__()
        self.account = account
        self.expires_in = expires_in
        self.token_errors: dict[str, str] = {}
        self.retry_after = "30"
        self.refuse_access_tokens = False
        self.token_endpoint_down = False
        self.assertions: list[dict[str, Any]] = []
        self.sent: list[dict[str, Any]] = []
        self._access_tokens: set[str] = set()

    @property
    def token_uri(self) -> str:
        return f"{self.url}/token"

    def revoke_access_tokens(self) -> None:
        """Every access token handed out so far stops working (401)."""
        self._access_tokens.clear()

    async def answer(self, request: Request) -> Reply:
        if request.path == "/token" and request.method == "POST":
            return self._token(request)
        match = _SEND_PATH.fullmatch(request.path)
        if match is not None and request.method == "POST":
            return self._send(request, match["project"])
        return _error(404, "NOT_FOUND", "Not found")

    def _token(self, request: Request) -> Reply:
        if self.token_endpoint_down:
            return Reply(503, b"Service Unavailable", {"retry-after": "5"})
        form = request.form()
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return _oauth_error("unsupported_grant_type", "Invalid grant_type")
        try:
            header = jwt.get_unverified_header(form.get("assertion", ""))
            claims = jwt.decode(
                form.get("assertion", ""),
                self.account.key.public_key(),
                algorithms=["RS256"],
                audience=self.token_uri,
                issuer=self.account.client_email,
                options={"require": ["iss", "aud", "iat", "exp", "scope"]},
            )
        except jwt.InvalidSignatureError:
            return _oauth_error("invalid_grant", "Invalid JWT Signature.")
        except jwt.PyJWTError as error:
            return _oauth_error("invalid_grant", f"Invalid JWT: {error}")
        if header.get("kid") != self.account.private_key_id:
            return _oauth_error("invalid_grant", "Invalid JWT Signature.")
        if claims["exp"] - claims["iat"] > 3600 or claims["iat"] > time.time() + 300:
            return _oauth_error("invalid_grant", "Invalid JWT: Token must be a short-lived token")
        if SCOPE not in str(claims["scope"]).split():
            return _oauth_error("invalid_scope", "Invalid OAuth scope or ID token audience")
        self.assertions.append(claims)
        token = "ya29." + secrets.token_urlsafe(32)
        self._access_tokens.add(token)
        return Reply.json(
            200, {"access_token": token, "expires_in": self.expires_in, "token_type": "Bearer"}
        )

    def _send(self, request: Request, project: str) -> Reply:
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        if token not in self._access_tokens or self.refuse_access_tokens:
            return _error(
                401,
                "UNAUTHENTICATED",
                "Request had invalid authentication credentials. Expected OAuth 2 access "
                "token, login cookie or other valid authentication credential.",
            )
        if project != self.account.project_id:
            return _error(403, "PERMISSION_DENIED", "Permission denied on the project")
        message = request.json().get("message")
        if not isinstance(message, dict):
            return _invalid("message", "Required")
        registration_token = message.get("token")
        if not registration_token:
            return _invalid("message", "Recipient of the message is not set.")
        for key, value in (message.get("data") or {}).items():
            if not isinstance(value, str):
                return _invalid(f"message.data[{key}]", "Invalid value: expected a string")
        ttl = (message.get("android") or {}).get("ttl")
        if ttl is not None and not _TTL.fullmatch(str(ttl)):
            return _invalid("message.android.ttl", "Invalid duration")
        if len(json.dumps({k: message.get(k) for k in ("data", "notification")})) > 4096:
            return _invalid("message", "Android message is too big")
        failure = self.token_errors.get(registration_token)
        if failure is not None:
            return self._token_error(failure)
        self.sent.append(message)
        return Reply.json(
            200, {"name": f"projects/{project}/messages/0:{secrets.randbelow(10**16)}%31bd1c9"}
        )

    def _token_error(self, failure: str) -> Reply:
        retry = {"retry-after": self.retry_after}
        if failure == "UNREGISTERED":
            return _error(404, "NOT_FOUND", "Requested entity was not found.", "UNREGISTERED")
        if failure == "INVALID_TOKEN":
            return _invalid(
                "message.token",
                "The registration token is not a valid FCM registration token",
                error_code="INVALID_ARGUMENT",
            )
        if failure == "QUOTA_EXCEEDED":
            return _error(
                429,
                "RESOURCE_EXHAUSTED",
                "Quota exceeded for quota metric 'Requests' of service 'fcm.googleapis.com'",
                "QUOTA_EXCEEDED",
                headers=retry,
            )
        if failure == "UNAVAILABLE":
            return _error(
                503, "UNAVAILABLE", "The service is currently unavailable.", "UNAVAILABLE", retry
            )
        if failure == "SENDER_ID_MISMATCH":
            return _error(403, "PERMISSION_DENIED", "SenderId mismatch", "SENDER_ID_MISMATCH")
        raise ValueError(failure)


def _error(
    code: int,
    status: str,
    message: str,
    error_code: str = "",
    headers: dict[str, str] | None = None,
    details: list[dict[str, Any]] | None = None,
) -> Reply:
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    all_details = [{"@type": _FCM_ERROR, "errorCode": error_code}] if error_code else []
    all_details += details or []
    if all_details:
        error["details"] = all_details
    return Reply.json(code, {"error": error}, headers)


def _invalid(field: str, description: str, error_code: str = "INVALID_ARGUMENT") -> Reply:
    return _error(
        400,
        "INVALID_ARGUMENT",
        description,
        error_code,
        details=[
            {
                "@type": _BAD_REQUEST,
                "fieldViolations": [{"field": field, "description": description}],
            }
        ],
    )


def _oauth_error(error: str, description: str) -> Reply:
    return Reply.json(400, {"error": error, "error_description": description})
