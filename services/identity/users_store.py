"""SQL for profiles: ``users``, ``user_aliases``, ``customer_fields`` and ``user_merges``.

Plain parameterised statements, one per batch: many rows travel as parallel arrays through
``unnest``, never as a statement per row. Every statement is scoped by ``app_id``.

Custom attributes are stored as a JSON object of plain values: strings, numbers, booleans, and
timestamps as RFC 3339 strings in UTC with microseconds (``2026-01-31T09:00:00.000000Z``, which
sorts as text in time order); the type of each name is in ``customer_fields``. Values of PII
fields are sealed objects (:mod:`services.identity.pii`): profiles are opened as they are read
and the writes seal the names they are told to, so :class:`Profile` always holds plain values.

Other identity modules use :func:`insert_anonymous_users` (subscriptions, Login, Logout) and
:func:`load_users` (whole profiles).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import asyncpg

from services.identity import pii, subscriptions_store, suppressions
from services.identity.fields import CustomerField, FieldType
from services.runtime.db import DBConnection

__all__ = [
    "Alias",
    "Birthdate",
    "JsonScalar",
    "ListedUser",
    "MergeRecord",
    "Profile",
    "RefKind",
    "User",
    "adopt_auto_defined_field",
    "alias_labels_of",
    "count_aliases",
    "customer_fields",
    "delete_alias",
    "delete_user",
    "existing_user_ids",
    "field_from_row",
    "format_timestamp",
    "insert_alias",
    "insert_aliases",
    "insert_anonymous_users",
    "insert_auto_fields",
    "insert_customer_field",
    "insert_profiles",
    "list_customer_fields",
    "list_user_ids",
    "load_user_by",
    "load_users",
    "lock_profiles",
    "lock_user",
    "merges_into",
    "new_user_ids",
    "parse_timestamp",
    "touch_user",
    "update_profiles",
    "users_by_alias",
    "users_by_external_id",
    "users_by_subscription",
]

#: A stored custom attribute value (timestamps are RFC 3339 strings).
JsonScalar = str | float | bool


@dataclass(frozen=True, slots=True)
class Birthdate:
    """A date of birth whose year may be unknown.

    Attributes:
        month: 1-12.
        day: 1-31, valid for the month (February 29 when the year is unknown or leap).
        year: The year, or None when unknown.
    """

    month: int
    day: int
    year: int | None = None


@dataclass(frozen=True, slots=True)
class Alias:
    """A label/value id of a user."""

    label: str
    value: str


@dataclass(slots=True)
class Profile:
    """The ``users`` row: standard attributes and custom attributes of one user.

    Attributes:
        user_id: Tidings' id.
        external_id: The CRM id, None while anonymous.
        first_name: Given name.
        last_name: Family name.
        email: Contact address (normalised).
        phone: Contact number (E.164).
        birthdate: Date of birth.
        timezone: IANA zone name.
        language: Language tag (``pt-BR``).
        country: ISO 3166 alpha-2 code.
        attributes: Custom attributes as stored (:data:`JsonScalar` values).
        create_time: When the profile was created.
        update_time: When it last changed.
    """

    user_id: uuid.UUID
    create_time: datetime
    update_time: datetime
    external_id: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    email: str | None = None
    phone: str | None = None
    birthdate: Birthdate | None = None
    timezone: str | None = None
    language: str | None = None
    country: str | None = None
    attributes: dict[str, JsonScalar] = field(default_factory=dict)


@dataclass(slots=True)
class User:
    """A whole profile as read: the row, its aliases, subscriptions and counts.

    Attributes:
        profile: The ``users`` row.
        aliases: Its aliases, oldest first.
        timestamp_attributes: Which custom attribute names hold timestamps (their definitions
            say so), to turn the stored strings back into times.
        subscriptions: Its subscriptions (empty when not asked for).
        subscription_count: How many subscriptions it holds (0 when not asked for).
        event_count: How many events are stored for it (0 when not asked for).
    """

    profile: Profile
    aliases: list[Alias]
    timestamp_attributes: frozenset[str]
    subscriptions: list[subscriptions_store.Subscription]
    subscription_count: int = 0
    event_count: int = 0


@dataclass(frozen=True, slots=True)
class MergeRecord:
    """A Login that folded ``from_user_id`` into ``into_user_id``."""

    from_user_id: uuid.UUID
    into_user_id: uuid.UUID
    subscription_id: uuid.UUID | None
    key_id: str
    merge_time: datetime


def format_timestamp(moment: datetime) -> str:
    """The stored form of a timestamp attribute: RFC 3339, UTC, microseconds, ``Z``."""
    utc = moment if moment.tzinfo is UTC else moment.astimezone(UTC)
    if utc.year < 1000:
        # strftime leaves such years unpadded; stored values keep that form.
        return utc.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    # isoformat is several times cheaper than strftime, and a batch formats thousands.
    return utc.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def parse_timestamp(text: str) -> datetime:
    """Read a stored timestamp attribute (any RFC 3339 form), timezone-aware."""
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def new_user_ids(count: int) -> list[uuid.UUID]:
    """Fresh user ids, time-ordered (UUID version 7, RFC 9562).

    Ids that grow with time land at the right edge of the ``(app_id, user_id)`` B-tree, so bulk
    creation touches a few index pages instead of one random page per user.
    """
    millis = time.time_ns() // 1_000_000
    ids = []
    entropy = os.urandom(10 * count)  # one read of the OS's random source, not one per id
    for offset in range(0, 10 * count, 10):
        random_bits = int.from_bytes(entropy[offset : offset + 10], "big")
        value = (millis & 0xFFFF_FFFF_FFFF) << 80 | random_bits
        # Version 7 in bits 48-51, RFC variant (0b10) in bits 64-65.
        value = (value & ~(0xF << 76)) | (0x7 << 76)
        value = (value & ~(0x3 << 62)) | (0x2 << 62)
        ids.append(uuid.UUID(int=value))
    return ids


# -- lookups (refs) ------------------------------------------------------------------------------
#
# Many keys are looked up as a nested loop of single-key index lookups (unnest, then a LATERAL
# subquery per key, kept from being flattened into a join by LIMIT 1). With ``col = ANY($2)``
# or a plain join, a table the planner has no statistics for yet (a new app, a fresh database)
# gets a scan of the whole app, and a parameter array is searched linearly for every row.

_ONE = "LIMIT 1"


async def existing_user_ids(
    conn: DBConnection, app_id: str, user_ids: Sequence[uuid.UUID]
) -> list[uuid.UUID]:
    """Those of ``user_ids`` that are users of ``app_id``."""
    rows = await conn.fetch(
        f"""
        SELECT u.user_id
        FROM unnest($2::uuid[]) AS k(user_id)
        CROSS JOIN LATERAL (
            SELECT user_id FROM users WHERE app_id = $1 AND user_id = k.user_id {_ONE}
        ) AS u
        """,
        app_id,
        list(user_ids),
    )
    return [row["user_id"] for row in rows]


async def users_by_external_id(
    conn: DBConnection, app_id: str, external_ids: Sequence[str]
) -> dict[str, uuid.UUID]:
    """The user holding each of ``external_ids``, for those held by someone."""
    rows = await conn.fetch(
        f"""
        SELECT u.external_id, u.user_id
        FROM unnest($2::text[]) AS k(external_id)
        CROSS JOIN LATERAL (
            SELECT external_id, user_id FROM users
            WHERE app_id = $1 AND external_id = k.external_id {_ONE}
        ) AS u
        """,
        app_id,
        list(external_ids),
    )
    return {row["external_id"]: row["user_id"] for row in rows}


async def users_by_alias(
    conn: DBConnection, app_id: str, aliases: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], uuid.UUID]:
    """The user holding each ``(label, value)`` alias, for those held by someone."""
    rows = await conn.fetch(
        f"""
        SELECT a.label, a.value, a.user_id
        FROM unnest($2::text[], $3::text[]) AS k(label, value)
        CROSS JOIN LATERAL (
            SELECT label, value, user_id FROM user_aliases
            WHERE app_id = $1 AND label = k.label AND value = k.value {_ONE}
        ) AS a
        """,
        app_id,
        [label for label, _ in aliases],
        [value for _, value in aliases],
    )
    return {(row["label"], row["value"]): row["user_id"] for row in rows}


async def users_by_subscription(
    conn: DBConnection, app_id: str, subscription_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, uuid.UUID]:
    """The user holding each of ``subscription_ids``, for those that exist."""
    rows = await conn.fetch(
        f"""
        SELECT s.subscription_id, s.user_id
        FROM unnest($2::uuid[]) AS k(subscription_id)
        CROSS JOIN LATERAL (
            SELECT subscription_id, user_id FROM subscriptions
            WHERE app_id = $1 AND subscription_id = k.subscription_id {_ONE}
        ) AS s
        """,
        app_id,
        list(subscription_ids),
    )
    return {row["subscription_id"]: row["user_id"] for row in rows}


# -- profiles ------------------------------------------------------------------------------------

_PROFILE_COLUMNS = """
user_id, external_id, first_name, last_name, email, phone, birth_year, birth_month, birth_day,
timezone, language, country, attributes, create_time, update_time
"""


def _number(value: Any) -> JsonScalar:
    # JSON has one number type; json.loads gives int for "3", but attributes are doubles.
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str | float | bool):
        return value
    raise TypeError(f"unexpected stored attribute value {value!r}")


#: Stored attribute values that need no conversion (checked by exact type: a bool is an int).
_PLAIN_TYPES = frozenset({str, float, bool})


def _attributes(app_id: str, user_id: uuid.UUID, stored: dict[str, Any]) -> dict[str, JsonScalar]:
    """The stored attributes as :data:`JsonScalar` values (whole numbers read back as floats,
    sealed values opened)."""
    for value in stored.values():
        if type(value) not in _PLAIN_TYPES:
            if any(pii.is_sealed(value) for value in stored.values()):
                stored = pii.open_attributes(app_id, user_id, stored)
            return {name: _number(value) for name, value in stored.items()}
    # The common case: json.loads built a fresh dict of plain values; no copy needed.
    return stored


def _profile(row: asyncpg.Record, app_id: str) -> Profile:
    month = row["birth_month"]
    return Profile(
        user_id=row["user_id"],
        external_id=row["external_id"],
        first_name=row["first_name"],
        last_name=row["last_name"],
        email=row["email"],
        phone=row["phone"],
        birthdate=Birthdate(month, row["birth_day"], row["birth_year"]) if month else None,
        timezone=row["timezone"],
        language=row["language"],
        country=row["country"],
        attributes=_attributes(app_id, row["user_id"], row["attributes"]),
        create_time=row["create_time"],
        update_time=row["update_time"],
    )


async def lock_profiles(
    conn: DBConnection, app_id: str, user_ids: Iterable[uuid.UUID]
) -> dict[uuid.UUID, Profile]:
    """Read and lock (``FOR UPDATE``) the rows of ``user_ids`` for a read-modify-write.

    Rows are locked in id order, so two batches touching the same users cannot deadlock.
    Users that do not exist are absent from the result.
    """
    rows = await conn.fetch(
        f"""
        SELECT u.*
        FROM unnest($2::uuid[]) WITH ORDINALITY AS k(user_id, n)
        CROSS JOIN LATERAL (
            SELECT {_PROFILE_COLUMNS} FROM users
            WHERE app_id = $1 AND user_id = k.user_id
            FOR UPDATE
        ) AS u
        ORDER BY k.n
        """,
        app_id,
        sorted(set(user_ids)),
    )
    return {row["user_id"]: _profile(row, app_id) for row in rows}


async def lock_user(conn: DBConnection, app_id: str, user_id: uuid.UUID) -> Profile | None:
    """Read and lock one user's row; None if there is no such user."""
    return (await lock_profiles(conn, app_id, [user_id])).get(user_id)


def _columns(app_id: str, profiles: Sequence[Profile], sealed: frozenset[str]) -> list[list[Any]]:
    """The profiles as parallel arrays, in the column order of the write statements, with the
    attribute values of ``sealed`` names sealed."""
    if sealed:
        attributes = [
            pii.seal_attributes(app_id, p.user_id, p.attributes, sealed)
            if not sealed.isdisjoint(p.attributes)
            else p.attributes
            for p in profiles
        ]
    else:
        attributes = [p.attributes for p in profiles]
    return [
        [p.user_id for p in profiles],
        [p.external_id for p in profiles],
        [p.first_name for p in profiles],
        [p.last_name for p in profiles],
        [p.email for p in profiles],
        [p.phone for p in profiles],
        [p.birthdate.year if p.birthdate else None for p in profiles],
        [p.birthdate.month if p.birthdate else None for p in profiles],
        [p.birthdate.day if p.birthdate else None for p in profiles],
        [p.timezone for p in profiles],
        [p.language for p in profiles],
        [p.country for p in profiles],
        attributes,
    ]


_UNNEST = """
unnest($2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::int2[],
       $9::int2[], $10::int2[], $11::text[], $12::text[], $13::text[], $14::jsonb[])
    AS v(user_id, external_id, first_name, last_name, email, phone, birth_year, birth_month,
         birth_day, timezone, language, country, attributes)
"""

_INSERT_PROFILES = f"""
INSERT INTO users (app_id, user_id, external_id, first_name, last_name, email, phone, birth_year,
                   birth_month, birth_day, timezone, language, country, attributes, create_time,
                   update_time)
SELECT $1, v.user_id, v.external_id, v.first_name, v.last_name, v.email, v.phone, v.birth_year,
       v.birth_month, v.birth_day, v.timezone, v.language, v.country, v.attributes, $15, $15
FROM {_UNNEST}
ON CONFLICT DO NOTHING
RETURNING user_id
"""

_UPDATE_PROFILES = f"""
UPDATE users AS u
SET external_id = v.external_id, first_name = v.first_name, last_name = v.last_name,
    email = v.email, phone = v.phone, birth_year = v.birth_year, birth_month = v.birth_month,
    birth_day = v.birth_day, timezone = v.timezone, language = v.language, country = v.country,
    attributes = v.attributes, update_time = $15
FROM {_UNNEST}
WHERE u.app_id = $1 AND u.user_id = v.user_id
"""


async def insert_profiles(
    conn: DBConnection,
    app_id: str,
    profiles: Sequence[Profile],
    at: datetime,
    *,
    sealed: frozenset[str] = frozenset(),
) -> set[uuid.UUID]:
    """Create users (one statement); returns the ids actually inserted.

    A profile whose id or external id is taken already is skipped (``ON CONFLICT DO
    NOTHING``), so the caller can tell a lost race from a success. ``create_time`` and
    ``update_time`` are ``at``; attributes named in ``sealed`` (PII fields) are stored sealed.
    """
    if not profiles:
        return set()
    rows = await conn.fetch(_INSERT_PROFILES, app_id, *_columns(app_id, profiles, sealed), at)
    return {row["user_id"] for row in rows}


async def update_profiles(
    conn: DBConnection,
    app_id: str,
    profiles: Sequence[Profile],
    at: datetime,
    *,
    sealed: frozenset[str] = frozenset(),
) -> None:
    """Write the whole new state of existing users (one statement); ``update_time`` is ``at``.

    Call it on rows locked with :func:`lock_profiles` in the same transaction. Attributes
    named in ``sealed`` (PII fields) are stored sealed.
    """
    if profiles:
        await conn.execute(_UPDATE_PROFILES, app_id, *_columns(app_id, profiles, sealed), at)


async def insert_anonymous_users(
    conn: DBConnection, app_id: str, count: int, at: datetime
) -> list[uuid.UUID]:
    """Create ``count`` empty (anonymous) profiles in one statement.

    For subscriptions registered without a user, and for Logout. The caller publishes the
    ``KIND_USER_CREATED`` changes in its transaction (:mod:`services.identity.changes`).

    Args:
        conn: Connection, inside the caller's transaction.
        app_id: The app.
        count: How many profiles.
        at: Their creation time.

    Returns:
        The new user ids, in creation order.
    """
    if count <= 0:
        return []
    user_ids = new_user_ids(count)
    await conn.execute(
        """
        INSERT INTO users (app_id, user_id, create_time, update_time)
        SELECT $1, id, $3, $3 FROM unnest($2::uuid[]) AS id
        """,
        app_id,
        user_ids,
        at,
    )
    return user_ids


#: A profile with its aliases and the names of its timestamp attributes, from ``users u``.
_USER_FIELDS = f"""
{_PROFILE_COLUMNS},
    (SELECT coalesce(jsonb_agg(jsonb_build_array(a.label, a.value)
                               ORDER BY a.create_time, a.label), '[]')
     FROM user_aliases a WHERE a.app_id = u.app_id AND a.user_id = u.user_id) AS aliases,
    ARRAY(SELECT f.name FROM customer_fields f
          WHERE f.app_id = u.app_id AND f.type = 'timestamp' AND u.attributes ? f.name)
        AS timestamp_attributes
"""

_LOAD_USERS = f"""
SELECT {_USER_FIELDS},
    CASE WHEN $3 THEN (SELECT count(*) FROM events e
                       WHERE e.app_id = u.app_id AND e.user_id = u.user_id)
         ELSE 0 END AS event_count
FROM users u
WHERE u.app_id = $1 AND u.user_id = ANY($2::uuid[])
"""

#: How :func:`load_user_by` finds the user, per kind of reference ($1 is the app; the
#: reference's values follow). Same lookups as the ``users_by_*`` functions above.
RefKind = Literal["user_id", "external_id", "alias", "subscription_id"]
_TARGET: dict[RefKind, str] = {
    "user_id": "SELECT $2::uuid AS user_id",
    "external_id": f"SELECT user_id FROM users WHERE app_id = $1 AND external_id = $2 {_ONE}",
    "alias": f"""
        SELECT user_id FROM user_aliases WHERE app_id = $1 AND label = $2 AND value = $3 {_ONE}
    """,
    "subscription_id": f"""
        SELECT user_id FROM subscriptions WHERE app_id = $1 AND subscription_id = $2 {_ONE}
    """,
}
#: Column prefix of the subscription columns in :data:`_LOAD_USER_BY` (they share names with
#: the profile's).
_SUB = "s_"
#: One round trip for a whole profile: resolve the ref, read the profile with its aliases and
#: event count (once, MATERIALIZED), and join its subscriptions: one row per subscription, or
#: one row with NULL subscription columns for a user with none; no row if the ref names nobody.
_LOAD_USER_BY = {
    kind: f"""
WITH profile AS MATERIALIZED (
    SELECT u.app_id AS profile_app_id, {_USER_FIELDS},
        (SELECT count(*) FROM events e
         WHERE e.app_id = u.app_id AND e.user_id = u.user_id) AS event_count
    FROM ({target}) AS t(target_user_id)
    JOIN users u ON u.app_id = $1 AND u.user_id = t.target_user_id
)
SELECT p.*, {subscriptions_store.prefixed_columns("s", _SUB)}
FROM profile p
LEFT JOIN subscriptions s ON s.app_id = p.profile_app_id AND s.user_id = p.user_id
ORDER BY s.create_time, s.subscription_id
"""
    for kind, target in _TARGET.items()
}


def _user(row: asyncpg.Record, app_id: str) -> User:
    """A profile row of :data:`_USER_FIELDS` (plus ``event_count``), without subscriptions."""
    return User(
        profile=_profile(row, app_id),
        aliases=[Alias(label, value) for label, value in row["aliases"]],
        timestamp_attributes=frozenset(row["timestamp_attributes"]),
        subscriptions=[],
        event_count=row["event_count"],
    )


async def load_user_by(
    conn: DBConnection, app_id: str, kind: RefKind, *values: object
) -> User | None:
    """The whole profile a reference names, as :func:`load_users` reads it, in one statement.

    GetUser's path: resolving the ref, the profile and the subscriptions were three round trips.

    Args:
        conn: Connection.
        app_id: The app.
        kind: How the user is named.
        values: The reference: a user id, an external id, an alias's label and value, or a
            subscription id.

    Returns:
        The user, or None if the reference names nobody in the app.
    """
    rows = await conn.fetch(_LOAD_USER_BY[kind], app_id, *values)
    if not rows:
        return None
    user = _user(rows[0], app_id)
    user.subscriptions = [
        subscriptions_store.subscription_from_row(row, _SUB)
        for row in rows
        if row[f"{_SUB}subscription_id"] is not None
    ]
    user.subscription_count = len(user.subscriptions)
    return user


async def load_users(
    conn: DBConnection,
    app_id: str,
    user_ids: Sequence[uuid.UUID],
    *,
    with_subscriptions: bool = True,
) -> dict[uuid.UUID, User]:
    """Whole profiles: the rows with their aliases, subscriptions and counts.

    Two queries however many users: profiles with aliases and event counts, then their
    subscriptions.

    Args:
        conn: Connection.
        app_id: The app.
        user_ids: The users; ids that name nobody in the app are absent from the result.
        with_subscriptions: False to leave out subscriptions and counts (lists of users).

    Returns:
        The profiles by user id.
    """
    rows = await conn.fetch(_LOAD_USERS, app_id, list(user_ids), with_subscriptions)
    users = {row["user_id"]: _user(row, app_id) for row in rows}
    if with_subscriptions and users:
        held = await subscriptions_store.fetch_for_users(conn, app_id, list(users))
        for user_id, subscriptions in held.items():
            user = users.get(user_id)
            if user is not None:
                user.subscriptions = list(subscriptions)
                user.subscription_count = len(subscriptions)
    return users


@dataclass(frozen=True, slots=True)
class ListedUser:
    """A user as an ids-only page lists it."""

    user_id: uuid.UUID
    external_id: str | None
    create_time: datetime


async def list_user_ids(
    conn: DBConnection, app_id: str, *, after: tuple[datetime, uuid.UUID] | None, limit: int
) -> list[ListedUser]:
    """One page of an app's users in ``(create_time, user_id)`` order, after ``after``."""
    after_time, after_id = after if after is not None else (None, None)
    rows = await conn.fetch(
        """
        SELECT user_id, external_id, create_time FROM users
        WHERE app_id = $1 AND ($2::timestamptz IS NULL OR (create_time, user_id) > ($2, $3))
        ORDER BY create_time, user_id
        LIMIT $4
        """,
        app_id,
        after_time,
        after_id,
        limit,
    )
    return [ListedUser(row["user_id"], row["external_id"], row["create_time"]) for row in rows]


# -- aliases -------------------------------------------------------------------------------------


async def alias_labels_of(conn: DBConnection, app_id: str, user_id: uuid.UUID) -> dict[str, str]:
    """A user's aliases as ``label → value``."""
    rows = await conn.fetch(
        "SELECT label, value FROM user_aliases WHERE app_id = $1 AND user_id = $2",
        app_id,
        user_id,
    )
    return {row["label"]: row["value"] for row in rows}


async def count_aliases(conn: DBConnection, app_id: str, user_id: uuid.UUID) -> int:
    """How many aliases a user has."""
    count = await conn.fetchval(
        "SELECT count(*) FROM user_aliases WHERE app_id = $1 AND user_id = $2", app_id, user_id
    )
    return int(count)


async def insert_alias(
    conn: DBConnection, app_id: str, user_id: uuid.UUID, alias: Alias, at: datetime
) -> bool:
    """Give a user an alias; False if the label/value pair, or the user's label, is taken."""
    inserted = await conn.fetchval(
        """
        INSERT INTO user_aliases (app_id, label, value, user_id, create_time)
        VALUES ($1, $2, $3, $4, $5)
        ON CONFLICT DO NOTHING
        RETURNING true
        """,
        app_id,
        alias.label,
        alias.value,
        user_id,
        at,
    )
    return bool(inserted)


async def insert_aliases(
    conn: DBConnection, app_id: str, aliases: Sequence[tuple[uuid.UUID, Alias]], at: datetime
) -> int:
    """Give users aliases in one statement; returns how many were inserted (taken ones skip)."""
    if not aliases:
        return 0
    rows = await conn.fetch(
        """
        INSERT INTO user_aliases (app_id, label, value, user_id, create_time)
        SELECT $1, label, value, user_id, $5
        FROM unnest($2::text[], $3::text[], $4::uuid[]) AS a(label, value, user_id)
        ON CONFLICT DO NOTHING
        RETURNING 1
        """,
        app_id,
        [alias.label for _, alias in aliases],
        [alias.value for _, alias in aliases],
        [user_id for user_id, _ in aliases],
        at,
    )
    return len(rows)


async def touch_user(conn: DBConnection, app_id: str, user_id: uuid.UUID, at: datetime) -> None:
    """Set a user's ``update_time`` (its aliases changed)."""
    await conn.execute(
        "UPDATE users SET update_time = $3 WHERE app_id = $1 AND user_id = $2", app_id, user_id, at
    )


async def delete_alias(conn: DBConnection, app_id: str, user_id: uuid.UUID, label: str) -> bool:
    """Remove a user's alias with ``label``; False if it had none."""
    deleted = await conn.fetchval(
        """
        DELETE FROM user_aliases WHERE app_id = $1 AND user_id = $2 AND label = $3
        RETURNING true
        """,
        app_id,
        user_id,
        label,
    )
    return bool(deleted)


# -- customer fields -----------------------------------------------------------------------------

_FIELD_COLUMNS = "name, type, description, pii, auto_defined, create_time"


def field_from_row(row: asyncpg.Record) -> CustomerField:
    """A definition from a row of the ``customer_fields`` columns."""
    return CustomerField(
        name=row["name"],
        type=FieldType(row["type"]),
        description=row["description"],
        pii=row["pii"],
        auto_defined=row["auto_defined"],
        create_time=row["create_time"],
    )


async def customer_fields(
    conn: DBConnection, app_id: str, names: Iterable[str]
) -> dict[str, CustomerField]:
    """The definitions of those of ``names`` that are defined."""
    rows = await conn.fetch(
        f"SELECT {_FIELD_COLUMNS} FROM customer_fields WHERE app_id = $1 AND name = ANY($2)",
        app_id,
        list(set(names)),
    )
    return {row["name"]: field_from_row(row) for row in rows}


async def insert_auto_fields(
    conn: DBConnection, app_id: str, fields: Sequence[CustomerField], at: datetime
) -> set[str]:
    """Store auto-definitions (one statement); returns the names inserted.

    A name defined meanwhile by another transaction is skipped, so the caller can tell.
    """
    if not fields:
        return set()
    rows = await conn.fetch(
        """
        INSERT INTO customer_fields (app_id, name, type, auto_defined, create_time)
        SELECT $1, name, type, true, $4 FROM unnest($2::text[], $3::text[]) AS f(name, type)
        ON CONFLICT DO NOTHING
        RETURNING name
        """,
        app_id,
        [f.name for f in fields],
        [f.type.value for f in fields],
        at,
    )
    return {row["name"] for row in rows}


async def insert_customer_field(
    conn: DBConnection, app_id: str, field: CustomerField, at: datetime
) -> CustomerField | None:
    """Store an explicit definition; None if the name is defined already."""
    row = await conn.fetchrow(
        f"""
        INSERT INTO customer_fields (app_id, name, type, description, pii, auto_defined,
                                     create_time)
        VALUES ($1, $2, $3, $4, $5, false, $6)
        ON CONFLICT DO NOTHING
        RETURNING {_FIELD_COLUMNS}
        """,
        app_id,
        field.name,
        field.type.value,
        field.description,
        field.pii,
        at,
    )
    return field_from_row(row) if row is not None else None


async def adopt_auto_defined_field(
    conn: DBConnection, app_id: str, field: CustomerField
) -> CustomerField | None:
    """Make an auto-defined field of the same type explicit, with ``field``'s description and
    PII flag; None if the stored definition is explicit or of another type."""
    row = await conn.fetchrow(
        f"""
        UPDATE customer_fields SET description = $4, pii = $5, auto_defined = false,
            pii_settled = CASE WHEN pii = $5 THEN pii_settled ELSE false END
        WHERE app_id = $1 AND name = $2 AND type = $3 AND auto_defined
        RETURNING {_FIELD_COLUMNS}
        """,
        app_id,
        field.name,
        field.type.value,
        field.description,
        field.pii,
    )
    return field_from_row(row) if row is not None else None


async def list_customer_fields(
    conn: DBConnection, app_id: str, *, after: str | None, limit: int
) -> list[CustomerField]:
    """One page of an app's definitions by name, after the name ``after``."""
    rows = await conn.fetch(
        f"""
        SELECT {_FIELD_COLUMNS} FROM customer_fields
        WHERE app_id = $1 AND ($2::text IS NULL OR name > $2)
        ORDER BY name
        LIMIT $3
        """,
        app_id,
        after,
        limit,
    )
    return [field_from_row(row) for row in rows]


# -- erasure and export --------------------------------------------------------------------------


async def delete_user(conn: DBConnection, app_id: str, user_id: uuid.UUID) -> int:
    """Delete a user's subscriptions, merge records and row (its aliases go with the row).

    Events are erased separately (``events_store.delete_for_user``) in the same transaction.
    The addresses and tokens the user had opted out of are kept as keyed hashes
    (:mod:`~services.identity.suppressions`), so an import never subscribes them again.

    Returns:
        How many subscriptions were deleted.
    """
    deleted = await conn.fetch(
        """
        DELETE FROM subscriptions WHERE app_id = $1 AND user_id = $2
        RETURNING type, token, opt_in
        """,
        app_id,
        user_id,
    )
    await suppressions.record(
        conn,
        app_id,
        [
            (row["type"], row["token"])
            for row in deleted
            if row["opt_in"] == subscriptions_store.OptIn.UNSUBSCRIBED
        ],
    )
    await conn.execute(
        """
        DELETE FROM user_merges
        WHERE app_id = $1 AND (into_user_id = $2 OR from_user_id = $2)
        """,
        app_id,
        user_id,
    )
    await conn.execute("DELETE FROM users WHERE app_id = $1 AND user_id = $2", app_id, user_id)
    return len(deleted)


async def merges_into(conn: DBConnection, app_id: str, user_id: uuid.UUID) -> list[MergeRecord]:
    """The merges that folded other profiles into ``user_id``, oldest first."""
    rows = await conn.fetch(
        """
        SELECT from_user_id, into_user_id, subscription_id, key_id, merge_time
        FROM user_merges WHERE app_id = $1 AND into_user_id = $2
        ORDER BY merge_time, from_user_id
        """,
        app_id,
        user_id,
    )
    return [
        MergeRecord(
            from_user_id=row["from_user_id"],
            into_user_id=row["into_user_id"],
            subscription_id=row["subscription_id"],
            key_id=row["key_id"],
            merge_time=row["merge_time"],
        )
        for row in rows
    ]
