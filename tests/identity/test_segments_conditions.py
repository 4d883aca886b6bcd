"""Event, subscription and membership conditions through gRPC: every count rule (users with no
events at all included), windows, property conditions, first / last time, reachable
subscriptions per type, member_of another segment, and and / or / not over them.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from google.protobuf import duration_pb2, field_mask_pb2
from tidings.identity.v1 import identity_service_pb2 as pb
from tidings.identity.v1 import segment_pb2 as sp
from tidings.identity.v1 import subscription_pb2 as spb

from tests.identity.conftest import TestApp
from tests.identity.support import EMAIL, IOS, SMS, address, create, ext, push
from tests.identity.test_segments_support import (
    Op,
    all_,
    any_,
    attr,
    count,
    create_segment,
    event,
    matching,
    member_of,
    not_,
    prop,
    stored_events,
    subscribed,
    track,
    ts,
    upsert,
)

AT_LEAST = sp.COUNT_OPERATOR_AT_LEAST
AT_MOST = sp.COUNT_OPERATOR_AT_MOST
EXACTLY = sp.COUNT_OPERATOR_EXACTLY


def occurrence(op: Any, *, time: datetime | None = None, days: int = 0) -> Any:
    message = sp.EventCondition.Occurrence(operator=op, days=days)
    if time is not None:
        message.time.CopyFrom(ts(time))
    return message


def window(**duration: float) -> duration_pb2.Duration:
    span = duration_pb2.Duration()
    span.FromTimedelta(timedelta(**duration))
    return span


@pytest.fixture
async def shoppers(identity_stub: Any, app: TestApp) -> datetime:
    """u1 bought 3 times lately and once 60 days ago; u2 once, 2 days ago; u3 did nothing at
    all; u4 only logged in. Returns the time the events are relative to."""
    now = datetime.now(UTC)
    for user in ("u1", "u2", "u3", "u4"):
        await upsert(identity_stub, app, user, {"plan": "gold" if user in ("u1", "u2") else "free"})
    purchases = [
        ("u1", now - timedelta(hours=1), {"amount": 10, "sku": "A", "paid_at": "garbage"}),
        ("u1", now - timedelta(hours=2), {"amount": 50, "sku": "B", "gift": True}),
        ("u1", now - timedelta(hours=3), {"amount": 120, "sku": "A"}),
        ("u1", now - timedelta(days=60), {"amount": 5, "sku": "Z"}),
        (
            "u2",
            now - timedelta(days=2),
            {"amount": 20, "sku": "C", "coupon": "SPRING", "paid_at": "2025-05-01T10:00:00Z"},
        ),
    ]
    for user, at, properties in purchases:
        await track(identity_stub, app, user, "purchase", at=at, properties=properties)
    for hours in (1, 5):
        await track(identity_stub, app, "u4", "login", at=now - timedelta(hours=hours))
    await stored_events(identity_stub, app, {"u1": 4, "u2": 1, "u3": 0, "u4": 2})
    return now


async def test_event_counts_windows_properties_and_occurrences(
    identity_stub: Any, app: TestApp, shoppers: datetime
) -> None:
    now = shoppers
    cases: list[tuple[sp.Condition, set[str]]] = [
        # Counts; "at most" and "exactly 0" include users who never did anything.
        (event("purchase"), {"u1", "u2"}),
        (event("purchase", count=0, count_operator=AT_MOST), {"u3", "u4"}),
        (event("purchase", count=2, count_operator=AT_LEAST), {"u1"}),
        (event("purchase", count=1, count_operator=AT_MOST), {"u2", "u3", "u4"}),
        (event("purchase", count=1, count_operator=EXACTLY), {"u2"}),
        (event("purchase", count=0, count_operator=EXACTLY), {"u3", "u4"}),
        (event("purchase", count=4), {"u1"}),
        (event("purchase", count=0), {"u1", "u2", "u3", "u4"}),  # at least 0: everyone
        (event("never_done", count=0, count_operator=AT_MOST), {"u1", "u2", "u3", "u4"}),
        # Windows.
        (event("purchase", count=4, within_last=window(days=7)), set()),
        (event("purchase", count=3, count_operator=EXACTLY, within_last=window(days=7)), {"u1"}),
        (event("purchase", within_last=window(minutes=90)), {"u1"}),
        (event("purchase", within_last=window(days=3)), {"u1", "u2"}),
        (
            event("purchase", count=0, count_operator=AT_MOST, within_last=window(days=1)),
            {"u2", "u3", "u4"},
        ),
        (
            event(
                "purchase",
                between=sp.TimeRange(
                    start_time=ts(now - timedelta(days=61)), end_time=ts(now - timedelta(days=59))
                ),
            ),
            {"u1"},
        ),
        (event("purchase", between=sp.TimeRange(start_time=ts(now - timedelta(days=1)))), {"u1"}),
        (
            event("purchase", between=sp.TimeRange(end_time=ts(now - timedelta(days=1)))),
            {"u1", "u2"},
        ),
        # Property conditions.
        (event("purchase", where=[prop("amount", Op.OPERATOR_GREATER_THAN, 100)]), {"u1"}),
        (
            event(
                "purchase",
                where=[prop("amount", Op.OPERATOR_GREATER_THAN, 100)],
                count=0,
                count_operator=AT_MOST,
            ),
            {"u2", "u3", "u4"},
        ),
        (
            event("purchase", where=[prop("sku", Op.OPERATOR_EQUALS, "A")], count=2),
            {"u1"},
        ),
        (event("purchase", where=[prop("sku", Op.OPERATOR_IN, "C", "D")]), {"u2"}),
        (event("purchase", where=[prop("sku", Op.OPERATOR_CONTAINS, "c")]), {"u2"}),
        (event("purchase", where=[prop("sku", Op.OPERATOR_NOT_EQUALS, "A")]), {"u1", "u2"}),
        (event("purchase", where=[prop("sku", Op.OPERATOR_EQUALS, 5)]), set()),  # typed
        (event("purchase", where=[prop("amount", Op.OPERATOR_EQUALS, 50)]), {"u1"}),
        (event("purchase", where=[prop("amount", Op.OPERATOR_BETWEEN, 15, 25)]), {"u2"}),
        (event("purchase", where=[prop("amount", Op.OPERATOR_NOT_IN, 10, 50, 120, 5)]), {"u2"}),
        (event("purchase", where=[prop("coupon", Op.OPERATOR_EXISTS)]), {"u2"}),
        (
            event("purchase", where=[prop("coupon", Op.OPERATOR_NOT_EXISTS)], count=4),
            {"u1"},
        ),
        (event("purchase", where=[prop("gift", Op.OPERATOR_EQUALS, True)]), {"u1"}),
        (
            event(
                "purchase",
                where=[prop("paid_at", Op.OPERATOR_AFTER, datetime(2025, 1, 1, tzinfo=UTC))],
            ),
            {"u2"},  # u1's "garbage" is not a time, and fails nothing
        ),
        (
            event(
                "purchase",
                where=[
                    prop("sku", Op.OPERATOR_EQUALS, "A"),
                    prop("amount", Op.OPERATOR_LESS_THAN, 100),
                ],
            ),
            {"u1"},
        ),
        # First and last time.
        (
            event(
                "purchase",
                first_time=occurrence(Op.OPERATOR_BEFORE, time=now - timedelta(days=30)),
            ),
            {"u1"},
        ),
        (
            event(
                "purchase", first_time=occurrence(Op.OPERATOR_AFTER, time=now - timedelta(days=30))
            ),
            {"u2"},
        ),
        (event("purchase", first_time=occurrence(Op.OPERATOR_WITHIN_LAST_DAYS, days=7)), {"u2"}),
        (event("purchase", last_time=occurrence(Op.OPERATOR_WITHIN_LAST_DAYS, days=1)), {"u1"}),
        (
            event(
                "purchase", last_time=occurrence(Op.OPERATOR_BEFORE, time=now - timedelta(days=1))
            ),
            {"u2"},
        ),
        # Trees.
        (not_(event("purchase")), {"u3", "u4"}),
        (any_(event("login"), event("purchase", count=3)), {"u1", "u4"}),
        (
            all_(not_(event("login")), event("purchase", count=1, count_operator=AT_MOST)),
            {"u2", "u3"},
        ),
        (
            all_(
                attr("attributes.plan", Op.OPERATOR_EQUALS, "gold"),
                event("purchase", count=2, within_last=window(days=30)),
            ),
            {"u1"},
        ),
    ]
    for condition, expected in cases:
        got = await matching(identity_stub, app, condition)
        assert got == expected, (condition, got)
        assert await count(identity_stub, app, condition) == len(expected), condition


async def test_subscription_conditions_need_enabled_and_opted_in(
    identity_stub: Any, app: TestApp
) -> None:
    for user in ("u1", "u2", "u3", "u4"):
        await upsert(identity_stub, app, user)
    await identity_stub.CreateSubscription(create(address(EMAIL), ext("u1")), metadata=app.server)
    unsubscribed = await identity_stub.CreateSubscription(
        create(address(EMAIL), ext("u2")), metadata=app.server
    )
    await identity_stub.UpdateSubscription(
        pb.UpdateSubscriptionRequest(
            subscription=spb.Subscription(
                subscription_id=unsubscribed.subscription_id,
                opt_in=spb.OPT_IN_STATE_UNSUBSCRIBED,
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["opt_in"]),
        ),
        metadata=app.server,
    )
    await identity_stub.CreateSubscription(create(push(IOS), ext("u3")), metadata=app.server)
    disabled = await identity_stub.CreateSubscription(
        create(address(SMS), ext("u4")), metadata=app.server
    )
    await identity_stub.UpdateSubscription(
        pb.UpdateSubscriptionRequest(
            subscription=spb.Subscription(subscription_id=disabled.subscription_id, enabled=False),
            update_mask=field_mask_pb2.FieldMask(paths=["enabled"]),
        ),
        metadata=app.server,
    )
    assert await matching(identity_stub, app, subscribed(EMAIL)) == {"u1"}
    assert await matching(identity_stub, app, subscribed(IOS)) == {"u3"}
    assert await matching(identity_stub, app, subscribed(SMS)) == set()
    assert await matching(identity_stub, app, not_(subscribed(EMAIL))) == {"u2", "u3", "u4"}
    assert await matching(identity_stub, app, any_(subscribed(EMAIL), subscribed(IOS))) == {
        "u1",
        "u3",
    }


async def test_member_of_another_segment(identity_stub: Any, app: TestApp) -> None:
    for user, plan in (("u1", "gold"), ("u2", "gold"), ("u3", "free"), ("u4", "free")):
        await upsert(identity_stub, app, user, {"plan": plan})
    await track(identity_stub, app, "u1", "purchase")
    await stored_events(identity_stub, app, {"u1": 1})
    gold = await create_segment(
        identity_stub, app, attr("attributes.plan", Op.OPERATOR_EQUALS, "gold")
    )
    assert await matching(identity_stub, app, member_of(gold.segment_id)) == {"u1", "u2"}
    assert await matching(identity_stub, app, not_(member_of(gold.segment_id))) == {"u3", "u4"}
    assert await matching(
        identity_stub, app, all_(member_of(gold.segment_id), event("purchase"))
    ) == {"u1"}
    assert await count(identity_stub, app, member_of(gold.segment_id)) == 2
