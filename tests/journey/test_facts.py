"""Facts from Kafka move customers: event entries, goals, retargeting, receipts and engagements."""

from __future__ import annotations

import uuid
from typing import Any

from tidings.events.v1.delivery_receipt_pb2 import DeliveryReceipt
from tidings.identity.v1 import identity_service_pb2 as ipb
from tidings.identity.v1 import segment_pb2, user_pb2, user_ref_pb2
from tidings.journey.v1 import journey_pb2 as jpb
from tidings.journey.v1 import journey_service_pb2 as pb

from tests.identity.conftest import TestApp
from tests.journey.support import (
    SendFeed,
    create_active,
    definition,
    event_entry,
    exit_node,
    node,
    publish_receipts,
    receipt,
    seconds,
    send,
    struct,
)
from tests.journey.test_lifecycle import state
from tests.journey.test_send_flow import make_users
from tests.polling import eventually


async def track(users: Any, app: TestApp, *events: tuple[str, str, dict[str, Any], str]) -> None:
    """Track ``(user_id, name, properties, event_id)`` events."""
    response = await users.TrackEvents(
        ipb.TrackEventsRequest(
            events=[
                ipb.TrackedEventInput(
                    user=user_ref_pb2.UserRef(user_id=u),
                    name=name,
                    properties=struct(props),
                    event_id=event_id,
                )
                for u, name, props, event_id in events
            ]
        ),
        metadata=app.server,
    )
    assert not any(r.HasField("error") for r in response.results), response


async def stats_of(journeys: Any, app: TestApp, journey_id: str) -> pb.JourneyStats:
    found: pb.JourneyStats = await journeys.GetJourneyStats(
        pb.GetJourneyStatsRequest(journey_id=journey_id), metadata=app.server
    )
    return found


def eq(prop: str, value: str) -> segment_pb2.PropertyCondition:
    return segment_pb2.PropertyCondition(
        property=prop,
        operator=segment_pb2.OPERATOR_EQUALS,
        values=[user_pb2.AttributeValue(string_value=value)],
    )


async def test_event_entry_filters_properties_and_enters_once_per_event(
    journeys: Any, users: Any, app: TestApp, feed: SendFeed
) -> None:
    (user_id, other) = await make_users(users, app, 2)
    d = definition(
        send("welcome", next="end"),
        exit_node("end"),
        entry=event_entry("signed_up", eq("plan", "pro")),
        reentry=jpb.ReentryPolicy(mode=jpb.ReentryPolicy.MODE_ALWAYS),
    )
    journey = await create_active(journeys, app.server, d)
    first = str(uuid.uuid4())
    await track(
        users,
        app,
        (user_id, "signed_up", {"plan": "pro", "source": "ad"}, first),
        (other, "signed_up", {"plan": "free"}, str(uuid.uuid4())),
    )
    [sent] = await feed.wait_for(1, journey.journey_id)
    assert sent.user_id == user_id
    assert dict(sent.trigger_properties) == {"plan": "pro", "source": "ad"}

    async def left() -> bool:
        return (await state(journeys, app, journey.journey_id, user_id)).status == (
            pb.CustomerState.STATUS_EXITED
        )

    await eventually(left)
    # The same event again (a retry with its id) enters nobody; a new one does (ALWAYS).
    await track(users, app, (user_id, "signed_up", {"plan": "pro"}, first))
    await track(users, app, (user_id, "signed_up", {"plan": "pro"}, str(uuid.uuid4())))
    await feed.wait_for(2, journey.journey_id)
    await feed.settle(2)
    assert len(feed.of(journey.journey_id)) == 2
    second_visit = await state(journeys, app, journey.journey_id, user_id)
    assert second_visit.visit == 2


async def test_retargeting_reminds_only_those_whose_cart_was_not_bought(
    journeys: Any, users: Any, app: TestApp, feed: SendFeed
) -> None:
    (buyer, idler, other_cart) = await make_users(users, app, 3)
    d = definition(
        node(
            "cart",
            retarget=jpb.RetargetNode(
                goal_event="purchase", correlation_property="cart_id", window=seconds(2)
            ),
            next={"converted": "thanks", "reminder": "remind"},
        ),
        send("thanks", template="tpl-thanks", next="end"),
        send("remind", template="tpl-remind", next="end"),
        exit_node("end"),
        entry=event_entry("add_to_cart"),
    )
    journey = await create_active(journeys, app.server, d)
    jid = journey.journey_id
    await track(
        users,
        app,
        (buyer, "add_to_cart", {"cart_id": "c-1"}, str(uuid.uuid4())),
        (idler, "add_to_cart", {"cart_id": "c-2"}, str(uuid.uuid4())),
        (other_cart, "add_to_cart", {"cart_id": "c-3"}, str(uuid.uuid4())),
    )

    async def all_waiting() -> bool:
        states = [await state(journeys, app, jid, u) for u in (buyer, idler, other_cart)]
        return all(s.status == pb.CustomerState.STATUS_WAITING for s in states)

    await eventually(all_waiting)
    await track(
        users,
        app,
        (buyer, "purchase", {"cart_id": "c-1"}, str(uuid.uuid4())),
        # A purchase of another cart does not cancel this one's reminder.
        (other_cart, "purchase", {"cart_id": "c-999"}, str(uuid.uuid4())),
    )
    reminders = await feed.wait_for(2, jid, "remind")
    assert sorted(r.user_id for r in reminders) == sorted([idler, other_cart])
    [thanks] = await feed.wait_for(1, jid, "thanks")
    assert thanks.user_id == buyer
    nodes = {n.node_id: n for n in (await stats_of(journeys, app, jid)).nodes}
    assert {o.output: o.count for o in nodes["cart"].outputs} == {"converted": 1, "reminder": 2}


async def test_goal_converts_wherever_the_customer_is(
    journeys: Any, users: Any, app: TestApp, feed: SendFeed
) -> None:
    (user_id,) = await make_users(users, app, 1)
    d = definition(
        send("hello", next="wait"),
        node(
            "wait",
            delay=jpb.DelayNode(duration=seconds(86400)),
            next={"next": "later"},
        ),
        send("later", next="end"),
        exit_node("end"),
        goal=jpb.Goal(event_name="subscribed"),
    )
    journey = await create_active(journeys, app.server, d)
    jid = journey.journey_id
    await journeys.AddCustomers(
        pb.AddCustomersRequest(journey_id=jid, customers=[user_ref_pb2.UserRef(user_id=user_id)]),
        metadata=app.server,
    )
    await feed.wait_for(1, jid)
    await track(users, app, (user_id, "subscribed", {}, str(uuid.uuid4())))

    async def converted() -> pb.CustomerState | None:
        s = await state(journeys, app, jid, user_id)
        return s if s.status == pb.CustomerState.STATUS_CONVERTED else None

    done = await eventually(converted)
    assert done is not None
    assert [(p.node_id, p.output) for p in done.path] == [("hello", "next"), ("wait", "(goal)")]
    stats = await stats_of(journeys, app, jid)
    assert (stats.entered, stats.converted, stats.conversion_rate, stats.active) == (1, 1, 1.0, 0)
    assert {n.node_id: n.converted for n in stats.nodes}["wait"] == 1


async def test_receipts_drive_result_waits_engagement_waits_and_statistics(
    journeys: Any, users: Any, app: TestApp, feed: SendFeed
) -> None:
    user_ids = await make_users(users, app, 4)
    d = definition(
        node(
            "push",
            send=jpb.SendNode(
                template_id="tpl-push",
                channels=["ios_push"],
                wait_for_result=True,
                result_timeout=seconds(3600),
            ),
            next={"delivered": "click", "failed": "sms"},
        ),
        node(
            "click",
            wait_for_event=jpb.WaitForEventNode(
                engagement=jpb.Engagement(send_node_id="push", kind=jpb.Engagement.KIND_CLICKED),
                timeout=seconds(3600),
            ),
            next={"event": "email", "timeout": "end"},
        ),
        send("email", template="tpl-email", channels=("email",), next="end"),
        send("sms", template="tpl-sms", channels=("sms",), next="end"),
        exit_node("end"),
    )
    journey = await create_active(journeys, app.server, d)
    jid = journey.journey_id
    await journeys.AddCustomers(
        pb.AddCustomersRequest(
            journey_id=jid, customers=[user_ref_pb2.UserRef(user_id=u) for u in user_ids]
        ),
        metadata=app.server,
    )
    pushes = {r.user_id: r for r in await feed.wait_for(4, jid, "push")}
    a, b, c, failed = (pushes[u] for u in user_ids)
    Status = DeliveryReceipt
    await publish_receipts(
        [
            receipt(a, Status.STATUS_DELIVERED, str(uuid.uuid4())),
            receipt(b, Status.STATUS_DELIVERED, str(uuid.uuid4())),
            receipt(c, Status.STATUS_DELIVERED, str(uuid.uuid4())),
            receipt(failed, Status.STATUS_FAILED, str(uuid.uuid4())),
            # Clicked before the customer reaches the wait: found when they get there.
            receipt(a, Status.STATUS_CLICKED, str(uuid.uuid4())),
        ]
    )
    [sms] = await feed.wait_for(1, jid, "sms")
    assert sms.user_id == failed.user_id

    async def at_click() -> bool:
        s = await state(journeys, app, jid, b.user_id)
        return s.node_id == "click" and s.status == pb.CustomerState.STATUS_WAITING

    await eventually(at_click)
    clicked_twice = str(uuid.uuid4())
    await publish_receipts(
        [
            receipt(b, Status.STATUS_OPENED, str(uuid.uuid4())),
            receipt(b, Status.STATUS_CLICKED, clicked_twice),
            receipt(b, Status.STATUS_CLICKED, clicked_twice),  # redelivered: applied once
            receipt(b, Status.STATUS_CLICKED, str(uuid.uuid4())),  # a second click
        ]
    )
    emails = await feed.wait_for(2, jid, "email")
    assert sorted(e.user_id for e in emails) == sorted([a.user_id, b.user_id])
    await feed.settle(1)
    assert len(feed.of(jid)) == 4 + 1 + 2

    async def counted() -> dict[str, Any] | None:
        nodes = {n.node_id: n for n in (await stats_of(journeys, app, jid)).nodes}
        push = nodes["push"]
        got = {
            "sent": push.sent,
            "delivered": push.delivered,
            "opened": push.opened,
            "clicked": push.clicked,
            "failed": push.failed,
        }
        return got if got["clicked"] == 2 else None

    assert await eventually(counted) == {
        "sent": 4,
        "delivered": 3,
        "opened": 1,
        "clicked": 2,
        "failed": 1,
    }
