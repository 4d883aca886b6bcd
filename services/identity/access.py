"""Who may call what in identity: app scoping and the client-key allowance, in one place.

Every IdentityService handler starts with :func:`server_app` or :func:`client_or_server_app`,
which return the caller's app id (every query is scoped by it). The admin key spans apps and
is for AppsService only; app keys never reach AppsService (see ``apps_server.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from services.runtime.auth import Principal, Scope, require_scope
from services.runtime.errors import PermissionDenied

__all__ = ["AppCaller", "client_or_server_app", "require_admin", "server_app"]


@dataclass(frozen=True, slots=True)
class AppCaller:
    """The app-scoped caller of an IdentityService method."""

    app_id: str
    key_id: str
    scope: Scope

    @property
    def is_client(self) -> bool:
        """Whether the caller holds a client key (an SDK): it may act only on its own
        subscription."""
        return self.scope is Scope.CLIENT


def _app_caller(principal: Principal) -> AppCaller:
    if principal.app_id is None:
        raise PermissionDenied(
            "IdentityService works inside one app: call it with that app's server or client key",
            reason="APP_KEY_REQUIRED",
        )
    return AppCaller(app_id=principal.app_id, key_id=principal.key_id, scope=principal.scope)


def server_app() -> AppCaller:
    """The caller, who must hold a server key of an app."""
    return _app_caller(require_scope(Scope.SERVER, Scope.ADMIN))


def client_or_server_app() -> AppCaller:
    """The caller, who must hold a server or client key of an app."""
    return _app_caller(require_scope(Scope.SERVER, Scope.CLIENT, Scope.ADMIN))


def require_admin() -> Principal:
    """The caller, who must hold the admin key (AppsService)."""
    return require_scope(Scope.ADMIN)
