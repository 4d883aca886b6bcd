"""Apps (tenants) and API keys: validation, secrets, paging and the use cases AppsService runs.

Secrets look like ``tk_server_<43 characters>`` or ``tk_client_<43 characters>``: the scope is
visible so a leaked key is easy to triage (and secret scanners can match the pattern), and the
random part is 32 bytes from :mod:`secrets`. Only a SHA-256 of the secret is stored: the secret
carries 256 bits of randomness, so a slow password hash would add nothing, while a plain hash
lets every call find its key with one unique-index lookup. The first characters are kept as
the key's ``prefix`` to recognise it in a list.

Other identity modules read an app's switches with :func:`get_app_settings`::

    from services.identity.apps import get_app_settings

    settings = await get_app_settings(conn, caller.app_id)
    if settings.undefined_fields == "reject": ...

An app's **login secret** (the key of the proofs a client key's Login must carry, see
``login.py``) is chosen by the app's owner, since their backend must hold it too. It is stored
sealed with identity's :class:`~services.runtime.secrets_box.SecretBox` (bound to the app), is
never returned (an app only says ``has_login_secret``), and changes only when an UpdateApp mask
names ``login_secret``: a read-modify-write with an empty mask or ``*`` cannot know it, and
must not erase it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import secrets
import uuid
import zoneinfo
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime

import asyncpg

from services.identity import apps_store, pii
from services.identity.apps_store import (
    ApiKeyRecord,
    AppRecord,
    AppSettingsRecord,
    UndefinedFields,
    get_app_settings,
)
from services.runtime import paging
from services.runtime.auth import Principal, Scope
from services.runtime.db import DBConnection
from services.runtime.errors import (
    FailedPrecondition,
    FieldViolation,
    FieldViolations,
    InvalidArgument,
    NotFound,
    Unauthenticated,
)
from services.runtime.secrets_box import SecretBoxError

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "LOGIN_SECRET_PATH",
    "MAX_DISPLAY_NAME_LENGTH",
    "MAX_LOGIN_SECRET_LENGTH",
    "MAX_PAGE_SIZE",
    "MIN_LOGIN_SECRET_LENGTH",
    "SECRET_PREFIX",
    "UPDATE_PATHS",
    "ApiKeyPage",
    "ApiKeyRecord",
    "AppPage",
    "AppRecord",
    "AppSettingsRecord",
    "NewApiKey",
    "NewSecret",
    "UndefinedFields",
    "apply_update",
    "authenticate_secret",
    "create_api_key",
    "create_app",
    "get_app",
    "get_app_settings",
    "hash_secret",
    "is_valid_timezone",
    "list_api_keys",
    "list_apps",
    "login_secret",
    "looks_like_secret",
    "new_secret",
    "principal_for",
    "revoke_api_key",
    "update_app",
    "validate_app",
]

log = logging.getLogger(__name__)

MAX_DISPLAY_NAME_LENGTH = 200
#: A login secret's length: 32 characters at least (enough randomness for an HMAC key when
#: generated, e.g. ``secrets.token_urlsafe(32)``), 256 at most.
MIN_LOGIN_SECRET_LENGTH = 32
MAX_LOGIN_SECRET_LENGTH = 256
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000

#: Every secret starts with this, then the scope and an underscore.
SECRET_PREFIX = "tk_"
#: Random bytes in a secret (256 bits), encoded as 43 unpadded base64url characters.
_SECRET_BYTES = 32
_SECRET_RANDOM_CHARS = 43
#: Random characters of the secret kept in the listed ``prefix`` (48 of its 256 bits): enough
#: to tell keys apart at a glance, far too few to help guess the rest.
_PREFIX_RANDOM_CHARS = 8
_KEY_SCOPES = (Scope.SERVER, Scope.CLIENT)
_BASE64URL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")

#: The update-mask path of the login secret; only naming it changes the secret.
LOGIN_SECRET_PATH = "login_secret"
#: Paths UpdateApp accepts in its ``update_mask``.
UPDATE_PATHS = frozenset(
    {
        "display_name",
        "settings",
        "settings.allow_client_login",
        "settings.undefined_fields",
        "settings.default_timezone",
        LOGIN_SECRET_PATH,
    }
)
#: What an empty mask or ``*`` means (AIP-134): every field but the write-only login secret.
_ALL_PATHS = UPDATE_PATHS - {LOGIN_SECRET_PATH}
_SETTINGS_FIELDS = ("allow_client_login", "undefined_fields", "default_timezone")

#: Names in the system zone database that are not IANA zones a caller means.
_NOT_ZONES = frozenset({"localtime", "posixrules", "Factory"})


# --- ids and secrets ------------------------------------------------------------------------


def _new_id(kind: str) -> str:
    """A short, URL-safe, random id: ``app_`` + 16 hex (64 bits; collisions are negligible)."""
    return f"{kind}_{secrets.token_hex(8)}"


def hash_secret(secret: str) -> bytes:
    """The stored form of a secret: its SHA-256 digest."""
    return hashlib.sha256(secret.encode()).digest()


@dataclass(frozen=True, slots=True)
class NewSecret:
    """A secret just generated.

    Attributes:
        value: The secret itself, to hand to the caller once.
        prefix: Its first characters, stored and listed.
        secret_hash: Its SHA-256, stored and looked up.
    """

    value: str
    prefix: str
    secret_hash: bytes


def new_secret(scope: Scope) -> NewSecret:
    """A fresh secret for a key of ``scope``, with its listed prefix and stored hash.

    Args:
        scope: ``Scope.SERVER`` or ``Scope.CLIENT``; it is written into the secret.
    """
    head = f"{SECRET_PREFIX}{scope.value}_"
    value = head + secrets.token_urlsafe(_SECRET_BYTES)
    return NewSecret(
        value=value,
        prefix=value[: len(head) + _PREFIX_RANDOM_CHARS],
        secret_hash=hash_secret(value),
    )


def looks_like_secret(token: str) -> bool:
    """Whether ``token`` has the shape of an app key's secret (cheap check before a lookup)."""
    for scope in _KEY_SCOPES:
        head = f"{SECRET_PREFIX}{scope.value}_"
        if token.startswith(head):
            rest = token[len(head) :]
            return len(rest) == _SECRET_RANDOM_CHARS and _BASE64URL.issuperset(rest)
    return False


# --- validation -----------------------------------------------------------------------------


@functools.cache
def _zones() -> frozenset[str]:
    # Read once: the zone list only changes when the system's tzdata is upgraded.
    return frozenset(zoneinfo.available_timezones()) - _NOT_ZONES


def is_valid_timezone(name: str) -> bool:
    """Whether ``name`` is an IANA time zone (``Europe/Madrid``, ``UTC``).

    Checked against the zone list rather than by loading ``ZoneInfo(name)``, which would also
    accept file names in the zone directory that are not zones.
    """
    return name in _zones()


def _check_display_name(violations: FieldViolations, field: str, value: str) -> None:
    if len(value) > MAX_DISPLAY_NAME_LENGTH:
        violations.add(field, f"at most {MAX_DISPLAY_NAME_LENGTH} characters", reason="TOO_LONG")


def _check_settings(
    violations: FieldViolations, prefix: str, settings: AppSettingsRecord, fields: Iterable[str]
) -> None:
    zone = settings.default_timezone
    # Empty is allowed: it means UTC.
    if "default_timezone" in fields and zone and not is_valid_timezone(zone):
        violations.add(
            f"{prefix}.default_timezone",
            f"{zone!r} is not an IANA time zone (e.g. 'Europe/Madrid')",
            reason="INVALID_TIMEZONE",
        )


def _check_login_secret(violations: FieldViolations, field: str, value: str) -> None:
    # Empty means none. Printable ASCII only, so every backend turns it into the same key bytes.
    if not value:
        return
    if len(value) < MIN_LOGIN_SECRET_LENGTH:
        violations.add(field, f"at least {MIN_LOGIN_SECRET_LENGTH} characters", reason="TOO_SHORT")
    elif len(value) > MAX_LOGIN_SECRET_LENGTH:
        violations.add(field, f"at most {MAX_LOGIN_SECRET_LENGTH} characters", reason="TOO_LONG")
    elif not all("!" <= char <= "~" for char in value):
        violations.add(
            field, "printable ASCII characters without spaces only", reason="INVALID_FORMAT"
        )


def validate_app(display_name: str, settings: AppSettingsRecord, login_secret: str = "") -> None:
    """Check a new app.

    Raises:
        InvalidArgument: Naming ``app.display_name`` (required, at most 200 characters),
            ``app.settings.default_timezone`` (an IANA zone or empty) and ``app.login_secret``
            (empty, or 32 to 256 printable ASCII characters) when they are wrong.
    """
    violations = FieldViolations()
    if not display_name.strip():
        violations.add("app.display_name", "required", reason="REQUIRED")
    _check_display_name(violations, "app.display_name", display_name)
    _check_settings(violations, "app.settings", settings, _SETTINGS_FIELDS)
    _check_login_secret(violations, "app.login_secret", login_secret)
    violations.raise_if_any()


def _check_request_id(request_id: str) -> str | None:
    """The request id to store (None when absent); AIP-155 asks for a UUID."""
    if not request_id:
        return None
    try:
        return str(uuid.UUID(request_id))
    except ValueError:
        raise _invalid("request_id", "must be a UUID", "INVALID_FORMAT") from None


def _normalise_mask(paths: Iterable[str]) -> frozenset[str]:
    """The update paths, expanded: empty or ``*`` means every field but the login secret."""
    paths = list(paths)
    if not paths or paths == ["*"]:
        return _ALL_PATHS
    unknown = [path for path in paths if path not in UPDATE_PATHS]
    if unknown:
        violations = FieldViolations()
        for path in unknown:
            violations.add(
                "update_mask",
                f"unknown path {path!r}; use {', '.join(sorted(UPDATE_PATHS))} or '*'",
                reason="UNKNOWN_PATH",
            )
        violations.raise_if_any()
    return frozenset(paths)


def apply_update(
    current: AppRecord,
    *,
    display_name: str,
    settings: AppSettingsRecord,
    paths: Iterable[str],
    login_secret: str = "",
) -> tuple[str, AppSettingsRecord]:
    """The app's new name and settings after an UpdateApp, validated.

    Args:
        current: The app as stored.
        display_name: The requested name (used if the mask names it).
        settings: The requested settings (each field used if the mask names it, or
            ``settings`` as a whole).
        paths: The update mask's paths; empty or ``*`` means all fields but the login secret.
        login_secret: The requested login secret (validated if the mask names it; the caller
            stores it).

    Returns:
        The new display name and settings.

    Raises:
        InvalidArgument: ``update_mask`` names an unknown path, or a changed field is invalid
            (named as ``app.display_name`` / ``app.settings.<field>`` / ``app.login_secret``).
    """
    mask = _normalise_mask(paths)
    violations = FieldViolations()
    if LOGIN_SECRET_PATH in mask:
        _check_login_secret(violations, "app.login_secret", login_secret)
    new_name = current.display_name
    if "display_name" in mask:
        if not display_name.strip():
            violations.add("app.display_name", "required", reason="REQUIRED")
        _check_display_name(violations, "app.display_name", display_name)
        new_name = display_name
    changed = (
        _SETTINGS_FIELDS
        if "settings" in mask
        else tuple(field for field in _SETTINGS_FIELDS if f"settings.{field}" in mask)
    )
    new_settings = replace(
        current.settings, **{field: getattr(settings, field) for field in changed}
    )
    _check_settings(violations, "app.settings", new_settings, changed)
    violations.raise_if_any()
    return new_name, new_settings


def _invalid(field: str, description: str, reason: str) -> InvalidArgument:
    """The error for one invalid field, worded like ``FieldViolations.raise_if_any``'s."""
    return InvalidArgument(
        f"invalid request: {field}",
        reason="INVALID_FIELDS",
        field_violations=[FieldViolation(field, description, reason)],
    )


def _require(violations: FieldViolations, field: str, value: str) -> None:
    if not value:
        violations.add(field, "required", reason="REQUIRED")


# --- paging ---------------------------------------------------------------------------------


def _page_size(requested: int) -> int:
    """The number of items to serve: 50 for 0, at most 1,000 (AIP-158)."""
    return paging.page_size(requested, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)


def _encode_position(list_name: str, create_time: datetime, item_id: str) -> str:
    """A page token for the position after ``(create_time, item_id)`` in ``list_name``."""
    return paging.encode_page_token(list_name, {"t": create_time.isoformat(), "id": item_id})


def _decode_position(list_name: str, token: str) -> tuple[datetime, str] | None:
    """The ``(create_time, item_id)`` a page token stands for; None for the first page.

    Raises:
        InvalidArgument: Naming ``page_token`` if it is not a token of ``list_name``.
    """
    if not token:
        return None
    position = paging.decode_page_token(list_name, token)
    try:
        create_time = datetime.fromisoformat(position["t"])
        item_id = position["id"]
    except (KeyError, ValueError):
        raise paging.bad_page_token() from None
    if create_time.tzinfo is None:
        raise paging.bad_page_token()
    return create_time, item_id


def _app_not_found(app_id: str) -> NotFound:
    return NotFound(
        f"app {app_id!r} not found", reason="APP_NOT_FOUND", metadata={"app_id": app_id}
    )


# --- use cases ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AppPage:
    """One page of apps and the token of the next (empty on the last page)."""

    apps: list[AppRecord]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class ApiKeyPage:
    """One page of API keys and the token of the next (empty on the last page)."""

    api_keys: list[ApiKeyRecord]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class NewApiKey:
    """A key just created, with its secret: the only time the secret exists outside a hash."""

    api_key: ApiKeyRecord
    secret: str


def _seal_login_secret(app_id: str, secret: str) -> bytes | None:
    """The stored form of a login secret (None for empty: no secret)."""
    if not secret:
        return None
    return pii.box().seal(secret.encode(), apps_store.login_secret_context(app_id))


async def login_secret(conn: DBConnection, app_id: str) -> bytes | None:
    """App ``app_id``'s login secret (the key of its login proofs), or None if it has none.

    Raises:
        FailedPrecondition: ``LOGIN_SECRET_UNREADABLE``: no key of
            ``TIDINGS_IDENTITY_SECRET_KEY`` opens it (the material it was sealed with was
            dropped); logins that need it are refused until it is set again.
    """
    sealed = await apps_store.get_sealed_login_secret(conn, app_id)
    if sealed is None:
        return None
    try:
        return pii.box().open(sealed, apps_store.login_secret_context(app_id))
    except SecretBoxError:
        log.error("the login secret of app %s opens with no listed key", app_id)
        raise FailedPrecondition(
            "the app's login secret cannot be read by this deployment; set it again with "
            "UpdateApp (login_secret)",
            reason="LOGIN_SECRET_UNREADABLE",
            metadata={"app_id": app_id},
        ) from None


async def create_app(
    pool: asyncpg.Pool,
    *,
    display_name: str,
    settings: AppSettingsRecord,
    request_id: str,
    login_secret: str = "",
) -> AppRecord:
    """Create an app; a retry with the same ``request_id`` returns the first app (AIP-155).

    Raises:
        InvalidArgument: The app or the request id is invalid (see :func:`validate_app`).
    """
    validate_app(display_name, settings, login_secret)
    stored_request_id = _check_request_id(request_id)
    app_id = _new_id("app")
    async with pool.acquire() as conn:
        return await apps_store.insert_app(
            conn,
            app_id=app_id,
            display_name=display_name,
            settings=settings,
            request_id=stored_request_id,
            login_secret=_seal_login_secret(app_id, login_secret),
        )


async def get_app(pool: asyncpg.Pool, app_id: str) -> AppRecord:
    """The app ``app_id``.

    Raises:
        InvalidArgument: ``app_id`` is empty.
        NotFound: ``APP_NOT_FOUND``.
    """
    violations = FieldViolations()
    _require(violations, "app_id", app_id)
    violations.raise_if_any()
    async with pool.acquire() as conn:
        app = await apps_store.get_app(conn, app_id)
    if app is None:
        raise _app_not_found(app_id)
    return app


async def list_apps(pool: asyncpg.Pool, *, requested_size: int, page_token: str) -> AppPage:
    """A page of apps, oldest first.

    Raises:
        InvalidArgument: ``page_size`` negative or ``page_token`` not one of ours.
    """
    size = _page_size(requested_size)
    after = _decode_position("apps", page_token)
    async with pool.acquire() as conn:
        # One more than asked: whether it comes back tells if there is a next page.
        apps = await apps_store.list_apps(conn, after=after, limit=size + 1)
    if len(apps) <= size:
        return AppPage(apps=apps, next_page_token="")
    last = apps[size - 1]
    return AppPage(
        apps=apps[:size],
        next_page_token=_encode_position("apps", last.create_time, last.app_id),
    )


async def update_app(
    pool: asyncpg.Pool,
    *,
    app_id: str,
    display_name: str,
    settings: AppSettingsRecord,
    paths: Iterable[str],
    login_secret: str = "",
) -> AppRecord:
    """Change the fields of app ``app_id`` named by ``paths`` (see :func:`apply_update`).

    The login secret changes (is set, rotated, or removed when empty) only if ``paths`` names
    ``login_secret``; proofs made with the old secret fail from the commit on.

    Raises:
        InvalidArgument: ``app.app_id`` empty, a bad mask path or an invalid new value.
        NotFound: ``APP_NOT_FOUND``.
    """
    violations = FieldViolations()
    _require(violations, "app.app_id", app_id)
    violations.raise_if_any()
    paths = list(paths)
    mask = _normalise_mask(paths)  # a bad mask is a bad request whether or not the app exists
    async with pool.acquire() as conn, conn.transaction():
        # Locked: two concurrent partial updates must not lose each other's fields.
        current = await apps_store.get_app_for_update(conn, app_id)
        if current is None:
            raise _app_not_found(app_id)
        new_name, new_settings = apply_update(
            current,
            display_name=display_name,
            settings=settings,
            paths=paths,
            login_secret=login_secret,
        )
        if LOGIN_SECRET_PATH in mask:
            sealed = _seal_login_secret(app_id, login_secret)
            await apps_store.set_login_secret(conn, app_id, sealed)
        return await apps_store.update_app(
            conn, app_id=app_id, display_name=new_name, settings=new_settings
        )


async def create_api_key(
    pool: asyncpg.Pool, *, app_id: str, scope: Scope | None, display_name: str
) -> NewApiKey:
    """Create a key of ``scope`` for app ``app_id``; the secret is returned here only.

    Args:
        pool: The identity database.
        app_id: The app.
        scope: ``Scope.SERVER`` or ``Scope.CLIENT``; None when the caller left it unset.
        display_name: A label (at most 200 characters).

    Raises:
        InvalidArgument: ``app_id`` or ``scope`` missing, ``display_name`` too long.
        NotFound: ``APP_NOT_FOUND``.
    """
    violations = FieldViolations()
    _require(violations, "app_id", app_id)
    if scope not in _KEY_SCOPES:
        violations.add("scope", "required: API_KEY_SCOPE_SERVER or API_KEY_SCOPE_CLIENT")
    _check_display_name(violations, "display_name", display_name)
    violations.raise_if_any()
    assert scope is not None
    secret = new_secret(scope)
    async with pool.acquire() as conn:
        record = await apps_store.insert_api_key(
            conn,
            key_id=_new_id("key"),
            app_id=app_id,
            scope=scope,
            display_name=display_name,
            prefix=secret.prefix,
            secret_hash=secret.secret_hash,
        )
    if record is None:
        raise _app_not_found(app_id)
    return NewApiKey(api_key=record, secret=secret.value)


async def list_api_keys(
    pool: asyncpg.Pool, *, app_id: str, requested_size: int, page_token: str
) -> ApiKeyPage:
    """A page of app ``app_id``'s keys (revoked ones too), newest first.

    Raises:
        InvalidArgument: ``app_id`` empty, ``page_size`` negative or a bad ``page_token``.
        NotFound: ``APP_NOT_FOUND``.
    """
    violations = FieldViolations()
    _require(violations, "app_id", app_id)
    violations.raise_if_any()
    size = _page_size(requested_size)
    before = _decode_position("api_keys", page_token)
    async with pool.acquire() as conn:
        keys = await apps_store.list_api_keys(conn, app_id=app_id, before=before, limit=size + 1)
        # An empty page is ambiguous: an app without keys, or no app at all.
        if not keys and not await apps_store.app_exists(conn, app_id):
            raise _app_not_found(app_id)
    if len(keys) <= size:
        return ApiKeyPage(api_keys=keys, next_page_token="")
    last = keys[size - 1]
    return ApiKeyPage(
        api_keys=keys[:size],
        next_page_token=_encode_position("api_keys", last.create_time, last.key_id),
    )


async def revoke_api_key(pool: asyncpg.Pool, *, app_id: str, key_id: str) -> ApiKeyRecord:
    """Revoke a key; revoking it again is harmless and keeps the first ``revoke_time``.

    Raises:
        InvalidArgument: ``app_id`` or ``key_id`` empty.
        NotFound: ``API_KEY_NOT_FOUND`` if app ``app_id`` has no such key (a key of another app
            is not found either).
    """
    violations = FieldViolations()
    _require(violations, "app_id", app_id)
    _require(violations, "key_id", key_id)
    violations.raise_if_any()
    async with pool.acquire() as conn, conn.transaction():
        record = await apps_store.revoke_api_key(conn, app_id=app_id, key_id=key_id)
        if record is not None:
            # In the transaction: every replica's key cache drops the key once this commits.
            await apps_store.notify_key_revoked(conn, key_id)
    if record is None:
        raise NotFound(
            f"API key {key_id!r} not found in app {app_id!r}",
            reason="API_KEY_NOT_FOUND",
            metadata={"app_id": app_id, "key_id": key_id},
        )
    return record


async def authenticate_secret(pool: asyncpg.Pool, secret: str) -> ApiKeyRecord:
    """The valid key ``secret`` belongs to.

    A revoked key is answered ``API_KEY_REVOKED`` rather than ``API_KEY_INVALID``: only
    someone who once held the secret can learn that, and it tells a key's owner why calls
    started failing. Anyone else learns nothing (secrets are unguessable).

    Raises:
        InvalidArgument: ``secret`` is empty (a caller's bug, not a bad key).
        Unauthenticated: ``API_KEY_INVALID`` for an unknown secret, ``API_KEY_REVOKED`` for a
            revoked key.
    """
    if not secret:
        raise _invalid("secret", "required", "REQUIRED")
    record = None
    if looks_like_secret(secret):
        async with pool.acquire() as conn:
            record = await apps_store.find_api_key_by_hash(conn, hash_secret(secret))
    if record is None:
        raise Unauthenticated("the API key is not valid", reason="API_KEY_INVALID")
    if record.revoke_time is not None:
        raise Unauthenticated(
            "the API key has been revoked",
            reason="API_KEY_REVOKED",
            metadata={"key_id": record.key_id},
        )
    return record


def principal_for(key: ApiKeyRecord) -> Principal:
    """The principal a valid app key authenticates as."""
    return Principal(app_id=key.app_id, key_id=key.key_id, scope=key.scope)
