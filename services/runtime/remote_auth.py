"""An authenticator for the services other than identity: app keys are checked by identity.

Delivery and journey never see identity's key table. They resolve a caller's key by calling
``tidings.identity.v1.AppsService/AuthenticateKey`` with the admin key (the only caller identity
lets resolve keys), and keep a positive answer for at most ``cache_seconds`` (1 s by default) so
a burst of calls with one key costs one round trip, while a revoked key is refused within that
second everywhere. Refusals are never cached, and an unreachable identity is UNAVAILABLE (retry
later), never UNAUTHENTICATED: an outage must not look like a bad key to a client.

The admin key itself is recognised locally (constant-time comparison), without a call.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, cast

import grpc
import grpc.aio
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from tidings.identity.v1 import app_pb2, apps_service_pb2, apps_service_pb2_grpc

from services.runtime.auth import AdminKeyAuthenticator, Principal, Scope
from services.runtime.errors import Unauthenticated, Unavailable

__all__ = ["DEFAULT_CACHE_SECONDS", "RemoteKeyAuthenticator"]

#: How long a key identity vouched for is trusted without asking again.
DEFAULT_CACHE_SECONDS = 1.0
#: Bound on cached keys (least recently used evicted first).
_MAX_ENTRIES = 10_000
#: Seconds one AuthenticateKey call may take before identity counts as unreachable.
_CALL_TIMEOUT = 5.0

_SCOPES: dict[int, Scope] = {
    app_pb2.API_KEY_SCOPE_SERVER: Scope.SERVER,
    app_pb2.API_KEY_SCOPE_CLIENT: Scope.CLIENT,
}


def _reason(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(cast(Any, error))
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return ""


class RemoteKeyAuthenticator:
    """Resolves the admin key locally and app keys through identity's AuthenticateKey.

    Args:
        identity_target: ``host:port`` of identity's gRPC server.
        admin_key: The deployment's admin key: accepted as the admin principal, and sent to
            identity to authorise the lookups.
        cache_seconds: How long a valid key is trusted without asking identity again; 0 turns
            the cache off.
        clock: Monotonic seconds; injectable for tests.
    """

    def __init__(
        self,
        identity_target: str,
        admin_key: str,
        *,
        cache_seconds: float = DEFAULT_CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._target = identity_target
        self._admin_key = admin_key
        self._admin = AdminKeyAuthenticator(admin_key)
        self._ttl = cache_seconds
        self._clock = clock
        self._cache: OrderedDict[bytes, tuple[float, Principal]] = OrderedDict()
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None

    def _apps(self) -> Any:
        # Made on first use: a grpc.aio channel belongs to the running loop.
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(self._target)
            self._stub = apps_service_pb2_grpc.AppsServiceStub(self._channel)
        return self._stub

    async def authenticate(self, token: str) -> Principal:
        """The caller ``token`` identifies.

        Raises:
            Unauthenticated: Identity does not know the key or it is revoked (identity's
                reason, ``API_KEY_INVALID`` or ``API_KEY_REVOKED``, is kept).
            Unavailable: Identity could not be asked (``IDENTITY_UNAVAILABLE``).
        """
        try:
            return await self._admin.authenticate(token)
        except Unauthenticated:
            pass
        digest = hashlib.sha256(token.encode()).digest()
        cached = self._cache.get(digest)
        if cached is not None:
            expires, principal = cached
            if expires > self._clock():
                self._cache.move_to_end(digest)
                return principal
            del self._cache[digest]
        principal = await self._ask_identity(token)
        if self._ttl > 0:
            self._cache[digest] = (self._clock() + self._ttl, principal)
            while len(self._cache) > _MAX_ENTRIES:
                self._cache.popitem(last=False)
        return principal

    async def _ask_identity(self, token: str) -> Principal:
        if not self._admin_key:
            raise Unavailable(
                "this service has no admin key to ask identity about API keys",
                reason="IDENTITY_UNAVAILABLE",
            )
        try:
            key = await self._apps().AuthenticateKey(
                apps_service_pb2.AuthenticateKeyRequest(secret=token),
                metadata=(("authorization", f"Bearer {self._admin_key}"),),
                timeout=_CALL_TIMEOUT,
            )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise Unauthenticated(
                    "the API key is not valid", reason=_reason(error) or "API_KEY_INVALID"
                ) from None
            raise Unavailable(
                "identity, which checks API keys, is unavailable; retry with backoff",
                reason="IDENTITY_UNAVAILABLE",
                metadata={"identity_code": error.code().name},
            ) from None
        except (TimeoutError, OSError):
            raise Unavailable(
                "identity, which checks API keys, is unavailable; retry with backoff",
                reason="IDENTITY_UNAVAILABLE",
            ) from None
        scope = _SCOPES.get(key.scope)
        if scope is None or not key.app_id:
            raise Unauthenticated("the API key is not valid", reason="API_KEY_INVALID")
        return Principal(app_id=key.app_id, key_id=key.key_id, scope=scope)

    async def close(self) -> None:
        """Close the channel to identity."""
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close(None)
