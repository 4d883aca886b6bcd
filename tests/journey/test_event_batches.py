"""One user's events in one consumed batch take effect in their order: the handler of
``identity.events`` runs in this process on real PostgreSQL with a batch holding both an
``add_to_cart`` that enters a retargeting journey and the ``purchase`` right after it."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest
from tidings.events.v1.tracked_event_pb2 import TrackedEvent
from tidings.journey.v1 import journey_pb2 as jpb

from services.journey.consumers import EventsHandler
from services.journey.server import MIGRATIONS_DIR, JourneyRuntime
from services.journey.settings import JourneySettings
from services.runtime.app import ServiceContext
from services.runtime.db import create_pool
from services.runtime.kafka import IDENTITY_EVENTS, Record
from services.runtime.metrics import Metrics
from services.runtime.migrations import migrate, sources_for
from tests.conftest import temporary_database
from tests.journey.support import delay, event_entry, exit_node, node, seconds, send, struct

APP = "app-batches"
CART = uuid.UUID("00000000-0000-4000-8000-0000000000c1")
GOAL = uuid.UUID("00000000-0000-4000-8000-0000000000c2")
USER = uuid.UUID(int=42)


def _cart_journey() -> jpb.JourneyDefinition:
    retarget = jpb.RetargetNode(goal_event="purchase", correlation_property="cart_id")
    retarget.window.CopyFrom(seconds(3600))
    return jpb.JourneyDefinition(
        entry=event_entry("add_to_cart"),
        start_node_id="hold",
        nodes=[
            node("hold", retarget=retarget, next={"converted": "end", "reminder": "remind"}),
            send("remind", next="end"),
            exit_node("end"),
        ],
    )


def _goal_journey() -> jpb.JourneyDefinition:
    return jpb.JourneyDefinition(
        entry=event_entry("add_to_cart"),
        start_node_id="wait",
        nodes=[delay("wait", 86400, next="end"), exit_node("end")],
        goal=jpb.Goal(event_name="purchase"),
    )


async def _seed(dsn: str, now: datetime) -> None:
    await migrate(dsn, sources_for("journey", MIGRATIONS_DIR))
    conn = await asyncpg.connect(dsn)
    try:
        for journey_id, d in ((CART, _cart_journey()), (GOAL, _goal_journey())):
            await conn.execute(
                """
                INSERT INTO journeys (app_id, journey_id, display_name, state, latest_version,
                                      active_version, create_time, update_time)
                VALUES ($1, $2, 'batch', 'active', 1, 1, $3, $3)
                """,
                APP,
                journey_id,
                now,
            )
            await conn.execute(
                """
                INSERT INTO journey_versions (app_id, journey_id, version, definition,
                                              create_time, activate_time)
                VALUES ($1, $2, 1, $3, $4, $4)
                """,
                APP,
                journey_id,
                d.SerializeToString(),
                now,
            )
    finally:
        await conn.close()


@pytest.fixture
async def database() -> AsyncIterator[str]:
    async with temporary_database() as dsn:
        await _seed(dsn, datetime.now(UTC))
        yield dsn


def _record(offset: int, name: str) -> Record[TrackedEvent]:
    event = TrackedEvent(
        event_id=str(uuid.uuid4()),
        app_id=APP,
        user_id=str(USER),
        name=name,
        properties=struct({"cart_id": "c-1"}),
    )
    event.occurred_at.GetCurrentTime()
    return Record(IDENTITY_EVENTS.name, 0, offset, str(USER), event)


async def test_a_purchase_in_the_batch_of_its_add_to_cart_converts(database: str) -> None:
    settings = JourneySettings(database_url=database, admin_key="unused")
    pool = await create_pool(database)
    try:
        ctx = ServiceContext(
            settings=settings, log=logging.getLogger("test"), metrics=Metrics(), _pool=pool
        )
        runtime = JourneyRuntime(settings)
        runtime.bind(ctx)
        handler = EventsHandler(runtime.ready(), ctx)
        await handler.handle([_record(1, "add_to_cart"), _record(2, "purchase")])
        # Drain what the purchase made due (the retargeting customer's "converted" output).
        while await runtime.engine.step_once():
            pass
        async with pool.acquire() as conn:
            rows = {
                r["journey_id"]: r
                for r in await conn.fetch(
                    "SELECT journey_id, status FROM instances WHERE user_id = $1", USER
                )
            }
            cart_path = [
                (r["node_id"], r["output"])
                for r in await conn.fetch(
                    "SELECT node_id, output FROM path_steps WHERE journey_id = $1 ORDER BY seq",
                    CART,
                )
            ]
            outbox = await conn.fetchval("SELECT count(*) FROM outbox")
    finally:
        runtime.engine.close()
        await pool.close()
    # The purchase found the customer the add_to_cart had just entered: the retargeting
    # window converted (no reminder to a buyer) and the other journey's goal was reached.
    assert cart_path == [("hold", "converted"), ("end", "(exit)")]
    assert outbox == 0
    assert rows[GOAL]["status"] == "converted"
    assert rows[CART]["status"] == "exited"
