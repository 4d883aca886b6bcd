"""AppsService: apps and API keys, for the admin key. Proto in, domain call, proto out.

Every method starts with :func:`~services.identity.access.require_admin`: app keys (server or
client) get PERMISSION_DENIED here, so one app's key can never see or touch another app.
An app's ``login_secret`` goes in (CreateApp, UpdateApp) and never out: answers carry only
``has_login_secret``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import grpc.aio
from google.protobuf.timestamp_pb2 import Timestamp
from tidings.identity.v1 import app_pb2, apps_service_pb2, apps_service_pb2_grpc

from services.identity import apps
from services.identity.access import require_admin
from services.identity.apps import ApiKeyRecord, AppRecord, AppSettingsRecord, UndefinedFields
from services.identity.key_cache import KeyCache
from services.runtime.app import ServiceContext
from services.runtime.auth import Scope

__all__ = ["AppsServicer"]

_Context = grpc.aio.ServicerContext[Any, Any]

_POLICY_FROM_PROTO: dict[int, UndefinedFields] = {
    app_pb2.UNDEFINED_FIELD_POLICY_UNSPECIFIED: "auto_define",
    app_pb2.UNDEFINED_FIELD_POLICY_AUTO_DEFINE: "auto_define",
    app_pb2.UNDEFINED_FIELD_POLICY_REJECT: "reject",
}
_POLICY_TO_PROTO: dict[UndefinedFields, app_pb2.UndefinedFieldPolicy.ValueType] = {
    "auto_define": app_pb2.UNDEFINED_FIELD_POLICY_AUTO_DEFINE,
    "reject": app_pb2.UNDEFINED_FIELD_POLICY_REJECT,
}
_SCOPE_FROM_PROTO: dict[int, Scope] = {
    app_pb2.API_KEY_SCOPE_SERVER: Scope.SERVER,
    app_pb2.API_KEY_SCOPE_CLIENT: Scope.CLIENT,
}
_SCOPE_TO_PROTO: dict[Scope, app_pb2.ApiKeyScope.ValueType] = {
    Scope.SERVER: app_pb2.API_KEY_SCOPE_SERVER,
    Scope.CLIENT: app_pb2.API_KEY_SCOPE_CLIENT,
}


def _timestamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _settings_in(settings: app_pb2.AppSettings) -> AppSettingsRecord:
    # An unknown enum number (from a newer client) counts as unset, i.e. the default.
    return AppSettingsRecord(
        allow_client_login=settings.allow_client_login,
        undefined_fields=_POLICY_FROM_PROTO.get(settings.undefined_fields, "auto_define"),
        default_timezone=settings.default_timezone,
    )


def _app_out(app: AppRecord) -> app_pb2.App:
    return app_pb2.App(
        app_id=app.app_id,
        display_name=app.display_name,
        settings=app_pb2.AppSettings(
            allow_client_login=app.settings.allow_client_login,
            undefined_fields=_POLICY_TO_PROTO[app.settings.undefined_fields],
            default_timezone=app.settings.default_timezone,
        ),
        create_time=_timestamp(app.create_time),
        update_time=_timestamp(app.update_time),
        has_login_secret=app.has_login_secret,
    )


def _key_out(key: ApiKeyRecord) -> app_pb2.ApiKey:
    message = app_pb2.ApiKey(
        key_id=key.key_id,
        app_id=key.app_id,
        scope=_SCOPE_TO_PROTO[key.scope],
        display_name=key.display_name,
        prefix=key.prefix,
        create_time=_timestamp(key.create_time),
    )
    if key.revoke_time is not None:
        message.revoke_time.CopyFrom(_timestamp(key.revoke_time))
    return message


class AppsServicer(apps_service_pb2_grpc.AppsServiceServicer):
    """``tidings.identity.v1.AppsService``: apps and API keys (admin key only).

    Args:
        ctx: The service context.
        keys: The process's key cache, which RevokeApiKey updates before answering.
    """

    def __init__(self, ctx: ServiceContext, keys: KeyCache) -> None:
        self._ctx = ctx
        self._keys = keys

    async def CreateApp(
        self, request: apps_service_pb2.CreateAppRequest, context: _Context
    ) -> app_pb2.App:
        """Create an app, idempotent by ``request_id``."""
        require_admin()
        app = await apps.create_app(
            self._ctx.pool,
            display_name=request.app.display_name,
            settings=_settings_in(request.app.settings),
            request_id=request.request_id,
            login_secret=request.app.login_secret,
        )
        return _app_out(app)

    async def GetApp(
        self, request: apps_service_pb2.GetAppRequest, context: _Context
    ) -> app_pb2.App:
        """Return one app."""
        require_admin()
        return _app_out(await apps.get_app(self._ctx.pool, request.app_id))

    async def ListApps(
        self, request: apps_service_pb2.ListAppsRequest, context: _Context
    ) -> apps_service_pb2.ListAppsResponse:
        """List apps, oldest first."""
        require_admin()
        page = await apps.list_apps(
            self._ctx.pool, requested_size=request.page_size, page_token=request.page_token
        )
        return apps_service_pb2.ListAppsResponse(
            apps=[_app_out(app) for app in page.apps], next_page_token=page.next_page_token
        )

    async def UpdateApp(
        self, request: apps_service_pb2.UpdateAppRequest, context: _Context
    ) -> app_pb2.App:
        """Change the fields of an app named by the update mask."""
        require_admin()
        app = await apps.update_app(
            self._ctx.pool,
            app_id=request.app.app_id,
            display_name=request.app.display_name,
            settings=_settings_in(request.app.settings),
            paths=list(request.update_mask.paths),
            login_secret=request.app.login_secret,
        )
        return _app_out(app)

    async def CreateApiKey(
        self, request: apps_service_pb2.CreateApiKeyRequest, context: _Context
    ) -> apps_service_pb2.CreateApiKeyResponse:
        """Create a key; the response carries its secret, never shown again."""
        require_admin()
        created = await apps.create_api_key(
            self._ctx.pool,
            app_id=request.app_id,
            scope=_SCOPE_FROM_PROTO.get(request.scope),
            display_name=request.display_name,
        )
        return apps_service_pb2.CreateApiKeyResponse(
            api_key=_key_out(created.api_key), secret=created.secret
        )

    async def ListApiKeys(
        self, request: apps_service_pb2.ListApiKeysRequest, context: _Context
    ) -> apps_service_pb2.ListApiKeysResponse:
        """List an app's keys (prefix only), newest first."""
        require_admin()
        page = await apps.list_api_keys(
            self._ctx.pool,
            app_id=request.app_id,
            requested_size=request.page_size,
            page_token=request.page_token,
        )
        return apps_service_pb2.ListApiKeysResponse(
            api_keys=[_key_out(key) for key in page.api_keys],
            next_page_token=page.next_page_token,
        )

    async def RevokeApiKey(
        self, request: apps_service_pb2.RevokeApiKeyRequest, context: _Context
    ) -> app_pb2.ApiKey:
        """Revoke a key (idempotent)."""
        require_admin()
        key = await apps.revoke_api_key(
            self._ctx.pool, app_id=request.app_id, key_id=request.key_id
        )
        # The NOTIFY reaches this process too, but maybe after the caller's next call: forget
        # the key here before answering, so this replica refuses that call for certain.
        self._keys.forget(key.key_id)
        return _key_out(key)

    async def AuthenticateKey(
        self, request: apps_service_pb2.AuthenticateKeyRequest, context: _Context
    ) -> app_pb2.ApiKey:
        """Resolve a secret to its valid key, for the other services (admin key)."""
        require_admin()
        return _key_out(await apps.authenticate_secret(self._ctx.pool, request.secret))
