"""SQL for the ``apps`` and ``api_keys`` tables, and the records their rows become.

Plain parameterised statements, one round trip each. The records are defined here, beside the
queries that build them, so the domain module (``apps.py``) can import the store without the
store importing it back.

Other identity modules read an app's behaviour switches with :func:`get_app_settings`.

``apps.login_secret`` holds the app's login secret sealed (``apps.py`` seals and opens it); the
records only say whether there is one, so no read path can return it by mistake.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import asyncpg

from services.runtime.auth import Scope
from services.runtime.db import DBConnection
from services.runtime.errors import NotFound
from services.runtime.key_rotation import SealedColumn

__all__ = [
    "API_KEYS_CHANNEL",
    "LOGIN_SECRET_COLUMN",
    "ApiKeyRecord",
    "AppRecord",
    "AppSettingsRecord",
    "UndefinedFields",
    "app_exists",
    "find_api_key_by_hash",
    "get_app",
    "get_app_for_update",
    "get_app_settings",
    "get_sealed_login_secret",
    "insert_api_key",
    "insert_app",
    "list_api_keys",
    "list_apps",
    "login_secret_context",
    "notify_key_revoked",
    "revoke_api_key",
    "set_login_secret",
    "settings_from_json",
    "settings_to_json",
    "update_app",
]

#: What happens to a custom attribute with no customer-field definition.
UndefinedFields = Literal["auto_define", "reject"]

_UNDEFINED_FIELDS: tuple[UndefinedFields, ...] = ("auto_define", "reject")


@dataclass(frozen=True, slots=True)
class AppSettingsRecord:
    """An app's behaviour switches.

    Attributes:
        allow_client_login: Whether a client key may call Login/Logout for its own
            subscription (off by default: only server keys identify users).
        undefined_fields: ``auto_define`` (define a custom field from the first value written)
            or ``reject`` (refuse the write, naming the field).
        default_timezone: IANA zone for users without one, exactly as set; empty means UTC
            (use :attr:`effective_timezone` for a zone name that is never empty).
    """

    allow_client_login: bool = False
    undefined_fields: UndefinedFields = "auto_define"
    default_timezone: str = ""

    @property
    def effective_timezone(self) -> str:
        """The IANA zone to use for users without one: ``default_timezone``, or ``UTC``."""
        return self.default_timezone or "UTC"


@dataclass(frozen=True, slots=True)
class AppRecord:
    """One app (tenant) as stored; of its login secret, only whether it has one."""

    app_id: str
    display_name: str
    settings: AppSettingsRecord
    create_time: datetime
    update_time: datetime
    has_login_secret: bool = False


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    """One API key as stored: never the secret, only its prefix (the hash stays in the table).

    Attributes:
        key_id: The key's id (not secret).
        app_id: The app it belongs to.
        scope: ``Scope.SERVER`` or ``Scope.CLIENT``.
        display_name: A label.
        prefix: The first characters of the secret, to recognise the key in a list.
        create_time: When it was created.
        revoke_time: When it was revoked; None while valid.
    """

    key_id: str
    app_id: str
    scope: Scope
    display_name: str
    prefix: str
    create_time: datetime
    revoke_time: datetime | None


def settings_from_json(value: Mapping[str, Any] | None) -> AppSettingsRecord:
    """Read the ``apps.settings`` column; keys missing from older rows take their defaults."""
    value = value or {}
    undefined = value.get("undefined_fields", "auto_define")
    return AppSettingsRecord(
        allow_client_login=bool(value.get("allow_client_login", False)),
        undefined_fields=undefined if undefined in _UNDEFINED_FIELDS else "auto_define",
        default_timezone=str(value.get("default_timezone", "")),
    )


def settings_to_json(settings: AppSettingsRecord) -> dict[str, Any]:
    """The ``apps.settings`` column for ``settings`` (every key written, so rows are explicit)."""
    return {
        "allow_client_login": settings.allow_client_login,
        "undefined_fields": settings.undefined_fields,
        "default_timezone": settings.default_timezone,
    }


def _app(row: asyncpg.Record) -> AppRecord:
    return AppRecord(
        app_id=row["app_id"],
        display_name=row["display_name"],
        settings=settings_from_json(row["settings"]),
        create_time=row["create_time"],
        update_time=row["update_time"],
        has_login_secret=row["has_login_secret"],
    )


def _api_key(row: asyncpg.Record) -> ApiKeyRecord:
    return ApiKeyRecord(
        key_id=row["key_id"],
        app_id=row["app_id"],
        scope=Scope(row["scope"]),
        display_name=row["display_name"],
        prefix=row["prefix"],
        create_time=row["create_time"],
        revoke_time=row["revoke_time"],
    )


_APP_COLUMNS = (
    "app_id, display_name, settings, create_time, update_time,"
    " login_secret IS NOT NULL AS has_login_secret"
)
#: The NOTIFY channel revocations are announced on; the payload is the key id.
API_KEYS_CHANNEL = "tidings_api_keys"

_KEY_COLUMNS = "key_id, app_id, scope, display_name, prefix, create_time, revoke_time"


async def get_app_settings(conn: DBConnection, app_id: str) -> AppSettingsRecord:
    """An app's behaviour switches, for the other identity modules.

    Args:
        conn: A connection (inside the caller's transaction if it has one).
        app_id: The app, normally the caller's (``access.server_app().app_id``).

    Returns:
        The app's settings, defaults filled in.

    Raises:
        NotFound: ``APP_NOT_FOUND`` if there is no such app.
    """
    value = await conn.fetchval("SELECT settings FROM apps WHERE app_id = $1", app_id)
    if value is None:
        raise NotFound(
            f"app {app_id!r} not found", reason="APP_NOT_FOUND", metadata={"app_id": app_id}
        )
    return settings_from_json(value)


async def insert_app(
    conn: DBConnection,
    *,
    app_id: str,
    display_name: str,
    settings: AppSettingsRecord,
    request_id: str | None,
    login_secret: bytes | None = None,
) -> AppRecord:
    """Create an app, or return the one created earlier with the same ``request_id``.

    Args:
        conn: A connection.
        app_id: The new app's id (used only if the app is created now).
        display_name: Its name.
        settings: Its settings.
        request_id: The caller's idempotency key (AIP-155), or None.
        login_secret: Its login secret, sealed for ``app_id``; None for none.

    Returns:
        The app created now, or the first app created with ``request_id``.
    """
    # ON CONFLICT DO NOTHING + a read of the winner, rather than read-then-insert: two retries
    # racing each other both end up with the one app the unique constraint let through.
    row = await conn.fetchrow(
        f"""
        INSERT INTO apps (app_id, display_name, settings, request_id, login_secret)
        VALUES ($1, $2, $3, $4, $5)
        ON CONFLICT (request_id) DO NOTHING
        RETURNING {_APP_COLUMNS}
        """,
        app_id,
        display_name,
        settings_to_json(settings),
        request_id,
        login_secret,
    )
    if row is None:
        row = await conn.fetchrow(
            f"SELECT {_APP_COLUMNS} FROM apps WHERE request_id = $1", request_id
        )
        # Apps are never deleted, so the conflicting row is still there.
        assert row is not None
    return _app(row)


async def get_app(conn: DBConnection, app_id: str) -> AppRecord | None:
    """The app with id ``app_id``, or None."""
    row = await conn.fetchrow(f"SELECT {_APP_COLUMNS} FROM apps WHERE app_id = $1", app_id)
    return None if row is None else _app(row)


async def get_app_for_update(conn: DBConnection, app_id: str) -> AppRecord | None:
    """Like :func:`get_app`, locking the row until the caller's transaction ends."""
    row = await conn.fetchrow(
        f"SELECT {_APP_COLUMNS} FROM apps WHERE app_id = $1 FOR UPDATE", app_id
    )
    return None if row is None else _app(row)


async def app_exists(conn: DBConnection, app_id: str) -> bool:
    """Whether an app with id ``app_id`` exists."""
    return bool(await conn.fetchval("SELECT EXISTS (SELECT 1 FROM apps WHERE app_id = $1)", app_id))


async def list_apps(
    conn: DBConnection, *, after: tuple[datetime, str] | None, limit: int
) -> list[AppRecord]:
    """Apps oldest first, starting after the ``(create_time, app_id)`` position ``after``."""
    if after is None:
        rows = await conn.fetch(
            f"SELECT {_APP_COLUMNS} FROM apps ORDER BY create_time, app_id LIMIT $1", limit
        )
    else:
        rows = await conn.fetch(
            f"""
            SELECT {_APP_COLUMNS} FROM apps
            WHERE (create_time, app_id) > ($1, $2)
            ORDER BY create_time, app_id
            LIMIT $3
            """,
            after[0],
            after[1],
            limit,
        )
    return [_app(row) for row in rows]


async def update_app(
    conn: DBConnection, *, app_id: str, display_name: str, settings: AppSettingsRecord
) -> AppRecord:
    """Store an app's new name and settings and bump its ``update_time``.

    Raises:
        NotFound: ``APP_NOT_FOUND`` if there is no such app.
    """
    row = await conn.fetchrow(
        f"""
        UPDATE apps SET display_name = $2, settings = $3, update_time = now()
        WHERE app_id = $1
        RETURNING {_APP_COLUMNS}
        """,
        app_id,
        display_name,
        settings_to_json(settings),
    )
    if row is None:
        raise NotFound(
            f"app {app_id!r} not found", reason="APP_NOT_FOUND", metadata={"app_id": app_id}
        )
    return _app(row)


def login_secret_context(app_id: str) -> str:
    """The associated data an app's login secret is sealed with (it opens for that app only)."""
    return f"apps/{app_id}/login_secret"


#: For key rotation (:func:`services.runtime.key_rotation.reseal_all` with identity's box).
LOGIN_SECRET_COLUMN = SealedColumn(
    table="apps",
    keys=("app_id",),
    column="login_secret",
    context=lambda row: login_secret_context(row["app_id"]),
)


async def set_login_secret(conn: DBConnection, app_id: str, sealed: bytes | None) -> None:
    """Store an app's sealed login secret (None removes it); the caller checked the app exists."""
    await conn.execute("UPDATE apps SET login_secret = $2 WHERE app_id = $1", app_id, sealed)


async def get_sealed_login_secret(conn: DBConnection, app_id: str) -> bytes | None:
    """An app's login secret as stored (sealed), or None if it has none (or does not exist)."""
    value: bytes | None = await conn.fetchval(
        "SELECT login_secret FROM apps WHERE app_id = $1", app_id
    )
    return value


async def insert_api_key(
    conn: DBConnection,
    *,
    key_id: str,
    app_id: str,
    scope: Scope,
    display_name: str,
    prefix: str,
    secret_hash: bytes,
) -> ApiKeyRecord | None:
    """Store a new key of ``app_id``; None (nothing stored) if the app does not exist."""
    # INSERT … SELECT FROM apps: the existence check and the insert are one statement.
    row = await conn.fetchrow(
        f"""
        INSERT INTO api_keys (key_id, app_id, scope, display_name, prefix, secret_hash)
        SELECT $1, app_id, $3, $4, $5, $6 FROM apps WHERE app_id = $2
        RETURNING {_KEY_COLUMNS}
        """,
        key_id,
        app_id,
        scope.value,
        display_name,
        prefix,
        secret_hash,
    )
    return None if row is None else _api_key(row)


async def list_api_keys(
    conn: DBConnection, *, app_id: str, before: tuple[datetime, str] | None, limit: int
) -> list[ApiKeyRecord]:
    """Keys of ``app_id`` newest first, starting before the ``(create_time, key_id)`` position."""
    if before is None:
        rows = await conn.fetch(
            f"""
            SELECT {_KEY_COLUMNS} FROM api_keys WHERE app_id = $1
            ORDER BY create_time DESC, key_id DESC
            LIMIT $2
            """,
            app_id,
            limit,
        )
    else:
        rows = await conn.fetch(
            f"""
            SELECT {_KEY_COLUMNS} FROM api_keys
            WHERE app_id = $1 AND (create_time, key_id) < ($2, $3)
            ORDER BY create_time DESC, key_id DESC
            LIMIT $4
            """,
            app_id,
            before[0],
            before[1],
            limit,
        )
    return [_api_key(row) for row in rows]


async def revoke_api_key(conn: DBConnection, *, app_id: str, key_id: str) -> ApiKeyRecord | None:
    """Revoke a key of ``app_id``, keeping the first revoke time; None if there is no such key."""
    # coalesce: revoking again is a no-op that answers like the first revoke (idempotent).
    row = await conn.fetchrow(
        f"""
        UPDATE api_keys SET revoke_time = coalesce(revoke_time, now())
        WHERE app_id = $1 AND key_id = $2
        RETURNING {_KEY_COLUMNS}
        """,
        app_id,
        key_id,
    )
    return None if row is None else _api_key(row)


async def notify_key_revoked(conn: DBConnection, key_id: str) -> None:
    """Tell every identity process that ``key_id`` was revoked (their key caches drop it).

    Call it in the revoking transaction: Postgres delivers the notification only on commit, so
    a replica never forgets a key whose revocation then rolls back.
    """
    await conn.execute("SELECT pg_notify($1, $2)", API_KEYS_CHANNEL, key_id)


async def find_api_key_by_hash(conn: DBConnection, secret_hash: bytes) -> ApiKeyRecord | None:
    """The key whose secret hashes to ``secret_hash`` (revoked or not), or None.

    One lookup on the unique index over ``secret_hash``; callers cache valid keys
    (:mod:`services.identity.key_cache`), revocations reach the caches by NOTIFY.
    """
    row = await conn.fetchrow(
        f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE secret_hash = $1", secret_hash
    )
    return None if row is None else _api_key(row)
