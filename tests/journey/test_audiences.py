"""Audiences taken at activation: all contacts (paged, a job with progress) and segments."""

from __future__ import annotations

from typing import Any

from tidings.identity.v1 import segment_pb2, user_pb2
from tidings.journey.v1 import journey_pb2 as jpb
from tidings.journey.v1 import journey_service_pb2 as pb

from tests.identity.conftest import TestApp
from tests.journey.support import SendFeed, create_active, definition, exit_node, send
from tests.journey.test_send_flow import make_users
from tests.polling import eventually


async def test_all_contacts_enter_once_and_the_job_reports_progress(
    journeys: Any, users: Any, app: TestApp, feed: SendFeed
) -> None:
    user_ids = await make_users(users, app, 25)
    d = definition(
        send("hello", next="end"),
        exit_node("end"),
        entry=jpb.Entry(all_contacts=jpb.Entry.AllContacts()),
    )
    journey = await create_active(journeys, app.server, d)
    sends = await feed.wait_for(25, journey.journey_id)
    assert sorted(s.user_id for s in sends) == sorted(user_ids)

    async def done() -> jpb.Journey | None:
        got = await journeys.GetJourney(
            pb.GetJourneyRequest(journey_id=journey.journey_id), metadata=app.server
        )
        return got if got.audience.done else None

    finished = await eventually(done)
    assert finished is not None
    assert (finished.audience.scanned, finished.audience.entered) == (25, 25)
    await feed.settle(1)
    assert len(feed.of(journey.journey_id)) == 25


GOLD = user_pb2.AttributeValue(string_value="gold")


async def gold_segment(users: Any, app: TestApp) -> str:
    """A segment of the customers whose ``plan`` is gold; its id."""
    segment = await users.CreateSegment(
        segment_pb2.CreateSegmentRequest(
            segment=segment_pb2.Segment(
                display_name="gold",
                condition=segment_pb2.Condition(
                    attribute=segment_pb2.AttributeCondition(
                        field="attributes.plan",
                        operator=segment_pb2.OPERATOR_EQUALS,
                        values=[GOLD],
                    )
                ),
            )
        ),
        metadata=app.server,
    )
    return str(segment.segment_id)


def segment_journey(segment_id: str, *, only_future_members: bool = False) -> jpb.JourneyDefinition:
    """Say hello to the segment's members."""
    entry = jpb.Entry.SegmentMembers(segment_id=segment_id, only_future_members=only_future_members)
    return definition(send("hello", next="end"), exit_node("end"), entry=jpb.Entry(segment=entry))


async def test_segment_members_enter_at_activation_and_when_they_join(
    journeys: Any, users: Any, app: TestApp, feed: SendFeed
) -> None:
    members = await make_users(users, app, 2, attributes={"plan": GOLD})
    await make_users(users, app, 2, attributes={"plan": user_pb2.AttributeValue(string_value="x")})
    # The default: current members at activation, then those who join.
    d = segment_journey(await gold_segment(users, app))
    journey = await create_active(journeys, app.server, d)
    first = await feed.wait_for(2, journey.journey_id)
    assert sorted(s.user_id for s in first) == sorted(members)

    (joiner,) = await make_users(users, app, 1, attributes={"plan": GOLD})
    await feed.wait_for(3, journey.journey_id, within=60)
    assert joiner in {s.user_id for s in feed.of(journey.journey_id)}
    await feed.settle(1)
    assert len(feed.of(journey.journey_id)) == 3


async def test_only_future_members_leaves_out_the_members_at_activation(
    journeys: Any, users: Any, app: TestApp, feed: SendFeed
) -> None:
    await make_users(users, app, 2, attributes={"plan": GOLD})
    d = segment_journey(await gold_segment(users, app), only_future_members=True)
    journey = await create_active(journeys, app.server, d)
    got = await journeys.GetJourney(
        pb.GetJourneyRequest(journey_id=journey.journey_id), metadata=app.server
    )
    assert not got.HasField("audience"), "no audience job"

    (joiner,) = await make_users(users, app, 1, attributes={"plan": GOLD})
    [hello] = await feed.wait_for(1, journey.journey_id, within=60)
    assert hello.user_id == joiner
    await feed.settle(1)
    assert len(feed.of(journey.journey_id)) == 1


async def test_a_segment_audience_is_entered_page_after_page_once_each(
    journeys: Any, users: Any, app: TestApp, feed: SendFeed
) -> None:
    # More members than a page (1,000): the second page is read after the first's last id.
    members = await make_users(users, app, 1001, attributes={"plan": GOLD})
    journey = await create_active(
        journeys, app.server, segment_journey(await gold_segment(users, app))
    )
    sends = await feed.wait_for(1001, journey.journey_id, within=120)
    assert sorted(s.user_id for s in sends) == sorted(members)

    async def done() -> jpb.Journey | None:
        got = await journeys.GetJourney(
            pb.GetJourneyRequest(journey_id=journey.journey_id), metadata=app.server
        )
        return got if got.audience.done else None

    finished = await eventually(done)
    assert finished is not None
    # Every member scanned once; some may have entered first by their `segment entered` fact.
    assert finished.audience.scanned == 1001
    await feed.settle(1)
    assert len(feed.of(journey.journey_id)) == 1001


async def test_unknown_segment_is_a_validation_problem(journeys: Any, app: TestApp) -> None:
    d = definition(
        send("hello", next="end"),
        exit_node("end"),
        entry=jpb.Entry(segment=jpb.Entry.SegmentMembers(segment_id="seg-that-is-not")),
    )
    created = await journeys.CreateJourney(
        pb.CreateJourneyRequest(journey=jpb.Journey(display_name="s", definition=d)),
        metadata=app.server,
    )
    report = await journeys.ValidateJourney(
        pb.ValidateJourneyRequest(journey_id=created.journey_id), metadata=app.server
    )
    assert [(p.field, p.reason) for p in report.problems] == [
        ("definition.entry.segment.segment_id", "UNKNOWN_SEGMENT")
    ]
