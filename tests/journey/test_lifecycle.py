"""Journeys through gRPC: CRUD, validation, versions, and Pause / Resume / Stop semantics."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import grpc
import grpc.aio
from google.protobuf import field_mask_pb2
from tidings.identity.v1 import identity_service_pb2 as ipb
from tidings.identity.v1 import user_ref_pb2
from tidings.journey.v1 import journey_pb2 as jpb
from tidings.journey.v1 import journey_service_pb2 as pb

from tests.db_locks import wait_blocked_by
from tests.identity.conftest import TestApp
from tests.identity.support import failure
from tests.journey.support import (
    SendFeed,
    create_active,
    definition,
    delay,
    exit_node,
    node,
    seconds,
    send,
    struct,
)
from tests.journey.test_send_flow import make_users
from tests.polling import eventually


def wait_for(name: str, wiring: dict[str, str], wait_seconds: float = 3600) -> jpb.Node:
    return node(
        "wait",
        wait_for_event=jpb.WaitForEventNode(
            event=jpb.Entry.CustomEvent(name=name), timeout=seconds(wait_seconds)
        ),
        next=wiring,
    )


async def add(journeys: Any, app: TestApp, journey_id: str, user_ids: list[str]) -> Any:
    return await journeys.AddCustomers(
        pb.AddCustomersRequest(
            journey_id=journey_id, customers=[user_ref_pb2.UserRef(user_id=u) for u in user_ids]
        ),
        metadata=app.server,
    )


async def state(journeys: Any, app: TestApp, journey_id: str, user_id: str) -> pb.CustomerState:
    """The customer's state; an empty one while they have not entered yet."""
    try:
        found: pb.CustomerState = await journeys.GetCustomerState(
            pb.GetCustomerStateRequest(
                journey_id=journey_id, customer=user_ref_pb2.UserRef(user_id=user_id)
            ),
            metadata=app.server,
        )
        return found
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.NOT_FOUND:
            raise
        return pb.CustomerState()


async def track(users: Any, app: TestApp, user_id: str, name: str, **props: Any) -> None:
    response = await users.TrackEvents(
        ipb.TrackEventsRequest(
            events=[
                ipb.TrackedEventInput(
                    user=user_ref_pb2.UserRef(user_id=user_id), name=name, properties=struct(props)
                )
            ]
        ),
        metadata=app.server,
    )
    assert not response.results[0].HasField("error"), response


async def test_crud_and_paging(
    journeys: Any,
    app: TestApp,
) -> None:
    ids = []
    for i in range(3):
        created = await journeys.CreateJourney(
            pb.CreateJourneyRequest(
                journey=jpb.Journey(display_name=f"j{i}", definition=definition(exit_node()))
            ),
            metadata=app.server,
        )
        assert created.state == jpb.Journey.STATE_DRAFT
        assert (created.version, created.active_version, created.draft) == (1, 0, True)
        ids.append(created.journey_id)
    first = await journeys.ListJourneys(pb.ListJourneysRequest(page_size=2), metadata=app.server)
    second = await journeys.ListJourneys(
        pb.ListJourneysRequest(page_size=2, page_token=first.next_page_token),
        metadata=app.server,
    )
    listed = [j.journey_id for j in [*first.journeys, *second.journeys]]
    assert listed == list(reversed(ids))
    assert not second.next_page_token

    missing = await failure(
        journeys.GetJourney(pb.GetJourneyRequest(journey_id="nope"), metadata=app.server)
    )
    assert (missing.code, missing.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["journey_id"])
    unnamed = await failure(
        journeys.CreateJourney(pb.CreateJourneyRequest(journey=jpb.Journey()), metadata=app.server)
    )
    assert unnamed.fields == ["journey.display_name"]
    await journeys.DeleteJourney(pb.DeleteJourneyRequest(journey_id=ids[0]), metadata=app.server)
    gone = await failure(
        journeys.GetJourney(pb.GetJourneyRequest(journey_id=ids[0]), metadata=app.server)
    )
    assert (gone.code, gone.reason) == (grpc.StatusCode.NOT_FOUND, "JOURNEY_NOT_FOUND")


async def test_an_app_key_is_required(journeys: Any, app: TestApp) -> None:
    refused = await failure(journeys.ListJourneys(pb.ListJourneysRequest()))
    assert refused.code == grpc.StatusCode.UNAUTHENTICATED
    client = await failure(journeys.ListJourneys(pb.ListJourneysRequest(), metadata=app.client))
    assert client.code == grpc.StatusCode.PERMISSION_DENIED


async def test_activate_refuses_an_invalid_journey_with_every_problem(
    journeys: Any, app: TestApp
) -> None:
    created = await journeys.CreateJourney(
        pb.CreateJourneyRequest(
            journey=jpb.Journey(
                display_name="broken",
                definition=definition(send("a", template="", next="b"), send("orphan")),
            )
        ),
        metadata=app.server,
    )
    report = await journeys.ValidateJourney(
        pb.ValidateJourneyRequest(journey_id=created.journey_id), metadata=app.server
    )
    assert not report.valid
    found = {(p.node_id, p.reason) for p in report.problems}
    assert {
        ("a", "MISSING_TEMPLATE"),
        ("a", "UNKNOWN_NODE"),
        ("orphan", "UNREACHABLE_NODE"),
        ("orphan", "DANGLING_OUTPUT"),
    } <= found
    refused = await failure(
        journeys.ActivateJourney(
            pb.ActivateJourneyRequest(journey_id=created.journey_id), metadata=app.server
        )
    )
    assert (refused.code, refused.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "JOURNEY_INVALID",
    )
    assert set(refused.fields) == {p.field for p in report.problems}


async def test_activate_refuses_a_draft_edited_while_it_was_being_validated(
    journeys: Any, app: TestApp, journey_database: str
) -> None:
    created = await journeys.CreateJourney(
        pb.CreateJourneyRequest(
            journey=jpb.Journey(
                display_name="raced", definition=definition(send("a", next="end"), exit_node())
            )
        ),
        metadata=app.server,
    )
    broken = definition(send("a", next="nowhere")).SerializeToString()
    where = (app.app_id, uuid.UUID(created.journey_id))
    editor = await asyncpg.connect(journey_database)
    watcher = await asyncpg.connect(journey_database)
    try:
        # An UpdateJourney holds the row while Activate validates the draft it read before:
        # Activate gets the row only once the edit (in place: still version 1) is committed.
        async with editor.transaction():
            await editor.execute(
                "SELECT 1 FROM journeys WHERE app_id = $1 AND journey_id = $2 FOR UPDATE", *where
            )
            activating = asyncio.ensure_future(
                journeys.ActivateJourney(
                    pb.ActivateJourneyRequest(journey_id=created.journey_id), metadata=app.server
                )
            )
            await wait_blocked_by(watcher, editor, "Activate waiting for the journey's row")
            await editor.execute(
                "UPDATE journey_versions SET definition = $3"
                " WHERE app_id = $1 AND journey_id = $2 AND version = 1",
                *where,
                broken,
            )
            await editor.execute(
                "UPDATE journeys SET update_time = now() WHERE app_id = $1 AND journey_id = $2",
                *where,
            )
        raced = await failure(activating)
    finally:
        await watcher.close()
        await editor.close()
    assert (raced.code, raced.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "JOURNEY_CHANGED")
    # Tried again, the edited draft is validated, and refused for what it is.
    again = await failure(
        journeys.ActivateJourney(
            pb.ActivateJourneyRequest(journey_id=created.journey_id), metadata=app.server
        )
    )
    assert (again.code, again.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "JOURNEY_INVALID")


async def test_editing_an_active_journey_makes_a_draft_version_and_insiders_stay(
    journeys: Any, users: Any, app: TestApp, feed: SendFeed
) -> None:
    (first, second) = await make_users(users, app, 2)
    v1 = definition(send("a", next="d"), delay("d", 3600, next="end"), exit_node("end"))
    journey = await create_active(journeys, app.server, v1)
    await add(journeys, app, journey.journey_id, [first])
    await feed.wait_for(1, journey.journey_id)

    v2 = definition(send("b", template="tpl-2", next="end"), exit_node("end"))
    edited = await journeys.UpdateJourney(
        pb.UpdateJourneyRequest(
            journey=jpb.Journey(journey_id=journey.journey_id, definition=v2),
            update_mask=field_mask_pb2.FieldMask(paths=["definition"]),
        ),
        metadata=app.server,
    )
    assert (edited.version, edited.active_version, edited.draft) == (2, 1, True)
    old = await journeys.GetJourney(
        pb.GetJourneyRequest(journey_id=journey.journey_id, version=1), metadata=app.server
    )
    assert [n.node_id for n in old.definition.nodes] == ["a", "d", "end"]

    activated = await journeys.ActivateJourney(
        pb.ActivateJourneyRequest(journey_id=journey.journey_id), metadata=app.server
    )
    assert (activated.version, activated.active_version, activated.draft) == (2, 2, False)
    await add(journeys, app, journey.journey_id, [second])
    [new_send] = await feed.wait_for(1, journey.journey_id, "b")
    assert new_send.user_id == second
    assert new_send.template_id == "tpl-2"
    inside = await state(journeys, app, journey.journey_id, first)
    assert (inside.version, inside.node_id, inside.status) == (
        1,
        "d",
        pb.CustomerState.STATUS_WAITING,
    )
    assert [(s.node_id, s.output) for s in inside.path] == [("a", "next"), ("d", "")]


async def test_pause_holds_awaited_events_until_resume_and_stop_exits_everyone(
    journeys: Any, users: Any, app: TestApp, feed: SendFeed
) -> None:
    (user_id, other) = await make_users(users, app, 2)
    d = definition(
        wait_for("clicked_banner", {"event": "after", "timeout": "late"}),
        send("after", next="end"),
        send("late", template="tpl-late", next="end"),
        exit_node("end"),
    )
    journey = await create_active(journeys, app.server, d)
    jid = journey.journey_id
    await add(journeys, app, jid, [user_id, other])

    async def waiting() -> bool:
        s = await state(journeys, app, jid, user_id)
        return s.status == pb.CustomerState.STATUS_WAITING

    await eventually(waiting, what="customer waiting for the event")
    paused = await journeys.PauseJourney(
        pb.PauseJourneyRequest(journey_id=jid), metadata=app.server
    )
    assert paused.state == jpb.Journey.STATE_PAUSED
    refused = await failure(add(journeys, app, jid, [user_id]))
    assert (refused.code, refused.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "JOURNEY_NOT_ACTIVE",
    )
    await track(users, app, user_id, "clicked_banner")
    await feed.settle(3)
    assert feed.of(jid) == [], "nothing is sent while paused"
    assert (await state(journeys, app, jid, user_id)).node_id == "wait"

    resumed = await journeys.ResumeJourney(
        pb.ResumeJourneyRequest(journey_id=jid), metadata=app.server
    )
    assert resumed.state == jpb.Journey.STATE_ACTIVE
    [sent] = await feed.wait_for(1, jid, "after")
    assert sent.user_id == user_id

    stopped = await journeys.StopJourney(pb.StopJourneyRequest(journey_id=jid), metadata=app.server)
    assert stopped.state == jpb.Journey.STATE_STOPPED
    left = await state(journeys, app, jid, other)
    assert left.status == pb.CustomerState.STATUS_EXITED
    assert left.path[-1].output == "(stopped)"
    again = await failure(
        journeys.ResumeJourney(pb.ResumeJourneyRequest(journey_id=jid), metadata=app.server)
    )
    assert again.code == grpc.StatusCode.FAILED_PRECONDITION
    stats = await journeys.GetJourneyStats(
        pb.GetJourneyStatsRequest(journey_id=jid), metadata=app.server
    )
    assert (stats.entered, stats.active) == (2, 0)
    nodes = {n.node_id: n for n in stats.nodes}
    assert nodes["wait"].exited == 2
    assert dict((o.output, o.count) for o in nodes["wait"].outputs) == {"event": 1}
    assert nodes["after"].sent == 1
    assert nodes["late"].sent == 0
    await feed.settle(1)
    assert len(feed.of(jid)) == 1
