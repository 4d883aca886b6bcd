"""Identity's authenticator: the admin key from the settings, or an app key from Postgres.

App keys are looked up by the SHA-256 of the presented secret on every call (one unique-index
lookup, well under a millisecond) and never cached, so a revoked key is refused from the very
next call on, in every replica.
"""

from __future__ import annotations

from services.identity.apps import authenticate_secret, principal_for
from services.runtime.app import ServiceContext
from services.runtime.auth import AdminKeyAuthenticator, Principal
from services.runtime.errors import Unauthenticated

__all__ = ["ApiKeyAuthenticator", "authenticator"]


class ApiKeyAuthenticator:
    """Resolves the admin key, or an app's server or client key, to its principal.

    Args:
        ctx: The service context; its pool is read per call (it exists only once start-up has
            connected, and the interceptor refuses keyed calls before that).
    """

    def __init__(self, ctx: ServiceContext) -> None:
        self._ctx = ctx
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
        return principal_for(await authenticate_secret(self._ctx.pool, token))


def authenticator(ctx: ServiceContext) -> ApiKeyAuthenticator:
    """The factory ``ServiceSpec.authenticator`` expects."""
    return ApiKeyAuthenticator(ctx)
