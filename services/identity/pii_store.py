"""SQL for the sealed values of PII customer fields: converting a field's values when its
``pii`` flag flips, and re-sealing them with the newest key (:mod:`services.identity.pii_fields`).

Every statement works on one batch of users in ``user_id`` order (keyset paging) and writes a
value only if it is still the one read, so a concurrent write (already in the right form: it
saw the new flag) wins and a crash between batches leaves every value readable.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from services.identity.fields import CustomerField
from services.identity.users_store import field_from_row
from services.runtime.db import DBConnection

__all__ = [
    "Unsettled",
    "lock_field",
    "pii_fields_by_app",
    "rewrite_values",
    "set_field",
    "settle",
    "stale_values",
    "unsettled_fields",
    "users_holding",
    "wait_for_older_transactions",
    "write_attribute_maps",
]


@dataclass(frozen=True, slots=True)
class Unsettled:
    """A field whose stored values may not all have the form its flag says."""

    app_id: str
    name: str
    pii: bool


async def lock_field(conn: DBConnection, app_id: str, name: str) -> CustomerField | None:
    """Read and lock (``FOR UPDATE``) one definition; None if the app has no such field."""
    row = await conn.fetchrow(
        "SELECT name, type, description, pii, auto_defined, create_time FROM customer_fields"
        " WHERE app_id = $1 AND name = $2 FOR UPDATE",
        app_id,
        name,
    )
    return field_from_row(row) if row is not None else None


async def set_field(
    conn: DBConnection, app_id: str, name: str, *, description: str, pii: bool
) -> CustomerField:
    """Store a locked definition's new description and flag (a documented field is explicit);
    a changed flag marks the field unsettled until its values are converted."""
    row = await conn.fetchrow(
        """
        UPDATE customer_fields
        SET description = $3, pii = $4, auto_defined = false,
            pii_settled = CASE WHEN pii = $4 THEN pii_settled ELSE false END
        WHERE app_id = $1 AND name = $2
        RETURNING name, type, description, pii, auto_defined, create_time
        """,
        app_id,
        name,
        description,
        pii,
    )
    assert row is not None  # locked by the caller
    return field_from_row(row)


async def settle(conn: DBConnection, app_id: str, name: str, pii: bool) -> None:
    """Mark a field settled, unless its flag flipped again meanwhile."""
    await conn.execute(
        "UPDATE customer_fields SET pii_settled = true"
        " WHERE app_id = $1 AND name = $2 AND pii = $3 AND NOT pii_settled",
        app_id,
        name,
        pii,
    )


async def unsettled_fields(conn: DBConnection) -> list[Unsettled]:
    """Every field of every app whose flip is not finished."""
    rows = await conn.fetch("SELECT app_id, name, pii FROM customer_fields WHERE NOT pii_settled")
    return [Unsettled(row["app_id"], row["name"], row["pii"]) for row in rows]


async def pii_fields_by_app(conn: DBConnection) -> dict[str, list[str]]:
    """The names of every app's PII fields."""
    rows = await conn.fetch(
        "SELECT app_id, array_agg(name ORDER BY name) AS names FROM customer_fields"
        " WHERE pii GROUP BY app_id"
    )
    return {row["app_id"]: list(row["names"]) for row in rows}


async def wait_for_older_transactions(
    conn: DBConnection, started_before: Any, *, attempts: int
) -> bool:
    """Whether, within ``attempts`` tenths of a second, no other transaction of this database
    that began before ``started_before`` is still running (one may have read the old flag)."""
    for _ in range(attempts):
        running = await conn.fetchval(
            """
            SELECT count(*) FROM pg_stat_activity
            WHERE datname = current_database() AND pid <> pg_backend_pid()
              AND xact_start < $1
            """,
            started_before,
        )
        if not running:
            return True
        await conn.execute("SELECT pg_sleep(0.1)")
    return False


async def stale_values(
    conn: DBConnection, app_id: str, name: str, *, sealed: bool, after: uuid.UUID, limit: int
) -> list[asyncpg.Record]:
    """Up to ``limit`` users after ``after`` whose ``name`` value is sealed (``sealed``) or
    plain (not ``sealed``): ``user_id`` and the stored ``value``."""
    return await conn.fetch(
        """
        SELECT user_id, attributes -> $2 AS value FROM users
        WHERE app_id = $1 AND user_id > $3 AND attributes ? $2
          AND (jsonb_typeof(attributes -> $2) = 'object') = $4
        ORDER BY user_id
        LIMIT $5
        """,
        app_id,
        name,
        after,
        sealed,
        limit,
    )


async def rewrite_values(
    conn: DBConnection,
    app_id: str,
    name: str,
    changes: Sequence[tuple[uuid.UUID, Any, Any]],
) -> int:
    """Replace ``name``'s value of each ``(user_id, old, new)`` if it is still ``old``;
    returns how many were replaced (one statement)."""
    if not changes:
        return 0
    status = await conn.execute(
        """
        UPDATE users u SET attributes = jsonb_set(u.attributes, ARRAY[$2], v.new)
        FROM unnest($3::uuid[], $4::jsonb[], $5::jsonb[]) AS v(user_id, old, new)
        WHERE u.app_id = $1 AND u.user_id = v.user_id AND u.attributes -> $2 = v.old
        """,
        app_id,
        name,
        [change[0] for change in changes],
        [change[1] for change in changes],
        [change[2] for change in changes],
    )
    return int(status.rsplit(" ", 1)[-1])


async def users_holding(
    conn: DBConnection, app_id: str, names: list[str], *, after: uuid.UUID, limit: int
) -> list[asyncpg.Record]:
    """Up to ``limit`` users after ``after`` holding a value of one of ``names``:
    ``user_id`` and ``attributes``."""
    return await conn.fetch(
        """
        SELECT user_id, attributes FROM users
        WHERE app_id = $1 AND user_id > $3 AND attributes ?| $2::text[]
        ORDER BY user_id
        LIMIT $4
        """,
        app_id,
        names,
        after,
        limit,
    )


async def write_attribute_maps(
    conn: DBConnection, app_id: str, changes: Sequence[tuple[uuid.UUID, Any, Any]]
) -> int:
    """Merge ``fresh`` values into each ``(user_id, old attributes, fresh)`` user whose map is
    still ``old``; returns how many were written (one statement)."""
    if not changes:
        return 0
    status = await conn.execute(
        """
        UPDATE users u SET attributes = u.attributes || v.fresh
        FROM unnest($2::uuid[], $3::jsonb[], $4::jsonb[]) AS v(user_id, old, fresh)
        WHERE u.app_id = $1 AND u.user_id = v.user_id AND u.attributes = v.old
        """,
        app_id,
        [change[0] for change in changes],
        [change[1] for change in changes],
        [change[2] for change in changes],
    )
    return int(status.rsplit(" ", 1)[-1])
