"""A claim loop outlives a failing iteration: the engine in this process, on real PostgreSQL,
loses its ``instances`` table for a while and steps the customer due once it is back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from datetime import UTC, datetime

import asyncpg
import pytest

from services.journey.catalog import Catalog
from services.journey.engine import Engine
from services.journey.peers import Peers
from services.journey.server import MIGRATIONS_DIR
from services.journey.settings import JourneySettings
from services.runtime.db import create_pool
from services.runtime.migrations import migrate, sources_for
from tests.conftest import temporary_database
from tests.journey.support import definition, exit_node
from tests.polling import eventually

APP = "app-loop"
JOURNEY = uuid.UUID("00000000-0000-4000-8000-0000000000b1")
USER = uuid.UUID(int=7)


async def _seed_journey(conn: asyncpg.Connection, now: datetime) -> None:
    await conn.execute(
        """
        INSERT INTO journeys (app_id, journey_id, display_name, state, latest_version,
                              active_version, create_time, update_time)
        VALUES ($1, $2, 'loop', 'active', 1, 1, $3, $3)
        """,
        APP,
        JOURNEY,
        now,
    )
    await conn.execute(
        """
        INSERT INTO journey_versions (app_id, journey_id, version, definition, create_time,
                                      activate_time)
        VALUES ($1, $2, 1, $3, $4, $4)
        """,
        APP,
        JOURNEY,
        definition(exit_node("end")).SerializeToString(),
        now,
    )


async def _seed_due_customer(conn: asyncpg.Connection, now: datetime) -> None:
    await conn.execute(
        """
        INSERT INTO instances (app_id, journey_id, user_id, visit, version, node_id, status,
                               waiting_for, wake_at, pending_output, seq, enter_time,
                               node_enter_time, trigger_id, trigger_properties)
        VALUES ($1, $2, $3, 1, 1, 'end', 'active', '', $4, '', 1, $4, $4, 't', '{}')
        """,
        APP,
        JOURNEY,
        USER,
        now,
    )


async def test_a_failing_claim_is_logged_and_the_loop_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="services.journey.engine")
    async with temporary_database() as dsn:
        await migrate(dsn, sources_for("journey", MIGRATIONS_DIR))
        settings = JourneySettings(database_url=dsn, admin_key="unused", engine_idle_wait=0.05)
        pool = await create_pool(dsn)
        conn = await asyncpg.connect(dsn)
        engine = Engine(
            settings, pool, Catalog(pool), Peers(settings, lambda: pool), lambda: datetime.now(UTC)
        )
        loop = asyncio.create_task(engine.run())
        try:
            await _seed_journey(conn, datetime.now(UTC))
            await conn.execute("ALTER TABLE instances RENAME TO instances_away")

            async def failed() -> bool:
                return any("engine claim failed" in r.getMessage() for r in caplog.records)

            await eventually(failed, within=10, what="a logged failed claim")
            await conn.execute("ALTER TABLE instances_away RENAME TO instances")
            await _seed_due_customer(conn, datetime.now(UTC))

            async def stepped() -> bool:
                status = await conn.fetchval(
                    "SELECT status FROM instances WHERE user_id = $1", USER
                )
                return bool(status == "exited")

            # The backoff is short: the same loop claims the customer once the table is back.
            await eventually(stepped, within=15, what="the customer stepped after the failure")
            assert not loop.done()
        finally:
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop
            engine.close()
            await conn.close()
            await pool.close()
