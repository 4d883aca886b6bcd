"""Per-app server keys a service holds to call identity for background work.

IdentityService answers only app keys (the admin key is refused there), so a service that works
for many apps without a caller (workers, engines, consumers) holds one server key per app,
minted with the admin key through ``AppsService.CreateApiKey`` the first time the app needs it
(display name ``tidings-<service>``, so the app sees who holds it and may revoke it), stored
sealed with the service's :class:`SecretBox` in its ``identity_keys`` table, and cached in
memory. Two processes minting at once: the first insert wins and the loser revokes its own key.
A key someone revoked is noticed (UNAUTHENTICATED), forgotten and minted again once; a stored
key that no longer opens (the service's secret key changed) is revoked and replaced.

The table (in the service's own database)::

    CREATE TABLE identity_keys (
        app_id text PRIMARY KEY, key_id text NOT NULL, secret bytea NOT NULL,
        create_time timestamptz NOT NULL DEFAULT now());

Errors: identity unreachable while minting -> :class:`Unavailable`; identity does not know the
app -> :class:`NotFound` (``APP_NOT_FOUND``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import grpc
import grpc.aio
from tidings.identity.v1 import app_pb2, apps_service_pb2

from services.runtime.errors import NotFound, Unavailable
from services.runtime.key_rotation import SealedColumn
from services.runtime.secrets_box import SecretBox, SecretBoxError

__all__ = ["Metadata", "ServiceKeys", "bearer"]

_TIMEOUT = 30.0

_T = TypeVar("_T")

#: gRPC call metadata carrying a key.
Metadata = tuple[tuple[str, str], ...]


def bearer(secret: str) -> Metadata:
    """The metadata that presents ``secret``."""
    return (("authorization", f"Bearer {secret}"),)


#: The sealed column of ``identity_keys`` (see :mod:`services.runtime.key_rotation`).
SEALED = SealedColumn(
    "identity_keys", ("app_id",), "secret", lambda row: f"identity/{row['app_id']}"
)


class ServiceKeys:
    """Mints, stores, caches and renews one server key per app.

    Args:
        apps: Returns an ``AppsService`` stub of identity (asked per use, so the caller's
            channel can be opened lazily and shared).
        admin_key: The admin key (mints and revokes).
        pool: Returns the service's pool (asked per use: it exists only once start-up connected).
        box: Seals the stored keys.
        key_name: Display name of the minted keys (``tidings-delivery``).
    """

    def __init__(
        self,
        apps: Callable[[], Any],
        admin_key: str,
        pool: Callable[[], asyncpg.Pool],
        box: SecretBox,
        *,
        key_name: str,
    ) -> None:
        self._apps = apps
        self._admin_key = admin_key
        self._pool = pool
        self._box = box
        self._key_name = key_name
        self._keys: dict[str, tuple[str, str]] = {}  # app -> (key id, secret)
        self._minting: dict[str, asyncio.Lock] = {}

    async def key(self, app_id: str) -> tuple[str, str]:
        """The app's ``(key id, secret)``: cached, else stored, else minted now.

        Raises:
            NotFound: identity has no such app (APP_NOT_FOUND).
            Unavailable: identity could not be asked.
        """
        cached = self._keys.get(app_id)
        if cached is not None:
            return cached
        async with self._minting.setdefault(app_id, asyncio.Lock()):
            cached = self._keys.get(app_id)
            if cached is not None:
                return cached
            try:
                key = await self._stored(app_id) or await self._mint(app_id)
            except SecretBoxError:
                key = await self._replace_unreadable(app_id)
            self._keys[app_id] = key
            return key

    async def forget(self, app_id: str, key_id: str) -> None:
        """Drop a key identity refused (the next :meth:`key` mints a new one)."""
        if self._keys.get(app_id, ("", ""))[0] == key_id:
            self._keys.pop(app_id, None)
        await self._pool().execute(
            "DELETE FROM identity_keys WHERE app_id = $1 AND key_id = $2", app_id, key_id
        )

    async def as_app(self, app_id: str, call: Callable[[Metadata], Awaitable[_T]]) -> _T:
        """Run ``call(metadata)`` with the app's key; if identity says the key is no longer
        valid (revoked), forget it and run once more with a new one.

        Raises:
            grpc.aio.AioRpcError: What ``call`` raised (the second time, for UNAUTHENTICATED).
            NotFound, Unavailable: As :meth:`key`.
        """
        for attempt in range(2):
            key_id, secret = await self.key(app_id)
            try:
                return await call(bearer(secret))
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.UNAUTHENTICATED and attempt == 0:
                    await self.forget(app_id, key_id)
                    continue
                raise
        raise AssertionError("unreachable")

    async def _stored(self, app_id: str) -> tuple[str, str] | None:
        row = await self._pool().fetchrow(
            "SELECT key_id, secret FROM identity_keys WHERE app_id = $1", app_id
        )
        if row is None:
            return None
        return str(row["key_id"]), self._box.open(row["secret"], f"identity/{app_id}").decode()

    async def _replace_unreadable(self, app_id: str) -> tuple[str, str]:
        """The stored key was sealed with other key material (the setting changed): revoke it
        (it can never be used again) and mint a new one."""
        key_id = await self._pool().fetchval(
            "DELETE FROM identity_keys WHERE app_id = $1 RETURNING key_id", app_id
        )
        if key_id is not None:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self._apps().RevokeApiKey(
                    apps_service_pb2.RevokeApiKeyRequest(app_id=app_id, key_id=key_id),
                    metadata=bearer(self._admin_key),
                    timeout=_TIMEOUT,
                )
        return await self._mint(app_id)

    async def _mint(self, app_id: str) -> tuple[str, str]:
        admin = bearer(self._admin_key)
        try:
            created = await self._apps().CreateApiKey(
                apps_service_pb2.CreateApiKeyRequest(
                    app_id=app_id, scope=app_pb2.API_KEY_SCOPE_SERVER, display_name=self._key_name
                ),
                metadata=admin,
                timeout=_TIMEOUT,
            )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(
                    f"identity does not know app {app_id!r}", reason="APP_NOT_FOUND"
                ) from None
            raise Unavailable(
                "identity is unavailable; retry with backoff",
                reason="IDENTITY_UNAVAILABLE",
                metadata={"identity_code": error.code().name},
            ) from None
        key_id, secret = str(created.api_key.key_id), str(created.secret)
        inserted = await self._pool().fetchval(
            """
            INSERT INTO identity_keys (app_id, key_id, secret) VALUES ($1, $2, $3)
            ON CONFLICT (app_id) DO NOTHING RETURNING key_id
            """,
            app_id,
            key_id,
            self._box.seal(secret.encode(), f"identity/{app_id}"),
        )
        if inserted is not None:
            return key_id, secret
        # Another process minted first: use its key, revoke ours.
        with contextlib.suppress(grpc.aio.AioRpcError):  # an unused key left is harmless
            await self._apps().RevokeApiKey(
                apps_service_pb2.RevokeApiKeyRequest(app_id=app_id, key_id=key_id),
                metadata=admin,
                timeout=_TIMEOUT,
            )
        stored = await self._stored(app_id)
        assert stored is not None
        return stored
