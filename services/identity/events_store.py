"""SQL for tracked events: the ``events`` table (monthly partitions) and ``event_ids`` (dedup).

Events reach this module only from identity's consumer of ``identity.events``
(:mod:`services.identity.events_consumer`); TrackEvents never writes here.

Partitioning (``events`` is ``PARTITION BY RANGE (occurred_at)``, one partition per UTC month,
plus ``events_default``):

* Partitions are created on demand, before a batch is inserted, for every month of the batch
  inside a window of :data:`PARTITION_MONTHS_BACK` months before the current one to
  :data:`PARTITION_MONTHS_AHEAD` after it (and ahead of time for the months around now when the
  consumer starts). Rows older than the window (a back-fill of ancient history, or a record put
  on the topic by hand) go to ``events_default``, which stays small because the window moves
  forward only: a month that leaves the window has been partitioned already if it ever had rows.
* Creating a partition for a range that already has rows in ``events_default`` fails in
  PostgreSQL, so :func:`ensure_month_partitions` moves such rows into the new table before
  attaching it, with the default partition locked meanwhile. In normal operation there is
  nothing to move; it makes the creation always safe (e.g. after the window was widened).
* The creation is serialised between replicas with a transaction-scoped advisory lock, and the
  hot path runs no DDL once a month's partition exists (callers cache the months they know).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import asyncpg

from services.runtime.db import DBConnection

__all__ = [
    "PARTITION_MONTHS_AHEAD",
    "PARTITION_MONTHS_BACK",
    "Event",
    "NewEvent",
    "database_instance_id",
    "delete_for_user",
    "ensure_month_partitions",
    "existing_users",
    "insert_events",
    "known_apps",
    "list_all_for_user",
    "list_events",
    "list_oldest_first",
    "merge_targets",
    "month_of",
    "month_partitions",
    "move_to_user",
    "partition_name",
    "partition_window",
]

#: Months before the current one that get their own partition when events arrive for them.
PARTITION_MONTHS_BACK = 24
#: Months after the current one created ahead (events are at most minutes in the future; one
#: month ahead means the partition exists before the first event of next month arrives).
PARTITION_MONTHS_AHEAD = 1

# Serialises partition DDL between replicas (and with a bench/test creating partitions).
_PARTITION_LOCK_KEY = 0x7469_6465_7673  # "tidevs"


@dataclass(frozen=True, slots=True)
class Event:
    """A stored event.

    Attributes:
        app_id: The app (tenant).
        user_id: The user who did it.
        event_id: Its id, unique per app.
        name: Its name (``purchase``).
        properties: Its properties as plain JSON values.
        occurred_at: When the user did it.
        receive_time: When TrackEvents accepted it.
    """

    app_id: str
    user_id: uuid.UUID
    event_id: str
    name: str
    properties: dict[str, Any]
    occurred_at: datetime
    receive_time: datetime


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event about to be stored.

    Attributes:
        app_id: The app (tenant).
        user_id: The user who did it.
        event_id: Its id; a second event with the same ``(app_id, event_id)`` is not stored.
        name: Its name.
        properties_json: Its properties, already encoded as a JSON object (the consumer encodes
            them once, straight from the protobuf payload).
        occurred_at: When the user did it (timezone-aware).
        receive_time: When TrackEvents accepted it (timezone-aware).
    """

    app_id: str
    user_id: uuid.UUID
    event_id: str
    name: str
    properties_json: str
    occurred_at: datetime
    receive_time: datetime


def month_of(moment: datetime) -> date:
    """The first day of ``moment``'s month in UTC: the key of its partition."""
    utc = moment.astimezone(UTC)
    return date(utc.year, utc.month, 1)


def _add_months(month: date, months: int) -> date:
    index = month.year * 12 + month.month - 1 + months
    return date(index // 12, index % 12 + 1, 1)


def partition_name(month: date) -> str:
    """Name of the partition holding ``month`` (``events_y2026m01``)."""
    return f"events_y{month.year:04d}m{month.month:02d}"


def partition_window(now: datetime) -> tuple[date, date]:
    """First and last month (inclusive) that get their own partition, seen from ``now``."""
    current = month_of(now)
    return _add_months(current, -PARTITION_MONTHS_BACK), _add_months(
        current, PARTITION_MONTHS_AHEAD
    )


_LIST_PARTITIONS = """
SELECT c.relname
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'events'::regclass
"""


async def month_partitions(conn: DBConnection) -> set[date]:
    """The months that have their own partition now."""
    months = set()
    for row in await conn.fetch(_LIST_PARTITIONS):
        name: str = row["relname"]
        # events_yYYYYmMM; anything else (the default partition) is not a month.
        if len(name) == 15 and name.startswith("events_y") and name[12] == "m":
            months.add(date(int(name[8:12]), int(name[13:15]), 1))
    return months


async def ensure_month_partitions(conn: DBConnection, months: Iterable[date]) -> list[date]:
    """Create the monthly partitions among ``months`` that do not exist yet.

    Runs in its own transaction (do not call it inside one that inserts events: the DDL locks
    would be held until that commits). Rows of a new partition's range that sit in
    ``events_default`` are moved into it first, so creation never fails on them.

    Args:
        conn: A connection outside any transaction.
        months: First days of months (see :func:`month_of`).

    Returns:
        The months whose partitions this call created.
    """
    wanted = sorted({date(m.year, m.month, 1) for m in months})
    if not wanted:
        return []
    created: list[date] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _PARTITION_LOCK_KEY)
        existing = await month_partitions(conn)
        missing = [m for m in wanted if m not in existing]
        if not missing:
            return []
        # Nothing may insert into the default partition between moving its rows out and the
        # attach, which checks that none of the new range is left there.
        await conn.execute("LOCK TABLE events_default IN SHARE ROW EXCLUSIVE MODE")
        for month in missing:
            # DDL takes no bind parameters: the name and bounds are built from integers only.
            name = partition_name(month)
            lower = f"{month.isoformat()} 00:00:00+00"
            upper = f"{_add_months(month, 1).isoformat()} 00:00:00+00"
            await conn.execute(
                f"CREATE TABLE {name} (LIKE events INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
            )
            await conn.execute(
                f"WITH moved AS (DELETE FROM events_default "
                f"WHERE occurred_at >= '{lower}' AND occurred_at < '{upper}' RETURNING *) "
                f"INSERT INTO {name} SELECT * FROM moved"
            )
            await conn.execute(
                f"ALTER TABLE events ATTACH PARTITION {name} "
                f"FOR VALUES FROM ('{lower}') TO ('{upper}')"
            )
            created.append(month)
    return created


async def known_apps(conn: DBConnection, app_ids: Iterable[str]) -> set[str]:
    """The ids among ``app_ids`` of apps this database has."""
    rows = await conn.fetch("SELECT app_id FROM apps WHERE app_id = ANY($1::text[])", list(app_ids))
    return {row["app_id"] for row in rows}


# Which of the given (app, user) pairs exist. FOR KEY SHARE holds off a concurrent erasure or
# merge of those users until the events are stored: such a transaction locks or deletes the user
# row first, so it either waits for this batch (and then sees its rows) or finishes before it
# (and then the user is gone here). It does not block profile updates. The rows are locked in
# (app, user) order, the order every other writer of users locks them in: a batch locking them
# in join order deadlocked with a concurrent BatchUpsertUsers or Login of the same users.
_EXISTING_USERS = """
SELECT u.app_id, u.user_id
FROM users u
WHERE (u.app_id, u.user_id) IN (SELECT * FROM unnest($1::text[], $2::uuid[]))
ORDER BY u.app_id, u.user_id
FOR KEY SHARE
"""

_MERGE_TARGETS = """
SELECT m.app_id, m.from_user_id, m.into_user_id
FROM user_merges m
JOIN unnest($1::text[], $2::uuid[]) AS w(app_id, user_id)
  ON m.app_id = w.app_id AND m.from_user_id = w.user_id
"""


async def existing_users(
    conn: DBConnection, users: Iterable[tuple[str, uuid.UUID]]
) -> set[tuple[str, uuid.UUID]]:
    """The ``(app_id, user_id)`` pairs among ``users`` that exist, locked ``FOR KEY SHARE``.

    Call it in the transaction that stores their events. A user of an app this database does
    not know does not exist either.
    """
    pairs = list(set(users))
    if not pairs:
        return set()
    rows = await conn.fetch(_EXISTING_USERS, [a for a, _ in pairs], [u for _, u in pairs])
    return {(row["app_id"], row["user_id"]) for row in rows}


async def merge_targets(
    conn: DBConnection, users: Iterable[tuple[str, uuid.UUID]]
) -> dict[tuple[str, uuid.UUID], uuid.UUID]:
    """For users that were merged into another profile by Login: the profile they went into."""
    pairs = list(set(users))
    if not pairs:
        return {}
    rows = await conn.fetch(_MERGE_TARGETS, [a for a, _ in pairs], [u for _, u in pairs])
    return {(row["app_id"], row["from_user_id"]): row["into_user_id"] for row in rows}


# One statement per batch: claim the ids in event_ids (ON CONFLICT DO NOTHING returns only the
# ids not stored before), then insert exactly the claimed events. DISTINCT ON keeps the first of
# an id repeated within the batch (a producer retry can put both copies in one poll); ORDER BY
# makes concurrent batches take the event_ids locks in the same order, so they cannot deadlock.
_INSERT_EVENTS = """
WITH input AS (
    SELECT DISTINCT ON (app_id, event_id) *
    FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::text[],
                $6::timestamptz[], $7::timestamptz[], $8::int[])
         AS t(app_id, user_id, event_id, name, properties, occurred_at, receive_time, ord)
    ORDER BY app_id, event_id, ord
),
claimed AS (
    INSERT INTO event_ids (app_id, event_id, occurred_at)
    SELECT app_id, event_id, occurred_at FROM input
    ORDER BY app_id, event_id
    ON CONFLICT DO NOTHING
    RETURNING app_id, event_id
)
INSERT INTO events (app_id, user_id, event_id, name, properties, occurred_at, receive_time)
SELECT i.app_id, i.user_id, i.event_id, i.name, i.properties::jsonb, i.occurred_at,
       i.receive_time
FROM input i
JOIN claimed c USING (app_id, event_id)
"""


async def insert_events(conn: DBConnection, events: Sequence[NewEvent]) -> int:
    """Store ``events``, skipping any whose ``(app_id, event_id)`` was stored before.

    One statement, so it is atomic on its own; call it inside the transaction that also locked
    the users (:func:`existing_users`). The monthly partitions should exist already
    (:func:`ensure_month_partitions`); rows without one go to ``events_default``.

    Returns:
        How many events were stored (the rest were duplicates).
    """
    if not events:
        return 0
    result = await conn.execute(
        _INSERT_EVENTS,
        [e.app_id for e in events],
        [e.user_id for e in events],
        [e.event_id for e in events],
        [e.name for e in events],
        [e.properties_json for e in events],
        [e.occurred_at for e in events],
        [e.receive_time for e in events],
        list(range(len(events))),
    )
    return int(result.split()[-1])


_COLUMNS = "app_id, user_id, event_id, name, properties, occurred_at, receive_time"

# Newest first; the page token is the (occurred_at, event_id) of the last row of the previous
# page. The plain bound on occurred_at lets the (app_id, user_id, occurred_at) index start at the
# cursor; the row comparison then breaks ties between events of the same instant.
_LIST_EVENTS = f"""
SELECT {_COLUMNS}
FROM events
WHERE app_id = $1 AND user_id = $2
  AND ($3::text IS NULL OR name = $3)
  AND occurred_at >= coalesce($4::timestamptz, '-infinity')
  AND occurred_at < coalesce($5::timestamptz, 'infinity')
  AND occurred_at <= coalesce($6::timestamptz, 'infinity')
  AND ($6::timestamptz IS NULL OR (occurred_at, event_id) < ($6::timestamptz, $7::text))
ORDER BY occurred_at DESC, event_id DESC
LIMIT $8
"""


def _event(row: asyncpg.Record) -> Event:
    return Event(
        app_id=row["app_id"],
        user_id=row["user_id"],
        event_id=row["event_id"],
        name=row["name"],
        properties=row["properties"],
        occurred_at=row["occurred_at"],
        receive_time=row["receive_time"],
    )


async def list_events(
    conn: DBConnection,
    app_id: str,
    user_id: uuid.UUID,
    *,
    name: str | None,
    start_time: datetime | None,
    end_time: datetime | None,
    after: tuple[datetime, str] | None,
    limit: int,
) -> list[Event]:
    """One page of a user's events, newest first.

    Args:
        conn: Connection.
        app_id: The app.
        user_id: The user.
        name: Only events of this name; ``None`` for all.
        start_time: Only events at or after this time.
        end_time: Only events before this time.
        after: ``(occurred_at, event_id)`` of the last event of the previous page.
        limit: Most events to return.
    """
    cursor_time, cursor_id = after if after is not None else (None, None)
    rows = await conn.fetch(
        _LIST_EVENTS,
        app_id,
        user_id,
        name,
        start_time,
        end_time,
        cursor_time,
        cursor_id,
        limit,
    )
    return [_event(row) for row in rows]


# Oldest first, from the cursor (occurred_at, event_id) of the last row of the previous page.
_LIST_OLDEST_FIRST = f"""
SELECT {_COLUMNS}
FROM events
WHERE app_id = $1 AND user_id = $2
  AND occurred_at >= coalesce($3::timestamptz, '-infinity')
  AND ($3::timestamptz IS NULL OR (occurred_at, event_id) > ($3::timestamptz, $4::text))
ORDER BY occurred_at, event_id
LIMIT $5
"""


async def list_oldest_first(
    conn: DBConnection,
    app_id: str,
    user_id: uuid.UUID,
    *,
    after: tuple[datetime, str] | None,
    limit: int,
) -> list[Event]:
    """Up to ``limit`` of a user's events, oldest first, after the cursor ``after`` (export)."""
    cursor_time, cursor_id = after if after is not None else (None, None)
    rows = await conn.fetch(_LIST_OLDEST_FIRST, app_id, user_id, cursor_time, cursor_id, limit)
    return [_event(row) for row in rows]


_LIST_ALL = f"""
SELECT {_COLUMNS} FROM events
WHERE app_id = $1 AND user_id = $2
ORDER BY occurred_at, event_id
"""


async def list_all_for_user(conn: DBConnection, app_id: str, user_id: uuid.UUID) -> list[Event]:
    """Every stored event of a user, oldest first, unbounded (tests and tools; the API pages).

    Events still on their way through ``identity.events`` (accepted by TrackEvents in the last
    moments) are not in it yet.
    """
    return [_event(row) for row in await conn.fetch(_LIST_ALL, app_id, user_id)]


# The ids go with the events, so a later event with a reused id is stored again (the user is
# gone, and an erased user's data must not linger as dedup keys).
_DELETE_FOR_USER = """
WITH gone AS (
    DELETE FROM events WHERE app_id = $1 AND user_id = $2 RETURNING app_id, event_id
),
ids AS (
    DELETE FROM event_ids e USING gone g
    WHERE e.app_id = g.app_id AND e.event_id = g.event_id
)
SELECT count(*) FROM gone
"""


async def delete_for_user(conn: DBConnection, app_id: str, user_id: uuid.UUID) -> int:
    """Erase a user's events and their dedup ids (GDPR erasure).

    Call it in the erasure's transaction *after* deleting (or locking ``FOR UPDATE``) the user's
    row: the consumer locks the users it stores events for, so this order guarantees that no
    event of the user is committed after this delete. An event of the user still on the topic
    is dropped by the consumer, because the user no longer exists.

    Returns:
        How many events were deleted.
    """
    deleted = await conn.fetchval(_DELETE_FOR_USER, app_id, user_id)
    return int(deleted)


_MOVE_EVENTS = "UPDATE events SET user_id = $3 WHERE app_id = $1 AND user_id = $2"


async def move_to_user(
    conn: DBConnection, app_id: str, from_user_id: uuid.UUID, into_user_id: uuid.UUID
) -> int:
    """Re-attribute a user's events to another user (Login merging an anonymous profile).

    Call it in the merge's transaction *after* deleting (or locking ``FOR UPDATE``) the
    ``from`` user's row and recording the merge in ``user_merges``: the consumer then either
    stored its events before (they are moved here) or sees the merge and stores them under
    ``into_user_id``.

    Returns:
        How many events were moved.
    """
    result = await conn.execute(_MOVE_EVENTS, app_id, from_user_id, into_user_id)
    return int(result.split()[-1])


async def database_instance_id(conn: DBConnection) -> str:
    """This database's lineage id (``outbox_instance``), stable across replicas and restarts."""
    value = await conn.fetchval("SELECT id FROM outbox_instance")
    return str(value)
