"""Who may call what in delivery: a server key of the app, or (ReportEngagement,
ListInAppMessages) a client key.

The admin key spans apps and has nothing to do here (PERMISSION_DENIED); every query is scoped
by the caller's app, so another app's ids answer NOT_FOUND.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.runtime.auth import Principal, Scope, require_scope
from services.runtime.errors import PermissionDenied

__all__ = ["AppCaller", "client_or_server_app", "server_app"]


@dataclass(frozen=True, slots=True)
class AppCaller:
    """The app-scoped caller of a DeliveryService method."""

    app_id: str
    key_id: str
    scope: Scope


def _app_caller(principal: Principal) -> AppCaller:
    if principal.app_id is None:
        raise PermissionDenied(
            "DeliveryService works inside one app: call it with that app's server key",
            reason="APP_KEY_REQUIRED",
        )
    return AppCaller(app_id=principal.app_id, key_id=principal.key_id, scope=principal.scope)


def server_app() -> AppCaller:
    """The caller, who must hold a server key of an app."""
    return _app_caller(require_scope(Scope.SERVER, Scope.ADMIN))


def client_or_server_app() -> AppCaller:
    """The caller, who must hold a server or client key of an app."""
    return _app_caller(require_scope(Scope.SERVER, Scope.CLIENT, Scope.ADMIN))
