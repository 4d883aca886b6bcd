"""Identity's authenticator: the admin key from the settings, or an app key from Postgres.

App keys are looked up by the SHA-256 of the presented secret, and valid ones are cached in
process (:class:`~services.identity.key_cache.KeyCache`): the lookup was a pool checkout and a
round trip on every call. Revocation stays immediate in every replica: the cache is invalidated
by NOTIFY and only serves while it can hear them; revoked and unknown keys are never cached.
"""

from __future__ import annotations

from services.identity.apps import authenticate_secret, hash_secret, principal_for
from services.identity.key_cache import KeyCache
from services.runtime.app import ServiceContext
from services.runtime.auth import AdminKeyAuthenticator, Principal
from services.runtime.errors import Unauthenticated

__all__ = ["ApiKeyAuthenticator"]


class ApiKeyAuthenticator:
    """Resolves the admin key, or an app's server or client key, to its principal.

    Args:
        ctx: The service context; its pool is read per call (it exists only once start-up has
            connected, and the interceptor refuses keyed calls before that).
        keys: The process's cache of valid keys.
    """

    def __init__(self, ctx: ServiceContext, keys: KeyCache) -> None:
        self._ctx = ctx
        self._keys = keys
        self._admin = AdminKeyAuthenticator(ctx.settings.admin_key)

    async def authenticate(self, token: str) -> Principal:
        """The caller ``token`` identifies.

        Raises:
            Unauthenticated: ``API_KEY_INVALID`` when the token is neither the admin key nor an
                app key; ``API_KEY_REVOKED`` when it is a revoked app key.
        """
        try:
            # Constant-time comparison, no I/O: the admin key costs nothing to try first.
            return await self._admin.authenticate(token)
        except Unauthenticated:
            pass
        # Keyed by the hash, so no secret is kept in memory (empty tokens never get here: the
        # bearer parser refuses them, and authenticate_secret rejects them below anyway).
        digest = hash_secret(token)
        cached = self._keys.get(digest)
        if cached is not None:
            return principal_for(cached)
        epoch = self._keys.epoch
        record = await authenticate_secret(self._ctx.pool, token)
        self._keys.put(digest, record, epoch)
        return principal_for(record)
