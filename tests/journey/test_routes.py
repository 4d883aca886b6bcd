"""Routes: customers moved together along an instant run end exactly where stepping them one by
one leaves them, with the same path rows and the same send requests.

The engine runs in this process on real PostgreSQL: the same journey and customers are seeded
into two databases, one engine moves them along routes and the other steps every customer
alone (routes switched off), and every row they wrote is compared.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from tidings.events.v1.send_request_pb2 import SendRequest
from tidings.journey.v1 import journey_pb2 as jpb

from services.journey.catalog import Catalog
from services.journey.engine import Engine
from services.journey.entries import Candidate, enter
from services.journey.peers import Peers
from services.journey.routes import Route, route_from
from services.journey.server import MIGRATIONS_DIR
from services.journey.settings import JourneySettings
from services.runtime.db import create_pool
from services.runtime.migrations import migrate, sources_for
from tests.conftest import temporary_database
from tests.journey.support import definition, delay, exit_node, node, seconds, send

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
APP = "app-routes"
JOURNEY = uuid.UUID("00000000-0000-4000-8000-00000000000a")


def _wait_event(node_id: str, name: str, within: float, wiring: dict[str, str]) -> jpb.Node:
    wait = jpb.WaitForEventNode(event=jpb.Entry.CustomEvent(name=name))
    wait.timeout.CopyFrom(seconds(within))
    return node(node_id, wait_for_event=wait, next=wiring)


def _retarget(node_id: str, **wiring: str) -> jpb.Node:
    retarget = jpb.RetargetNode(goal_event="purchase", correlation_property="cart_id")
    retarget.window.CopyFrom(seconds(3600))
    return node(node_id, retarget=retarget, next=wiring)


def _split(node_id: str, **wiring: str) -> jpb.Node:
    branches = [jpb.SplitBranch(output=name, weight=50) for name in wiring]
    return node(node_id, split=jpb.SplitNode(branches=branches), next=wiring)


#: A waiting room whose timeout sends and holds the customer in a retargeting window, whose
#: event leaves; a send-first path for entries; a split that routes cannot take.
GRAPH = definition(
    _wait_event("wait", "x", 60, {"event": "end", "timeout": "push"}),
    send("push", next="hold"),
    _retarget("hold", converted="end", reminder="bye"),
    send("bye", template="tpl-2", channels=("email", "sms"), next="end"),
    _split("fork", a="push", b="end"),
    exit_node("end"),
    start="push",
)

#: (node, status, pending output, visit, seq, how many): the customers seeded, all due now.
SEEDED = [
    ("wait", "waiting", "", 1, 1, 40),
    ("wait", "waiting", "event", 1, 2, 30),
    ("push", "active", "", 2, 3, 20),
    ("hold", "waiting", "", 1, 4, 20),
    ("hold", "waiting", "converted", 3, 2, 10),
    ("fork", "active", "", 1, 1, 20),
]


def test_routes_cover_instant_runs_without_calls_or_choices() -> None:
    nodes = {n.node_id: n for n in GRAPH.nodes}
    timed_out = route_from(nodes, "wait", "waiting", "")
    assert isinstance(timed_out, Route)
    assert [(s.offset, s.node_id, s.output, s.closed) for s in timed_out.steps] == [
        (0, "wait", "timeout", True),
        (1, "push", "next", True),
        (2, "hold", "", False),
    ]
    assert [(s.offset, s.node_id) for s in timed_out.sends] == [(1, "push")]
    assert (timed_out.node_id, timed_out.offset, timed_out.status) == ("hold", 2, "waiting")
    assert (timed_out.waiting_for, timed_out.wait) == ("retarget:purchase", timedelta(hours=1))
    reminded = route_from(nodes, "hold", "waiting", "")
    assert reminded is not None
    assert (reminded.node_id, reminded.status, reminded.wait) == ("end", "exited", None)
    assert reminded.sends[0].channels == ("email", "sms")
    # A delay of an exact duration is a timer; whole days and local times need the profile.
    paced = {
        n.node_id: n
        for n in definition(
            send("push", next="pause"),
            delay("pause", 90 * 60, next="later"),
            delay("later", 2 * 86400, next="end"),
            send("to9", next="at9"),
            node(
                "at9",
                delay=jpb.DelayNode(until_local_time=jpb.DelayNode.UntilLocalTime()),
                next={"next": "end"},
            ),
            exit_node("end"),
        ).nodes
    }
    paused = route_from(paced, "push", "active", "")
    assert paused is not None
    assert (paused.node_id, paused.status, paused.waiting_for) == ("pause", "waiting", "timer")
    assert paused.wait == timedelta(minutes=90)
    assert route_from(paced, "pause", "waiting", "") is None  # on to a two-day delay
    assert route_from(paced, "to9", "active", "") is None
    # A split chooses per customer, a waiting node stays where it is: one by one.
    assert route_from(nodes, "fork", "active", "") is None
    assert route_from(nodes, "hold", "active", "") is None
    assert route_from(nodes, "gone", "waiting", "") is None


async def _seed(dsn: str) -> None:
    await migrate(dsn, sources_for("journey", MIGRATIONS_DIR))
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            """
            INSERT INTO journeys (app_id, journey_id, display_name, state, latest_version,
                                  active_version, create_time, update_time)
            VALUES ($1, $2, 'routes', 'active', 1, 1, $3, $3)
            """,
            APP,
            JOURNEY,
            NOW,
        )
        await conn.execute(
            """
            INSERT INTO journey_versions (app_id, journey_id, version, definition, create_time,
                                          activate_time)
            VALUES ($1, $2, 1, $3, $4, $4)
            """,
            APP,
            JOURNEY,
            GRAPH.SerializeToString(),
            NOW,
        )
        number = 0
        for node_id, status, pending, visit, seq, count in SEEDED:
            for _ in range(count):
                number += 1
                user = uuid.UUID(int=number)
                since = NOW - timedelta(minutes=number)
                await conn.execute(
                    """
                    INSERT INTO instances (app_id, journey_id, user_id, visit, version, node_id,
                                           status, waiting_for, wake_at, pending_output, seq,
                                           enter_time, node_enter_time, trigger_id,
                                           trigger_properties)
                    VALUES ($1, $2, $3, $4, 1, $5, $6, 'timer', $7, $8, $9, $10, $10, 't', $11)
                    """,
                    APP,
                    JOURNEY,
                    user,
                    visit,
                    node_id,
                    status,
                    NOW - timedelta(seconds=number),
                    pending,
                    seq,
                    since,
                    '{"cart_id": "c-7"}' if number % 3 == 0 else "{}",
                )
                await conn.execute(
                    """
                    INSERT INTO path_steps (app_id, journey_id, user_id, visit, seq, node_id,
                                            enter_time)
                    VALUES ($1, $2, $3, $4, $5, $6, $7)
                    """,
                    APP,
                    JOURNEY,
                    user,
                    visit,
                    seq,
                    node_id,
                    since,
                )
    finally:
        await conn.close()


@pytest.fixture
async def two_databases() -> AsyncIterator[tuple[str, str]]:
    async with temporary_database() as routed, temporary_database() as alone:
        await _seed(routed)
        await _seed(alone)
        yield routed, alone


async def _run(dsn: str, *, routes: bool) -> dict[str, Any]:
    """Drain what is due and enter newcomers with a fresh engine; every row it left."""
    settings = JourneySettings(database_url=dsn, admin_key="unused", engine_batch=64)
    pool = await create_pool(dsn)
    try:
        engine = Engine(settings, pool, Catalog(pool), Peers(settings, lambda: pool), lambda: NOW)
        if not routes:
            engine._route = lambda inst, graph: None  # type: ignore[method-assign]
        while await engine.step_once():
            pass
        async with pool.acquire() as conn, conn.transaction():
            newcomers = [Candidate(uuid.UUID(int=1000 + n), "list:r1") for n in range(50)]
            newcomers.append(Candidate(uuid.UUID(int=1), "list:r1"))  # already inside
            outcomes = await enter(
                conn,
                APP,
                JOURNEY,
                Catalog(pool).definition,
                newcomers,
                NOW,
                stepper=engine.step_entered,
            )
        async with pool.acquire() as conn:
            instances = [
                tuple(r)
                for r in await conn.fetch("SELECT * FROM instances ORDER BY journey_id, user_id")
            ]
            steps = [
                tuple(r)
                for r in await conn.fetch("SELECT * FROM path_steps ORDER BY user_id, visit, seq")
            ]
            outbox = await conn.fetch("SELECT key, payload FROM outbox")
    finally:
        await pool.close()
    sends = {}
    for row in outbox:
        request = SendRequest.FromString(row["payload"])
        assert row["key"] == request.user_id
        sends[request.idempotency_key] = request
    return {"outcomes": outcomes, "instances": instances, "steps": steps, "sends": sends}


async def test_routed_customers_end_as_if_stepped_one_by_one(
    two_databases: tuple[str, str],
) -> None:
    routed_dsn, alone_dsn = two_databases
    routed = await _run(routed_dsn, routes=True)
    alone = await _run(alone_dsn, routes=False)

    assert routed["outcomes"] == alone["outcomes"]
    assert routed["outcomes"].count("ENTERED") == 50
    assert routed["instances"] == alone["instances"]
    assert routed["steps"] == alone["steps"]
    assert routed["sends"] == alone["sends"]
    # Every group moved: timeouts sent and hold, events and conversions left, reminders sent
    # and left, the newcomers sent and hold, the split went its own way.
    forks = [r[6] for r in routed["steps"] if r[5] == "fork"]
    assert len(forks) == 20
    assert set(forks) <= {"a", "b"}
    statuses = [(r[5], r[6]) for r in routed["instances"]]
    assert statuses.count(("hold", "waiting")) == 40 + 20 + 50 + forks.count("a")
    assert statuses.count(("end", "exited")) == 30 + 20 + 10 + forks.count("b")
    # One send per customer per send node reached, with the entry's properties.
    assert len(routed["sends"]) == 40 + 20 + 20 + 50 + forks.count("a")
    carts = [s for s in routed["sends"].values() if s.trigger_properties.fields]
    assert carts
    assert all(s.trigger_properties["cart_id"] == "c-7" for s in carts)
