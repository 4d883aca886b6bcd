"""SQL for ``journeys`` and ``journey_versions``: plain parameterised statements scoped by app."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from services.runtime.db import DBConnection

__all__ = [
    "JourneyRow",
    "delete_journey",
    "insert_journey",
    "insert_version",
    "list_journeys",
    "live_journeys",
    "load_definition",
    "lock_journey",
    "set_state",
    "update_names",
]


@dataclass(frozen=True, slots=True)
class JourneyRow:
    """A journey with the definition of the version asked for."""

    app_id: str
    journey_id: uuid.UUID
    display_name: str
    description: str
    state: str
    latest_version: int
    active_version: int
    create_time: datetime
    update_time: datetime
    version: int
    definition: bytes
    version_activated: bool


_SELECT = """
SELECT j.app_id, j.journey_id, j.display_name, j.description, j.state, j.latest_version,
       j.active_version, j.create_time, j.update_time, v.version, v.definition,
       v.activate_time IS NOT NULL AS version_activated
FROM journeys j
JOIN journey_versions v ON v.app_id = j.app_id AND v.journey_id = j.journey_id
"""


def _row(record: object) -> JourneyRow:
    return JourneyRow(**dict(record))  # type: ignore[call-overload]


async def insert_journey(
    conn: DBConnection,
    app_id: str,
    journey_id: uuid.UUID,
    display_name: str,
    description: str,
    definition: bytes,
    at: datetime,
) -> None:
    """A new draft journey with its version 1."""
    await conn.execute(
        """
        INSERT INTO journeys (app_id, journey_id, display_name, description, state,
                              latest_version, create_time, update_time)
        VALUES ($1, $2, $3, $4, 'draft', 1, $5, $5)
        """,
        app_id,
        journey_id,
        display_name,
        description,
        at,
    )
    await insert_version(conn, app_id, journey_id, 1, definition, at)


async def insert_version(
    conn: DBConnection,
    app_id: str,
    journey_id: uuid.UUID,
    version: int,
    definition: bytes,
    at: datetime,
) -> None:
    """Store a definition as ``version``."""
    await conn.execute(
        """
        INSERT INTO journey_versions (app_id, journey_id, version, definition, create_time)
        VALUES ($1, $2, $3, $4, $5)
        """,
        app_id,
        journey_id,
        version,
        definition,
        at,
    )


async def lock_journey(
    conn: DBConnection, app_id: str, journey_id: uuid.UUID, version: int = 0
) -> JourneyRow | None:
    """A journey (its latest version, or ``version``), locked for the transaction."""
    record = await conn.fetchrow(
        _SELECT
        + """
        WHERE j.app_id = $1 AND j.journey_id = $2
          AND v.version = CASE WHEN $3 = 0 THEN j.latest_version ELSE $3 END
        FOR UPDATE OF j
        """,
        app_id,
        journey_id,
        version,
    )
    return None if record is None else _row(record)


async def get_journey(
    conn: DBConnection, app_id: str, journey_id: uuid.UUID, version: int = 0
) -> JourneyRow | None:
    """A journey (its latest version, or ``version``)."""
    record = await conn.fetchrow(
        _SELECT
        + """
        WHERE j.app_id = $1 AND j.journey_id = $2
          AND v.version = CASE WHEN $3 = 0 THEN j.latest_version ELSE $3 END
        """,
        app_id,
        journey_id,
        version,
    )
    return None if record is None else _row(record)


async def list_journeys(
    conn: DBConnection,
    app_id: str,
    limit: int,
    after: tuple[datetime, uuid.UUID] | None,
) -> list[JourneyRow]:
    """The app's journeys at their latest version, newest first, after a page position."""
    records = await conn.fetch(
        _SELECT
        + """
        WHERE j.app_id = $1 AND v.version = j.latest_version
          AND ($2::timestamptz IS NULL OR (j.create_time, j.journey_id) < ($2, $3))
        ORDER BY j.create_time DESC, j.journey_id DESC
        LIMIT $4
        """,
        app_id,
        after[0] if after else None,
        after[1] if after else None,
        limit,
    )
    return [_row(r) for r in records]


async def update_names(
    conn: DBConnection,
    app_id: str,
    journey_id: uuid.UUID,
    display_name: str,
    description: str,
    latest_version: int,
    at: datetime,
) -> None:
    """Change the names and the latest version."""
    await conn.execute(
        """
        UPDATE journeys SET display_name = $3, description = $4, latest_version = $5,
                            update_time = $6
        WHERE app_id = $1 AND journey_id = $2
        """,
        app_id,
        journey_id,
        display_name,
        description,
        latest_version,
        at,
    )


async def replace_definition(
    conn: DBConnection, app_id: str, journey_id: uuid.UUID, version: int, definition: bytes
) -> None:
    """Rewrite a version that was never activated (a draft edited in place)."""
    await conn.execute(
        """
        UPDATE journey_versions SET definition = $4
        WHERE app_id = $1 AND journey_id = $2 AND version = $3 AND activate_time IS NULL
        """,
        app_id,
        journey_id,
        version,
        definition,
    )


async def set_state(
    conn: DBConnection,
    app_id: str,
    journey_id: uuid.UUID,
    state: str,
    at: datetime,
    *,
    active_version: int | None = None,
) -> None:
    """Move the journey to ``state`` (and make ``active_version`` the entry version)."""
    await conn.execute(
        """
        UPDATE journeys SET state = $3, update_time = $4,
                            active_version = coalesce($5, active_version)
        WHERE app_id = $1 AND journey_id = $2
        """,
        app_id,
        journey_id,
        state,
        at,
        active_version,
    )
    if active_version is not None:
        await conn.execute(
            """
            UPDATE journey_versions SET activate_time = coalesce(activate_time, $4)
            WHERE app_id = $1 AND journey_id = $2 AND version = $3
            """,
            app_id,
            journey_id,
            active_version,
            at,
        )


async def delete_journey(conn: DBConnection, app_id: str, journey_id: uuid.UUID) -> None:
    """Delete a journey and everything recorded about it."""
    for table in (
        "instances",
        "path_steps",
        "entries",
        "send_receipts",
        "send_messages",
        "audience_jobs",
        "audience_pages",
        "entry_timers",
    ):
        await conn.execute(
            f"DELETE FROM {table} WHERE app_id = $1 AND journey_id = $2", app_id, journey_id
        )
    await conn.execute(
        "DELETE FROM journeys WHERE app_id = $1 AND journey_id = $2", app_id, journey_id
    )


@dataclass(frozen=True, slots=True)
class LiveJourney:
    """A journey the engine serves: active or paused."""

    app_id: str
    journey_id: uuid.UUID
    state: str
    active_version: int


async def live_journeys(conn: DBConnection) -> list[LiveJourney]:
    """Every active or paused journey."""
    records = await conn.fetch(
        "SELECT app_id, journey_id, state, active_version FROM journeys"
        " WHERE state IN ('active', 'paused')"
    )
    return [LiveJourney(**dict(r)) for r in records]


async def load_definition(
    conn: DBConnection, app_id: str, journey_id: uuid.UUID, version: int
) -> bytes | None:
    """A version's serialized definition."""
    value = await conn.fetchval(
        "SELECT definition FROM journey_versions"
        " WHERE app_id = $1 AND journey_id = $2 AND version = $3",
        app_id,
        journey_id,
        version,
    )
    return None if value is None else bytes(value)
