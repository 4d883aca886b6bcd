"""``UserRef`` resolution: from any way of naming a user to the user's id, one query per kind.

A ``UserRef`` names a user by ``user_id``, ``external_id``, ``alias {label, value}`` or
``subscription_id``. :func:`ref_key` turns one into a hashable :data:`RefKey` (checking its
shape), :func:`lookup` finds the ids of many keys with one query per kind of key present, and
:func:`resolve_user_id` / :func:`resolve_user_ids` do both for handlers.

Every lookup is scoped by app: another app's ids are simply not found.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from tidings.identity.v1.user_ref_pb2 import UserRef

from services.identity import users_store
from services.identity.validation import check_alias, external_id_problem
from services.runtime.db import DBConnection
from services.runtime.errors import DomainError, FieldViolations, InvalidArgument, NotFound

__all__ = [
    "ByAlias",
    "ByExternalId",
    "BySubscription",
    "ByUserId",
    "RefKey",
    "describe",
    "lookup",
    "parse_ref",
    "parse_uuid",
    "ref_key",
    "resolve_user_id",
    "resolve_user_ids",
    "user_not_found",
]


@dataclass(frozen=True, slots=True)
class ByUserId:
    """A user named by Tidings' id."""

    kind: ClassVar[str] = "user_id"

    user_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class ByExternalId:
    """A user named by the caller's CRM id."""

    kind: ClassVar[str] = "external_id"

    external_id: str


@dataclass(frozen=True, slots=True)
class ByAlias:
    """A user named by one of its aliases."""

    kind: ClassVar[str] = "alias"

    label: str
    value: str


@dataclass(frozen=True, slots=True)
class BySubscription:
    """A user named by a subscription it holds."""

    kind: ClassVar[str] = "subscription_id"

    subscription_id: uuid.UUID


#: A checked, hashable user reference.
RefKey = ByUserId | ByExternalId | ByAlias | BySubscription


def parse_uuid(text: str, field: str, violations: FieldViolations) -> uuid.UUID | None:
    """Parse an id given as text; records a violation for ``field`` if it is not a UUID."""
    if not text:
        violations.add(field, "required", reason="REQUIRED")
        return None
    try:
        return uuid.UUID(text)
    except ValueError:
        violations.add(field, f"{text[:64]!r} is not a valid id (a UUID)", reason="INVALID_ID")
        return None


def parse_ref(ref: UserRef, field: str, violations: FieldViolations) -> RefKey | None:
    """Check the shape of ``ref``, recording violations under ``field``.

    Args:
        ref: The reference from a request.
        field: Its path in the request (``ref``, ``requests[2].ref``).
        violations: Where to record problems.

    Returns:
        Its key, or None if it is malformed (a violation was recorded).
    """
    kind = ref.WhichOneof("ref")
    if kind == "user_id":
        user_id = parse_uuid(ref.user_id, f"{field}.user_id", violations)
        return ByUserId(user_id) if user_id is not None else None
    if kind == "external_id":
        external_id = ref.external_id
        problem = external_id_problem(external_id)
        if problem is None:
            return ByExternalId(external_id)
        # What check_external_id records, without its per-call path string on success.
        violations.add(f"{field}.external_id", problem, reason="INVALID_ID")
        return None
    if kind == "alias":
        before = len(violations)
        check_alias(ref.alias.label, ref.alias.value, f"{field}.alias", violations)
        return ByAlias(ref.alias.label, ref.alias.value) if len(violations) == before else None
    if kind == "subscription_id":
        subscription_id = parse_uuid(ref.subscription_id, f"{field}.subscription_id", violations)
        return BySubscription(subscription_id) if subscription_id is not None else None
    violations.add(
        field,
        "name the user by one of user_id, external_id, alias or subscription_id",
        reason="REQUIRED",
    )
    return None


def ref_key(ref: UserRef, *, field: str = "ref") -> RefKey:
    """The key of ``ref``.

    Raises:
        InvalidArgument: If the ref is unset or malformed, naming ``field`` (or a sub-field).
    """
    violations = FieldViolations()
    key = parse_ref(ref, field, violations)
    violations.raise_if_any()
    assert key is not None
    return key


def describe(key: RefKey) -> str:
    """A short human description of a ref, for error messages."""
    if isinstance(key, ByUserId):
        return f"user_id {str(key.user_id)!r}"
    if isinstance(key, ByExternalId):
        return f"external_id {key.external_id!r}"
    if isinstance(key, ByAlias):
        return f"alias {key.label}:{key.value!r}"
    return f"subscription_id {str(key.subscription_id)!r}"


def user_not_found(key: RefKey) -> NotFound:
    """The NOT_FOUND error for a ref that names nobody in the caller's app."""
    return NotFound(
        f"no user with {describe(key)}", reason="USER_NOT_FOUND", metadata={"ref": key.kind}
    )


async def lookup(
    conn: DBConnection, app_id: str, keys: Iterable[RefKey]
) -> dict[RefKey, uuid.UUID]:
    """The user ids of the keys that name a user of ``app_id``; absent keys name nobody.

    One query per kind of key present, however many keys there are.
    """
    by_kind: dict[type, list[RefKey]] = {}
    for key in dict.fromkeys(keys):
        by_kind.setdefault(type(key), []).append(key)
    found: dict[RefKey, uuid.UUID] = {}
    user_ids = [key.user_id for key in by_kind.get(ByUserId, ()) if isinstance(key, ByUserId)]
    if user_ids:
        for user_id in await users_store.existing_user_ids(conn, app_id, user_ids):
            found[ByUserId(user_id)] = user_id
    external_ids = [
        key.external_id for key in by_kind.get(ByExternalId, ()) if isinstance(key, ByExternalId)
    ]
    if external_ids:
        for external_id, user_id in (
            await users_store.users_by_external_id(conn, app_id, external_ids)
        ).items():
            found[ByExternalId(external_id)] = user_id
    aliases = [
        (key.label, key.value) for key in by_kind.get(ByAlias, ()) if isinstance(key, ByAlias)
    ]
    if aliases:
        for (label, value), user_id in (
            await users_store.users_by_alias(conn, app_id, aliases)
        ).items():
            found[ByAlias(label, value)] = user_id
    subscription_ids = [
        key.subscription_id
        for key in by_kind.get(BySubscription, ())
        if isinstance(key, BySubscription)
    ]
    if subscription_ids:
        for subscription_id, user_id in (
            await users_store.users_by_subscription(conn, app_id, subscription_ids)
        ).items():
            found[BySubscription(subscription_id)] = user_id
    return found


async def resolve_user_id(
    conn: DBConnection, app_id: str, ref: UserRef, *, field: str = "ref"
) -> uuid.UUID:
    """The id of the user ``ref`` names in ``app_id``.

    Args:
        conn: Connection.
        app_id: The caller's app.
        ref: The reference.
        field: Its path in the request, for the error.

    Raises:
        InvalidArgument: If the ref is unset or malformed, naming ``field``.
        NotFound: ``USER_NOT_FOUND`` if it names nobody in the app.
    """
    key = ref_key(ref, field=field)
    user_id = (await lookup(conn, app_id, [key])).get(key)
    if user_id is None:
        raise user_not_found(key)
    return user_id


async def resolve_user_ids(
    conn: DBConnection, app_id: str, refs: Sequence[UserRef], *, field: str = "refs"
) -> list[uuid.UUID | DomainError]:
    """The id of the user each ref names, or the error for that ref, in order.

    Batched: one query per kind of ref present, not one per ref.

    Args:
        conn: Connection.
        app_id: The caller's app.
        refs: The references.
        field: Path of the list in the request; errors name ``field[i]...``.

    Returns:
        Per ref, its user id, an ``InvalidArgument`` (malformed) or a ``NotFound``.
    """
    keys: list[RefKey | InvalidArgument] = []
    for index, ref in enumerate(refs):
        try:
            keys.append(ref_key(ref, field=f"{field}[{index}]"))
        except InvalidArgument as error:
            keys.append(error)
    found = await lookup(conn, app_id, [key for key in keys if not isinstance(key, DomainError)])
    results: list[uuid.UUID | DomainError] = []
    for key in keys:
        if isinstance(key, DomainError):
            results.append(key)
        else:
            user_id = found.get(key)
            results.append(user_id if user_id is not None else user_not_found(key))
    return results
