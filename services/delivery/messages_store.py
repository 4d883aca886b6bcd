"""SQL of the ``messages`` ledger and its ``message_events`` timeline (one statement per batch).

Every state change is conditional on the state and dispatch the caller saw, so two workers (or a
worker and a redelivered record) racing on one message change it once: the loser's UPDATE
matches no row.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from services.runtime.db import DBConnection

__all__ = [
    "Claim",
    "Finish",
    "MessageRow",
    "NewMessage",
    "Park",
    "claim",
    "finish",
    "insert_events",
    "insert_missing",
    "load_rows",
    "park",
    "purge_users",
    "recent_sends",
]


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message row to create if its id and idempotency key are both new.

    The worker creates the rows of broadcast and journey records in the state it decided
    (``sending`` for a claim before the provider call, ``failed``, ``deferred``), so a message
    is written once instead of inserted ``queued`` and then updated.
    """

    app_id: str
    message_id: uuid.UUID
    idempotency_key: str
    user_id: str
    broadcast_id: uuid.UUID | None
    state: str
    status: int
    expire_at: datetime | None
    due_at: datetime | None = None
    request: bytes | None = None
    journey_id: str = ""
    journey_node_id: str = ""
    attempts: int = 0
    channel: str = ""
    subscription_id: str = ""
    template_id: str = ""
    template_version: int = 0
    #: When the provider call was claimed, if it counts against frequency caps.
    sent_at: datetime | None = None
    #: In-app messages: the rendered InAppContent.
    content: bytes | None = None


async def insert_missing(
    conn: DBConnection, rows: Sequence[NewMessage], now: datetime, claimed_by: int | None = None
) -> set[uuid.UUID]:
    """Create the rows that do not exist (by id or idempotency key); others are left alone.

    ``claimed_by``: the lease of the worker creating ``sending`` rows (its claims).

    Returns:
        The ids of the rows created (a claim, when they are created ``sending``).
    """
    if not rows:
        return set()
    created = await conn.fetch(
        """
        INSERT INTO messages (app_id, message_id, idempotency_key, user_id, broadcast_id, state,
                              status, expire_at, due_at, request, journey_id, journey_node_id,
                              attempts, channel, subscription_id, template_id, template_version,
                              sent_at, content, create_time, update_time, claimed_by)
        SELECT r.app_id, r.message_id, r.key, r.user_id, r.broadcast_id, r.state, r.status,
               r.expire_at, r.due_at, r.request, r.journey_id, r.journey_node_id, r.attempts,
               r.channel, r.subscription_id, r.template_id, r.template_version, r.sent_at,
               r.content, $11, $11, CASE WHEN r.state = 'sending' THEN $21::bigint END
        FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::uuid[], $6::text[],
                    $7::smallint[], $8::timestamptz[], $9::timestamptz[], $10::bytea[],
                    $12::text[], $13::text[], $14::int[], $15::text[], $16::text[], $17::text[],
                    $18::int[], $19::timestamptz[], $20::bytea[])
             AS r(app_id, message_id, key, user_id, broadcast_id, state, status, expire_at,
                  due_at, request, journey_id, journey_node_id, attempts, channel,
                  subscription_id, template_id, template_version, sent_at, content)
        ORDER BY r.app_id, r.message_id
        ON CONFLICT DO NOTHING
        RETURNING message_id
        """,
        [r.app_id for r in rows],
        [r.message_id for r in rows],
        [r.idempotency_key for r in rows],
        [r.user_id for r in rows],
        [r.broadcast_id for r in rows],
        [r.state for r in rows],
        [r.status for r in rows],
        [r.expire_at for r in rows],
        [r.due_at for r in rows],
        [r.request for r in rows],
        now,
        [r.journey_id for r in rows],
        [r.journey_node_id for r in rows],
        [r.attempts for r in rows],
        [r.channel for r in rows],
        [r.subscription_id for r in rows],
        [r.template_id for r in rows],
        [r.template_version for r in rows],
        [r.sent_at for r in rows],
        [r.content for r in rows],
        claimed_by,
    )
    return {row["message_id"] for row in created}


@dataclass(frozen=True, slots=True)
class MessageRow:
    """The ledger state of a message, as a worker needs it."""

    app_id: str
    message_id: uuid.UUID
    idempotency_key: str
    state: str
    dispatch: int
    attempts: int
    user_id: str


async def load_rows(
    conn: DBConnection, keys: Sequence[tuple[str, uuid.UUID]]
) -> dict[tuple[str, uuid.UUID], MessageRow]:
    """The rows of these (app, message) ids that exist."""
    if not keys:
        return {}
    rows = await conn.fetch(
        """
        SELECT m.app_id, m.message_id, m.idempotency_key, m.state, m.dispatch, m.attempts,
               m.user_id
        FROM unnest($1::text[], $2::uuid[]) AS k(app_id, message_id)
        JOIN messages m ON m.app_id = k.app_id AND m.message_id = k.message_id
        """,
        [k[0] for k in keys],
        [k[1] for k in keys],
    )
    return {(row["app_id"], row["message_id"]): MessageRow(**dict(row)) for row in rows}


@dataclass(frozen=True, slots=True)
class Claim:
    """Take a queued message for a provider call (the ledger row written before the call)."""

    app_id: str
    message_id: uuid.UUID
    dispatch: int
    user_id: str
    channel: str
    subscription_id: str
    template_id: str
    template_version: int
    counts_for_cap: bool
    #: In-app messages: the rendered InAppContent the SDK will fetch.
    content: bytes | None = None
    #: Resend-safe channels: the record to publish again if the call's outcome is lost.
    request: bytes | None = None


async def claim(
    conn: DBConnection, claims: Sequence[Claim], now: datetime, claimed_by: int | None = None
) -> set[uuid.UUID]:
    """Move queued messages of the given dispatch to 'sending'; returns the ids claimed.

    ``claimed_by`` is the claiming worker's lease (see :mod:`services.delivery.leases`).
    """
    if not claims:
        return set()
    rows = await conn.fetch(
        """
        UPDATE messages m SET
            state = 'sending', attempts = m.attempts + 1, user_id = c.user_id,
            channel = c.channel, subscription_id = c.subscription_id,
            template_id = c.template_id, template_version = c.template_version,
            sent_at = CASE WHEN c.counts THEN $10::timestamptz END, update_time = $10,
            content = c.content, request = c.request, claimed_by = $13
        FROM unnest($1::text[], $2::uuid[], $3::int[], $4::text[], $5::text[], $6::text[],
                    $7::text[], $8::int[], $9::bool[], $11::bytea[], $12::bytea[])
             AS c(app_id, message_id, dispatch, user_id, channel, subscription_id, template_id,
                  template_version, counts, content, request)
        WHERE m.app_id = c.app_id AND m.message_id = c.message_id
          AND m.state = 'queued' AND m.dispatch = c.dispatch
        RETURNING m.message_id
        """,
        [c.app_id for c in claims],
        [c.message_id for c in claims],
        [c.dispatch for c in claims],
        [c.user_id for c in claims],
        [c.channel for c in claims],
        [c.subscription_id for c in claims],
        [c.template_id for c in claims],
        [c.template_version for c in claims],
        [c.counts_for_cap for c in claims],
        now,
        [c.content for c in claims],
        [c.request for c in claims],
        claimed_by,
    )
    return {row["message_id"] for row in rows}


@dataclass(frozen=True, slots=True)
class Park:
    """Put a message aside until ``due_at`` (deferred, or waiting for a retry)."""

    app_id: str
    message_id: uuid.UUID
    from_state: str
    dispatch: int
    state: str  # 'deferred' | 'retry_wait'
    due_at: datetime
    request: bytes
    user_id: str
    channel: str


async def park(conn: DBConnection, parks: Sequence[Park], now: datetime) -> set[uuid.UUID]:
    """Defer messages (conditional on state and dispatch); returns the ids changed."""
    if not parks:
        return set()
    rows = await conn.fetch(
        """
        UPDATE messages m SET
            state = p.state, status = 2, due_at = p.due_at, request = p.request,
            user_id = CASE WHEN p.user_id = '' THEN m.user_id ELSE p.user_id END,
            channel = CASE WHEN p.channel = '' THEN m.channel ELSE p.channel END,
            sent_at = NULL, update_time = $9
        FROM unnest($1::text[], $2::uuid[], $3::text[], $4::int[], $5::text[],
                    $6::timestamptz[], $7::bytea[], $8::text[], $10::text[])
             AS p(app_id, message_id, from_state, dispatch, state, due_at, request, user_id,
                  channel)
        WHERE m.app_id = p.app_id AND m.message_id = p.message_id
          AND m.state = p.from_state AND m.dispatch = p.dispatch
        RETURNING m.message_id
        """,
        [p.app_id for p in parks],
        [p.message_id for p in parks],
        [p.from_state for p in parks],
        [p.dispatch for p in parks],
        [p.state for p in parks],
        [p.due_at for p in parks],
        [p.request for p in parks],
        [p.user_id for p in parks],
        now,
        [p.channel for p in parks],
    )
    return {row["message_id"] for row in rows}


@dataclass(frozen=True, slots=True)
class Finish:
    """End a message: sent or failed for good."""

    app_id: str
    message_id: uuid.UUID
    from_state: str
    dispatch: int
    state: str  # 'sent' | 'failed'
    status: int
    user_id: str
    channel: str
    provider_message_id: str = ""


async def finish(conn: DBConnection, finishes: Sequence[Finish], now: datetime) -> set[uuid.UUID]:
    """Finish messages (conditional on state and dispatch); returns the ids changed.

    A failed message stops counting against frequency caps.
    """
    if not finishes:
        return set()
    rows = await conn.fetch(
        """
        UPDATE messages m SET
            state = f.state, status = f.status,
            user_id = CASE WHEN f.user_id = '' THEN m.user_id ELSE f.user_id END,
            channel = CASE WHEN f.channel = '' THEN m.channel ELSE f.channel END,
            provider_message_id = f.provider_id,
            sent_at = CASE WHEN f.state = 'sent' THEN m.sent_at END,
            due_at = NULL, request = NULL, update_time = $10
        FROM unnest($1::text[], $2::uuid[], $3::text[], $4::int[], $5::text[], $6::smallint[],
                    $7::text[], $8::text[], $9::text[])
             AS f(app_id, message_id, from_state, dispatch, state, status, user_id, channel,
                  provider_id)
        WHERE m.app_id = f.app_id AND m.message_id = f.message_id
          AND m.state = f.from_state AND m.dispatch = f.dispatch
        RETURNING m.message_id
        """,
        [f.app_id for f in finishes],
        [f.message_id for f in finishes],
        [f.from_state for f in finishes],
        [f.dispatch for f in finishes],
        [f.state for f in finishes],
        [f.status for f in finishes],
        [f.user_id for f in finishes],
        [f.channel for f in finishes],
        [f.provider_message_id for f in finishes],
        now,
    )
    return {row["message_id"] for row in rows}


async def insert_events(
    conn: DBConnection,
    events: Sequence[tuple[str, uuid.UUID, int, str, str, datetime]],
) -> None:
    """Append timeline entries: (app, message, status, reason, detail, time)."""
    if not events:
        return
    await conn.execute(
        """
        INSERT INTO message_events (app_id, message_id, status, reason, detail, time)
        SELECT * FROM unnest($1::text[], $2::uuid[], $3::smallint[], $4::text[], $5::text[],
                             $6::timestamptz[])
        """,
        [e[0] for e in events],
        [e[1] for e in events],
        [e[2] for e in events],
        [e[3] for e in events],
        [e[4][:2000] for e in events],
        [e[5] for e in events],
    )


async def recent_sends(
    conn: DBConnection, app_id: str, pairs: Sequence[tuple[str, str]], since: datetime
) -> dict[tuple[str, str], list[datetime]]:
    """When each (user, channel) pair was last sent to, since ``since`` (frequency caps)."""
    if not pairs:
        return {}
    rows = await conn.fetch(
        """
        SELECT m.user_id, m.channel, m.sent_at
        FROM unnest($2::text[], $3::text[]) AS p(user_id, channel)
        JOIN messages m ON m.app_id = $1 AND m.user_id = p.user_id AND m.channel = p.channel
        WHERE m.sent_at IS NOT NULL AND m.sent_at > $4
        """,
        app_id,
        [p[0] for p in pairs],
        [p[1] for p in pairs],
        since,
    )
    found: dict[tuple[str, str], list[datetime]] = {}
    for row in rows:
        found.setdefault((row["user_id"], row["channel"]), []).append(row["sent_at"])
    return found


def pool_type() -> type[asyncpg.Pool]:
    """For type hints elsewhere."""
    return asyncpg.Pool


async def purge_users(conn: DBConnection, app_id: str, user_ids: Sequence[str]) -> int:
    """Delete every message of ``user_ids`` and its timeline (GDPR erasure).

    Returns:
        How many messages were deleted.
    """
    await conn.execute(
        """
        DELETE FROM message_events e USING messages m
        WHERE e.app_id = $1 AND m.app_id = $1 AND m.user_id = ANY($2::text[])
          AND e.message_id = m.message_id
        """,
        app_id,
        list(user_ids),
    )
    deleted: int = await conn.fetchval(
        """
        WITH gone AS (
            DELETE FROM messages WHERE app_id = $1 AND user_id = ANY($2::text[]) RETURNING 1
        )
        SELECT count(*) FROM gone
        """,
        app_id,
        list(user_ids),
    )
    return deleted
