"""SQL for the ``subscriptions`` table (and the profile rows Login and Logout move things between).

Plain parameterised statements, one round trip each and set-based where a call touches several
rows. The records are defined here, beside the queries that build them, so the domain modules
(``subscriptions.py``, ``login.py``) and the users module (``User.subscriptions``) import the
store without it importing them back.

Locking protocol (every writer of subscriptions follows it, so two writers never wait on each
other in opposite orders): first the ``users`` rows involved, with
:func:`services.identity.users_store.lock_profiles` (sorted by user id), then the
``subscriptions`` rows, with :func:`get` ``for_update=True``.

A few statements here write tables other modules own (``users``, ``user_aliases``, ``events``,
``event_ids``, ``user_merges``): they are the steps of a Login merge, which must happen in the
one transaction that moves the subscription, so they live with it.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import asyncpg

from services.identity import pii, suppressions
from services.runtime.db import DBConnection
from services.runtime.secrets_box import SecretBoxError

__all__ = [
    "DeadToken",
    "DeviceInfo",
    "OptIn",
    "RequestKey",
    "Subscription",
    "SubscriptionType",
    "WebPushKeys",
    "delete",
    "delete_merged_user",
    "disable_dead_tokens",
    "fetch_for_users",
    "find_by_token",
    "find_request",
    "get",
    "insert",
    "merge_profile",
    "move",
    "move_aliases",
    "opted_out",
    "prefixed_columns",
    "record_activity",
    "record_merge",
    "remember_request",
    "save",
    "set_external_id",
    "subscription_from_row",
]


class SubscriptionType(StrEnum):
    """The channel kind of a subscription, as stored (``subscriptions.type``)."""

    IOS_PUSH = "ios_push"
    ANDROID_PUSH = "android_push"
    WEB_PUSH = "web_push"
    EMAIL = "email"
    SMS = "sms"
    WHATSAPP = "whatsapp"
    TELEGRAM = "telegram"

    @property
    def is_push(self) -> bool:
        """Whether it is a push token (held by a device, rotated and abandoned with it)."""
        return self in _PUSH_TYPES


_PUSH_TYPES = frozenset(
    {SubscriptionType.IOS_PUSH, SubscriptionType.ANDROID_PUSH, SubscriptionType.WEB_PUSH}
)


class OptIn(StrEnum):
    """The holder's consent, as stored (``subscriptions.opt_in``)."""

    SUBSCRIBED = "subscribed"
    UNSUBSCRIBED = "unsubscribed"


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """What is known about the device behind a push subscription; empty strings when unknown."""

    model: str = ""
    os: str = ""
    app_version: str = ""
    sdk: str = ""

    def to_json(self) -> dict[str, str]:
        """The ``subscriptions.device`` column: only the fields that are set."""
        values = {
            "model": self.model,
            "os": self.os,
            "app_version": self.app_version,
            "sdk": self.sdk,
        }
        return {name: value for name, value in values.items() if value}

    @classmethod
    def from_json(cls, value: Mapping[str, Any] | None) -> DeviceInfo:
        """Read the ``subscriptions.device`` column; unknown keys are ignored."""
        value = value or {}
        return cls(
            model=str(value.get("model", "")),
            os=str(value.get("os", "")),
            app_version=str(value.get("app_version", "")),
            sdk=str(value.get("sdk", "")),
        )


@dataclass(frozen=True, slots=True)
class WebPushKeys:
    """The keys of a Web Push subscription (RFC 8291), base64url as the browser gives them."""

    p256dh: str
    auth: str


@dataclass(frozen=True, slots=True)
class Subscription:
    """One subscription as stored.

    Attributes:
        app_id: The app it belongs to.
        subscription_id: Its id.
        user_id: The profile holding it (an anonymous one when nobody is identified).
        type: The channel kind.
        token: Push token, web push endpoint URL, email address, E.164 number or chat id.
        web_push_keys: Web push only: the keys; None for other types.
        enabled: False once disabled (dead token, or a server key turned it off).
        disabled_reason: Why it was disabled; empty while enabled.
        opt_in: The holder's consent.
        opt_in_change_time: When ``opt_in`` last changed.
        opt_in_reason: Why ``opt_in`` last changed.
        device: Device metadata.
        last_active_time: When the device or address was last seen active.
        token_time: When the current token was last presented (registered, registered again or
            set by an update): a "token is dead" receipt about a send before it is stale.
        create_time: When it was created.
        update_time: When it last changed.
    """

    app_id: str
    subscription_id: uuid.UUID
    user_id: uuid.UUID
    type: SubscriptionType
    token: str
    web_push_keys: WebPushKeys | None
    enabled: bool
    disabled_reason: str
    opt_in: OptIn
    opt_in_change_time: datetime
    opt_in_reason: str
    device: DeviceInfo
    last_active_time: datetime
    token_time: datetime
    create_time: datetime
    update_time: datetime

    @property
    def reachable(self) -> bool:
        """Whether a message can be sent to it now: enabled and opted in."""
        return self.enabled and self.opt_in is OptIn.SUBSCRIBED


@dataclass(frozen=True, slots=True)
class DeadToken:
    """A provider's verdict that a subscription's token is dead (from a delivery receipt).

    Attributes:
        app_id: The app of the subscription.
        subscription_id: The subscription.
        reason: Stored as ``disabled_reason``.
        occurred_at: When the provider said so; a token presented after that is not dead.
    """

    app_id: str
    subscription_id: uuid.UUID
    reason: str
    occurred_at: datetime


_COLUMNS = """
    app_id, subscription_id, user_id, type, token, web_push_p256dh, web_push_auth, enabled,
    disabled_reason, opt_in, opt_in_change_time, opt_in_reason, device, last_active_time,
    token_time, create_time, update_time
"""

#: The same columns qualified by the alias ``s`` (for statements that join).
_S_COLUMNS = ", ".join(f"s.{name.strip()}" for name in _COLUMNS.split(","))


def prefixed_columns(alias: str, prefix: str) -> str:
    """The subscription columns of table alias ``alias``, each renamed ``<prefix><name>``.

    For statements that return subscriptions next to another table's columns of the same names
    (``user_id``, ``create_time``); read the rows back with :func:`subscription_from_row`.
    """
    return ", ".join(
        f"{alias}.{name.strip()} AS {prefix}{name.strip()}" for name in _COLUMNS.split(",")
    )


def subscription_from_row(row: asyncpg.Record, prefix: str = "") -> Subscription:
    """The subscription in ``row``, whose columns are named ``<prefix><column>``."""
    p256dh, auth = row[f"{prefix}web_push_p256dh"], row[f"{prefix}web_push_auth"]
    return Subscription(
        app_id=row[f"{prefix}app_id"],
        subscription_id=row[f"{prefix}subscription_id"],
        user_id=row[f"{prefix}user_id"],
        type=SubscriptionType(row[f"{prefix}type"]),
        token=row[f"{prefix}token"],
        web_push_keys=WebPushKeys(p256dh, auth)
        if p256dh is not None and auth is not None
        else None,
        enabled=row[f"{prefix}enabled"],
        disabled_reason=row[f"{prefix}disabled_reason"],
        opt_in=OptIn(row[f"{prefix}opt_in"]),
        opt_in_change_time=row[f"{prefix}opt_in_change_time"],
        opt_in_reason=row[f"{prefix}opt_in_reason"],
        device=DeviceInfo.from_json(row[f"{prefix}device"]),
        last_active_time=row[f"{prefix}last_active_time"],
        token_time=row[f"{prefix}token_time"],
        create_time=row[f"{prefix}create_time"],
        update_time=row[f"{prefix}update_time"],
    )


def _subscription(row: asyncpg.Record) -> Subscription:
    return subscription_from_row(row)


async def fetch_for_users(
    conn: DBConnection, app_id: str, user_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, list[Subscription]]:
    """The subscriptions of several users of one app, in one query.

    Args:
        conn: A connection.
        app_id: The app.
        user_ids: The users; duplicates are fine.

    Returns:
        Every requested user id mapped to its subscriptions, oldest first (an empty list for a
        user with none, or one that does not exist).
    """
    result: dict[uuid.UUID, list[Subscription]] = {user_id: [] for user_id in user_ids}
    if not result:
        return result
    rows = await conn.fetch(
        f"""
        SELECT {_COLUMNS} FROM subscriptions
        WHERE app_id = $1 AND user_id = ANY($2::uuid[])
        ORDER BY create_time, subscription_id
        """,
        app_id,
        list(result),
    )
    for row in rows:
        result[row["user_id"]].append(_subscription(row))
    return result


async def get(
    conn: DBConnection, app_id: str, subscription_id: uuid.UUID, *, for_update: bool = False
) -> Subscription | None:
    """One subscription of ``app_id``, or None.

    Args:
        conn: A connection (in a transaction when ``for_update``).
        app_id: The app; another app's subscription is not found.
        subscription_id: Which one.
        for_update: Lock the row until the transaction ends (lock its users first).
    """
    lock = "FOR UPDATE" if for_update else ""
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM subscriptions WHERE app_id = $1 AND subscription_id = $2 {lock}",
        app_id,
        subscription_id,
    )
    return None if row is None else _subscription(row)


async def find_by_token(
    conn: DBConnection, app_id: str, type_: SubscriptionType, token: str
) -> Subscription | None:
    """The subscription of ``app_id`` with this (type, token), or None."""
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM subscriptions WHERE app_id = $1 AND type = $2 AND token = $3",
        app_id,
        type_.value,
        token,
    )
    return None if row is None else _subscription(row)


async def insert(conn: DBConnection, subscription: Subscription) -> Subscription | None:
    """Store a new subscription; None (nothing stored) if its (type, token) is already taken.

    The holder must exist (its row locked by the caller, who checked the cap). A suppression of
    the (type, token) is consumed: the new row carries the consent from now on.
    """
    # ON CONFLICT DO NOTHING rather than an exception: the caller's transaction stays usable,
    # and it re-reads the winner of the race. The suppression goes in the same statement.
    row = await conn.fetchrow(
        f"""
        WITH created AS (
            INSERT INTO subscriptions (
                app_id, subscription_id, user_id, type, token, web_push_p256dh, web_push_auth,
                enabled, disabled_reason, opt_in, opt_in_change_time, opt_in_reason, device,
                last_active_time, token_time, create_time, update_time)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)
            ON CONFLICT (app_id, type, token) DO NOTHING
            RETURNING {_COLUMNS}
        ), consumed AS (
            DELETE FROM suppressions
            WHERE app_id = $1 AND type = $4 AND token_hash = ANY($18::bytea[])
              AND EXISTS (SELECT 1 FROM created)
        )
        SELECT {_COLUMNS} FROM created
        """,
        *_values(subscription),
        suppressions.Hasher(subscription.app_id, subscription.type.value).all(subscription.token),
    )
    return None if row is None else _subscription(row)


def _values(s: Subscription) -> tuple[Any, ...]:
    keys = s.web_push_keys
    return (
        s.app_id,
        s.subscription_id,
        s.user_id,
        s.type.value,
        s.token,
        keys.p256dh if keys else None,
        keys.auth if keys else None,
        s.enabled,
        s.disabled_reason,
        s.opt_in.value,
        s.opt_in_change_time,
        s.opt_in_reason,
        s.device.to_json(),
        s.last_active_time,
        s.token_time,
        s.create_time,
        s.update_time,
    )


async def save(conn: DBConnection, subscription: Subscription) -> Subscription | None:
    """Write every mutable column of an existing subscription (found by app and id).

    Returns:
        The stored subscription; None if its new (type, token) belongs to another subscription
        (nothing is written then, and the caller's transaction stays usable).
    """
    s = subscription
    keys = s.web_push_keys
    try:
        # A savepoint, so a unique violation on the token aborts this statement only.
        async with conn.transaction():
            row = await conn.fetchrow(
                f"""
                UPDATE subscriptions SET
                    user_id = $3, token = $4, web_push_p256dh = $5, web_push_auth = $6,
                    enabled = $7, disabled_reason = $8, opt_in = $9, opt_in_change_time = $10,
                    opt_in_reason = $11, device = $12, last_active_time = $13, token_time = $14,
                    update_time = $15
                WHERE app_id = $1 AND subscription_id = $2
                RETURNING {_COLUMNS}
                """,
                s.app_id,
                s.subscription_id,
                s.user_id,
                s.token,
                keys.p256dh if keys else None,
                keys.auth if keys else None,
                s.enabled,
                s.disabled_reason,
                s.opt_in.value,
                s.opt_in_change_time,
                s.opt_in_reason,
                s.device.to_json(),
                s.last_active_time,
                s.token_time,
                s.update_time,
            )
    except asyncpg.UniqueViolationError:
        return None
    if row is None:
        raise LookupError(f"subscription {subscription.subscription_id} is gone; lock it first")
    return _subscription(row)


async def move(
    conn: DBConnection,
    app_id: str,
    subscription_ids: Sequence[uuid.UUID],
    user_id: uuid.UUID,
    at: datetime,
) -> list[Subscription]:
    """Hand subscriptions to another holder (one statement); returns them as moved."""
    if not subscription_ids:
        return []
    rows = await conn.fetch(
        f"""
        UPDATE subscriptions SET user_id = $3, update_time = $4
        WHERE app_id = $1 AND subscription_id = ANY($2::uuid[])
        RETURNING {_COLUMNS}
        """,
        app_id,
        list(subscription_ids),
        user_id,
        at,
    )
    return [_subscription(row) for row in rows]


async def delete(
    conn: DBConnection, app_id: str, subscription_ids: Sequence[uuid.UUID]
) -> list[Subscription]:
    """Delete subscriptions; returns those that existed, as they were.

    The opted-out ones are remembered (:mod:`~services.identity.suppressions`), so an import
    never creates them subscribed again.
    """
    if not subscription_ids:
        return []
    rows = await conn.fetch(
        f"""
        DELETE FROM subscriptions WHERE app_id = $1 AND subscription_id = ANY($2::uuid[])
        RETURNING {_COLUMNS}
        """,
        app_id,
        list(subscription_ids),
    )
    removed = [_subscription(row) for row in rows]
    await suppressions.record(conn, app_id, opted_out(removed))
    return removed


def opted_out(subscriptions: Sequence[Subscription]) -> list[tuple[str, str]]:
    """``(type, token)`` of the unsubscribed ones (what :func:`suppressions.record` takes)."""
    return [(s.type.value, s.token) for s in subscriptions if s.opt_in is OptIn.UNSUBSCRIBED]


@dataclass(frozen=True, slots=True)
class RequestKey:
    """A remembered CreateSubscription ``request_id`` (AIP-155).

    Attributes:
        subscription_id: The subscription the request registered.
        fingerprint: A hash of what the request asked.
    """

    subscription_id: uuid.UUID
    fingerprint: str


async def find_request(
    conn: DBConnection, app_id: str, request_id: uuid.UUID, *, since: datetime
) -> RequestKey | None:
    """The request ``request_id`` of the app if it was made at or after ``since``."""
    row = await conn.fetchrow(
        """
        SELECT subscription_id, fingerprint FROM subscription_requests
        WHERE app_id = $1 AND request_id = $2 AND create_time >= $3
        """,
        app_id,
        request_id,
        since,
    )
    return None if row is None else RequestKey(row["subscription_id"], row["fingerprint"])


# An expired key of the same id is taken over; a live one is not (a concurrent twin of the
# request committed it first: the caller starts over and answers with its subscription).
_REMEMBER_REQUEST = """
INSERT INTO subscription_requests AS r
    (app_id, request_id, subscription_id, fingerprint, create_time)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (app_id, request_id) DO UPDATE
    SET subscription_id = EXCLUDED.subscription_id, fingerprint = EXCLUDED.fingerprint,
        create_time = EXCLUDED.create_time
    WHERE r.create_time < $6
RETURNING true
"""

# Bounded, so a request never pays for a long backlog; each one purges more than it adds.
_PURGE_REQUESTS = """
DELETE FROM subscription_requests
WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM subscription_requests WHERE create_time < $1 LIMIT 100
    FOR UPDATE SKIP LOCKED
))
"""


async def remember_request(
    conn: DBConnection,
    app_id: str,
    request_id: uuid.UUID,
    key: RequestKey,
    *,
    at: datetime,
    expired_before: datetime,
) -> bool:
    """Remember that ``request_id`` registered ``key.subscription_id``; purge a few expired keys.

    Returns:
        False if a live key of that id exists already (the caller should start over).
    """
    stored = await conn.fetchval(
        _REMEMBER_REQUEST,
        app_id,
        request_id,
        key.subscription_id,
        key.fingerprint,
        at,
        expired_before,
    )
    await conn.execute(_PURGE_REQUESTS, expired_before)
    return bool(stored)


# Activity seen in tracked events, newest per subscription. Rows already active at or after
# `fresh_after` are left alone, so a device tracking all day writes once an hour, not per event;
# the time never goes back. SKIP LOCKED: the events consumer calls this holding user locks, out
# of the protocol's order, so it must never wait for a subscription a writer holds (a skipped
# row is bumped by a later event).
_RECORD_ACTIVITY = """
WITH seen AS (
    SELECT app_id, subscription_id, max(active) AS active
    FROM unnest($1::text[], $2::uuid[], $3::timestamptz[]) AS v(app_id, subscription_id, active)
    GROUP BY app_id, subscription_id
),
due AS (
    SELECT s.app_id, s.subscription_id, seen.active
    FROM subscriptions s
    JOIN seen USING (app_id, subscription_id)
    WHERE s.last_active_time < least(seen.active, $4::timestamptz)
    ORDER BY s.app_id, s.subscription_id
    FOR UPDATE OF s SKIP LOCKED
)
UPDATE subscriptions s SET last_active_time = due.active
FROM due
WHERE s.app_id = due.app_id AND s.subscription_id = due.subscription_id
"""


async def record_activity(
    conn: DBConnection,
    active: Mapping[tuple[str, uuid.UUID], datetime],
    *,
    fresh_after: datetime,
) -> int:
    """Move subscriptions' ``last_active_time`` forward to when they were seen active.

    One statement for the whole map. Not a change of the subscription (no fact, no
    ``update_time``): activity only orders the cap's evictions and the pick of a device.

    Args:
        conn: Connection (in the caller's transaction, if any).
        active: ``(app_id, subscription_id)`` to the latest time it was active (not in the
            future); unknown subscriptions are ignored.
        fresh_after: Subscriptions active at or after this time are not written.

    Returns:
        How many subscriptions were written.
    """
    if not active:
        return 0
    keys = list(active)
    result = await conn.execute(
        _RECORD_ACTIVITY,
        [app_id for app_id, _ in keys],
        [subscription_id for _, subscription_id in keys],
        [active[key] for key in keys],
        fresh_after,
    )
    return int(result.split()[-1])


async def disable_dead_tokens(
    conn: DBConnection, dead: Sequence[DeadToken], at: datetime
) -> list[Subscription]:
    """Disable the subscriptions whose token a provider declared dead (one statement).

    Skipped: subscriptions that do not exist (unknown app or id), that are already disabled, and
    those whose token was presented after the provider's verdict (a re-registered or rotated
    token is alive).

    Returns:
        The subscriptions disabled now, as stored.
    """
    if not dead:
        return []
    # Rows are locked in (app_id, subscription_id) order before the update, so two batches
    # touching the same subscriptions cannot deadlock.
    rows = await conn.fetch(
        f"""
        WITH verdict AS (
            SELECT DISTINCT ON (app_id, subscription_id) app_id, subscription_id, reason,
                   occurred_at
            FROM unnest($1::text[], $2::uuid[], $3::text[], $4::timestamptz[])
                 AS v(app_id, subscription_id, reason, occurred_at)
            ORDER BY app_id, subscription_id, occurred_at DESC
        ), locked AS (
            SELECT s.app_id, s.subscription_id, v.reason
            FROM subscriptions s JOIN verdict v USING (app_id, subscription_id)
            WHERE s.enabled AND s.token_time <= v.occurred_at
            ORDER BY s.app_id, s.subscription_id
            FOR UPDATE OF s
        )
        UPDATE subscriptions s SET enabled = false, disabled_reason = locked.reason,
                                   update_time = $5
        FROM locked
        WHERE s.app_id = locked.app_id AND s.subscription_id = locked.subscription_id
        RETURNING {_S_COLUMNS}
        """,
        [d.app_id for d in dead],
        [d.subscription_id for d in dead],
        [d.reason for d in dead],
        [d.occurred_at for d in dead],
        at,
    )
    return [_subscription(row) for row in rows]


# --- profiles: identification and the steps of a merge -----------------------------------------


async def set_external_id(
    conn: DBConnection, app_id: str, user_id: uuid.UUID, external_id: str, at: datetime
) -> bool:
    """Identify an anonymous user; False if another user took the external id meanwhile.

    Only an anonymous profile is changed (external ids never change once set).
    """
    try:
        async with conn.transaction():  # a savepoint: a unique violation aborts this only
            status = await conn.execute(
                """
                UPDATE users SET external_id = $3, update_time = $4
                WHERE app_id = $1 AND user_id = $2 AND external_id IS NULL
                """,
                app_id,
                user_id,
                external_id,
                at,
            )
    except asyncpg.UniqueViolationError:
        return False
    return status.endswith(" 1")


#: Standard attributes of ``users``; a merge fills those the surviving profile lacks.
_STANDARD_ATTRIBUTES = (
    "first_name",
    "last_name",
    "email",
    "phone",
    "timezone",
    "language",
    "country",
)
#: The birthdate's columns move together (a month and day without year is a valid birthdate,
#: and a year needs its month and day), so the surviving profile keeps its own or takes all.
_BIRTHDATE = ("birth_year", "birth_month", "birth_day")


async def merge_profile(
    conn: DBConnection,
    app_id: str,
    from_user_id: uuid.UUID,
    into_user_id: uuid.UUID,
    at: datetime,
    *,
    max_attributes: int,
) -> list[str]:
    """Fill ``into``'s missing attributes from ``from`` (``into``'s values win).

    Standard attributes that are NULL on ``into`` take ``from``'s value (the birthdate as a
    whole); custom attributes ``into`` lacks are added while it holds fewer than
    ``max_attributes``, in name order: the rest of ``from``'s are dropped (``into`` keeps all of
    its own). Both rows must be locked.

    Returns:
        The names of the fields filled (``first_name``, ``birthdate``, ``attributes.plan``),
        sorted; empty if none was (and then ``update_time`` is left alone).
    """
    filled = [
        f"CASE WHEN old.{c} IS NULL AND src.{c} IS NOT NULL THEN '{c}' END"
        for c in _STANDARD_ATTRIBUTES
    ]
    filled.append(
        "CASE WHEN old.birth_month IS NULL AND src.birth_month IS NOT NULL THEN 'birthdate' END"
    )
    assignments = [f"{c} = coalesce(k.{c}, src.{c})" for c in _STANDARD_ATTRIBUTES]
    assignments += [
        f"{c} = CASE WHEN k.birth_month IS NULL THEN src.{c} ELSE k.{c} END" for c in _BIRTHDATE
    ]
    value = await conn.fetchval(
        f"""
        WITH src AS (SELECT * FROM users WHERE app_id = $1 AND user_id = $2),
             old AS (SELECT * FROM users WHERE app_id = $1 AND user_id = $3),
             added AS (
                 SELECT coalesce(jsonb_object_agg(a.key, a.value), '{{}}'::jsonb) AS attributes,
                        coalesce(array_agg('attributes.' || a.key), '{{}}'::text[]) AS fields
                 FROM (
                     SELECT s.key, s.value
                     FROM src, old, jsonb_each(src.attributes) AS s
                     WHERE NOT old.attributes ? s.key
                     ORDER BY s.key
                     LIMIT greatest(
                         $5::int - (SELECT count(*) FROM old, jsonb_object_keys(old.attributes)),
                         0
                     )
                 ) a
             ),
             filled AS (
                 SELECT array_remove(ARRAY[{", ".join(filled)}], NULL) || added.fields AS fields
                 FROM src, old, added
             )
        UPDATE users k SET {", ".join(assignments)},
            attributes = k.attributes || added.attributes,
            update_time = CASE WHEN cardinality(filled.fields) > 0 THEN $4 ELSE k.update_time END
        FROM src, filled, added
        WHERE k.app_id = $1 AND k.user_id = $3
        RETURNING filled.fields
        """,
        app_id,
        from_user_id,
        into_user_id,
        at,
        max_attributes,
    )
    fields = sorted(value or [])
    moved = [name[len("attributes.") :] for name in fields if name.startswith("attributes.")]
    if moved:
        await _reseal_moved(conn, app_id, from_user_id, into_user_id, moved)
    return fields


async def _reseal_moved(
    conn: DBConnection,
    app_id: str,
    from_user_id: uuid.UUID,
    into_user_id: uuid.UUID,
    names: list[str],
) -> None:
    """Re-seal, for ``into``, the PII values a merge moved from ``from``: a sealed value is
    bound to its user and would not open on another."""
    stored = await conn.fetchval(
        "SELECT attributes FROM users WHERE app_id = $1 AND user_id = $2", app_id, into_user_id
    )
    box = pii.box()
    fresh = {}
    for name in names:
        if pii.is_sealed(stored.get(name)):
            try:
                plain = box.open_value(stored[name], pii.context(app_id, from_user_id, name))
            except SecretBoxError:
                continue  # unreadable where it was already: left as it is
            fresh[name] = box.seal_value(plain, pii.context(app_id, into_user_id, name))
    if fresh:
        await conn.execute(
            "UPDATE users SET attributes = attributes || $3::jsonb "
            "WHERE app_id = $1 AND user_id = $2",
            app_id,
            into_user_id,
            fresh,
        )


async def move_aliases(
    conn: DBConnection,
    app_id: str,
    from_user_id: uuid.UUID,
    into_user_id: uuid.UUID,
    limit: int,
) -> list[str]:
    """Move up to ``limit`` of ``from``'s aliases to ``into``, oldest first.

    Aliases whose label ``into`` already has stay behind (``into``'s own alias wins; one value
    per label per user). Returns the labels moved.
    """
    if limit <= 0:
        return []
    rows = await conn.fetch(
        """
        UPDATE user_aliases a SET user_id = $3
        FROM (
            SELECT label FROM user_aliases src
            WHERE src.app_id = $1 AND src.user_id = $2
              AND NOT EXISTS (SELECT 1 FROM user_aliases k
                              WHERE k.app_id = $1 AND k.user_id = $3 AND k.label = src.label)
            ORDER BY src.create_time, src.label
            LIMIT $4
        ) AS pick
        WHERE a.app_id = $1 AND a.user_id = $2 AND a.label = pick.label
        RETURNING a.label
        """,
        app_id,
        from_user_id,
        into_user_id,
        limit,
    )
    return sorted(row["label"] for row in rows)


async def record_merge(
    conn: DBConnection,
    *,
    app_id: str,
    from_user_id: uuid.UUID,
    into_user_id: uuid.UUID,
    subscription_id: uuid.UUID,
    key_id: str,
    at: datetime,
) -> None:
    """Write the audit row of a merge (``user_merges``): who, from, into, when."""
    await conn.execute(
        """
        INSERT INTO user_merges (app_id, into_user_id, from_user_id, subscription_id, key_id,
                                 merge_time)
        VALUES ($1, $2, $3, $4, $5, $6)
        """,
        app_id,
        into_user_id,
        from_user_id,
        subscription_id,
        key_id,
        at,
    )


async def delete_merged_user(conn: DBConnection, app_id: str, user_id: uuid.UUID) -> bool:
    """Delete a profile folded into another; returns whether it existed.

    Its aliases go with it (cascade); its subscriptions must have been moved or deleted. Unlike
    an erasure, the ``user_merges`` rows naming it stay: they are the audit trail.
    """
    status = await conn.execute(
        "DELETE FROM users WHERE app_id = $1 AND user_id = $2", app_id, user_id
    )
    return status.endswith(" 1")
