"""The authentication seam: who is calling, and which methods need to know.

Callers send ``authorization: Bearer <key>`` metadata. The server interceptor extracts the key
(:func:`bearer_token`), asks the service's :class:`Authenticator` who it belongs to, and makes
the resulting :class:`Principal` available to handlers through :func:`current_principal`.

Only :class:`AdminKeyAuthenticator` exists for now; identity will provide one that resolves app
keys (server and client scope), and the other services one that asks identity.
"""

from __future__ import annotations

import contextvars
import hmac
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from services.runtime.errors import PermissionDenied, Unauthenticated

__all__ = [
    "ADMIN_PRINCIPAL",
    "PUBLIC_METHOD_PREFIXES",
    "AdminKeyAuthenticator",
    "Authenticator",
    "MethodPolicy",
    "Principal",
    "Scope",
    "bearer_token",
    "current_principal",
    "require_scope",
    "requires_key",
    "set_current_principal",
]


class Scope(StrEnum):
    """What a key may do.

    ``admin`` creates apps and keys; ``server`` may do everything within its app; ``client``
    (what an SDK embeds) may only register its own subscription and track its own events.
    """

    ADMIN = "admin"
    SERVER = "server"
    CLIENT = "client"


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller of one RPC.

    Attributes:
        app_id: The app (tenant) the key belongs to; None for the admin key, which spans apps.
        key_id: Identifier of the key (never the secret itself), for logs and audit.
        scope: What the key may do.
    """

    app_id: str | None
    key_id: str
    scope: Scope


class Authenticator(Protocol):
    """Resolves a bearer token to the principal it identifies."""

    async def authenticate(self, token: str) -> Principal:
        """Identify the caller.

        Args:
            token: The key from ``authorization: Bearer <key>``, already stripped.

        Returns:
            The caller.

        Raises:
            Unauthenticated: If the token identifies nobody (unknown, revoked, expired).
        """
        ...


#: The principal the admin key authenticates as.
ADMIN_PRINCIPAL = Principal(app_id=None, key_id="admin", scope=Scope.ADMIN)


class AdminKeyAuthenticator:
    """Accepts only the admin key from the settings; every other token is rejected.

    Args:
        admin_key: The admin key (``TIDINGS_ADMIN_KEY``); empty means no key is accepted.
    """

    def __init__(self, admin_key: str) -> None:
        self._admin_key = admin_key.encode()

    async def authenticate(self, token: str) -> Principal:
        """Return the admin principal if ``token`` is the admin key.

        Raises:
            Unauthenticated: For any other token, or when no admin key is configured.
        """
        # compare_digest: the time taken must not reveal how much of the key matched.
        if self._admin_key and hmac.compare_digest(token.encode(), self._admin_key):
            return ADMIN_PRINCIPAL
        raise Unauthenticated("the API key is not valid", reason="API_KEY_INVALID")


#: Methods anyone may call without a key: probes and tooling (grpcurl list/describe) need them.
PUBLIC_METHOD_PREFIXES: tuple[str, ...] = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

#: Decides, from the full method name (``/pkg.Service/Method``), whether a key is required.
MethodPolicy = Callable[[str], bool]


def requires_key(method: str) -> bool:
    """Default policy: every method needs a key except health checking and reflection."""
    return not method.startswith(PUBLIC_METHOD_PREFIXES)


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """Extract the key from ``authorization: Bearer <key>`` metadata.

    Args:
        metadata: The call's invocation metadata.

    Returns:
        The key.

    Raises:
        Unauthenticated: If the header is missing, repeated or not a bearer token; the message
            says what a correct header looks like.
    """
    values = [value for key, value in metadata or () if key.lower() == "authorization"]
    if not values:
        raise Unauthenticated(
            "missing API key: send metadata 'authorization: Bearer <key>'",
            reason="API_KEY_MISSING",
        )
    if len(values) > 1:
        raise Unauthenticated(
            "send exactly one 'authorization' metadata entry", reason="API_KEY_MALFORMED"
        )
    value = values[0]
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    scheme, _, token = text.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise Unauthenticated(
            "malformed authorization metadata: expected 'Bearer <key>'",
            reason="API_KEY_MALFORMED",
        )
    return token


_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "tidings_principal", default=None
)


def current_principal() -> Principal:
    """The caller of the RPC being handled.

    Raises:
        Unauthenticated: Outside an authenticated RPC (a public method, or not in a call),
            so a handler that forgets a policy exemption fails closed.
    """
    principal = _principal.get()
    if principal is None:
        raise Unauthenticated("this method needs an API key", reason="API_KEY_MISSING")
    return principal


def set_current_principal(principal: Principal | None) -> None:
    """Bind the caller for the rest of the current task (the interceptor does this per RPC)."""
    _principal.set(principal)


def require_scope(*scopes: Scope) -> Principal:
    """Return the current principal if its key has one of ``scopes``.

    Args:
        *scopes: The scopes allowed to call the method.

    Raises:
        Unauthenticated: Outside an authenticated RPC.
        PermissionDenied: If the key's scope is not allowed.
    """
    principal = current_principal()
    if principal.scope not in scopes:
        allowed = " or ".join(scope.value for scope in scopes)
        raise PermissionDenied(
            f"this method needs a {allowed} key, not a {principal.scope.value} key",
            reason="KEY_SCOPE_INSUFFICIENT",
            metadata={"scope": principal.scope.value},
        )
    return principal
