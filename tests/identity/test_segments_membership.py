"""Membership kept up to date through gRPC and Kafka: SEGMENT_ENTERED / SEGMENT_EXITED facts on
``identity.changes`` after an upsert, an event, a subscription opt-out; segments that refer to
others; history and "member at time T"; Explain; erasure.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from google.protobuf import field_mask_pb2
from tidings.events.v1.identity_change_pb2 import IdentityChange
from tidings.identity.v1 import identity_service_pb2 as pb
from tidings.identity.v1 import segment_pb2 as sp
from tidings.identity.v1 import subscription_pb2 as spb

from tests.identity.conftest import TestApp
from tests.identity.support import EMAIL, ChangeFeed, address, by_id, create, ext, failure
from tests.identity.test_segments_support import (
    Op,
    all_,
    attr,
    create_segment,
    event,
    member_external_ids,
    member_of,
    stored_events,
    subscribed,
    track,
    ts,
    upsert,
)
from tests.polling import eventually

ENTERED = IdentityChange.KIND_SEGMENT_ENTERED
EXITED = IdentityChange.KIND_SEGMENT_EXITED
GOLD = attr("attributes.plan", Op.OPERATOR_EQUALS, "gold")


def segment_facts(feed: ChangeFeed, segment_id: str) -> list[tuple[int, str]]:
    """(kind, external id) of the facts about one segment: each user's in the order they
    arrived (one user's facts share a partition), users in alphabetical order (facts of
    different users may arrive in any order)."""
    found = [
        (change.kind, change.external_id)
        for change in feed.changes
        if change.segment_id == segment_id and change.kind in (ENTERED, EXITED)
    ]
    return sorted(found, key=lambda fact: fact[1])  # stable: keeps each user's order


async def facts_about(
    feed: ChangeFeed, segment_id: str, expected: list[tuple[int, str]]
) -> list[IdentityChange]:
    """Wait until the segment's facts are exactly ``expected`` (and stay so briefly)."""
    await feed.until(lambda _: len(segment_facts(feed, segment_id)) >= len(expected))
    await asyncio.sleep(0.3)  # would a duplicate follow?
    await feed.until(lambda _: True)
    assert segment_facts(feed, segment_id) == sorted(expected, key=lambda fact: fact[1])
    return [c for c in feed.changes if c.segment_id == segment_id]


async def test_entered_and_exited_after_upserts(
    identity_stub: Any, app: TestApp, feed: ChangeFeed
) -> None:
    ana = await upsert(identity_stub, app, "ana", {"plan": "gold"})
    segment = await create_segment(identity_stub, app, GOLD)
    await upsert(identity_stub, app, "bob", {"plan": "gold"})  # a new user enters
    await upsert(identity_stub, app, "ana", {"plan": "silver"})  # ana leaves
    await upsert(identity_stub, app, "bob", {"plan": "gold"})  # no change: no fact
    facts = await facts_about(
        feed, segment.segment_id, [(ENTERED, "ana"), (ENTERED, "bob"), (EXITED, "ana")]
    )
    first = next(f for f in facts if f.external_id == "ana")
    assert first.user_id == ana
    assert first.app_id == app.app_id
    assert first.occurred_at.seconds > 0
    assert len({f.event_id for f in facts}) == 3
    got = await identity_stub.GetSegment(
        sp.GetSegmentRequest(segment_id=segment.segment_id), metadata=app.server
    )
    assert got.member_count == 1
    assert await member_external_ids(identity_stub, app, segment.segment_id) == {"bob"}


async def test_entered_after_events(identity_stub: Any, app: TestApp, feed: ChangeFeed) -> None:
    await upsert(identity_stub, app, "ana")
    segment = await create_segment(identity_stub, app, event("purchase", count=2))
    await track(identity_stub, app, "ana", "purchase")
    await stored_events(identity_stub, app, {"ana": 1})
    await track(identity_stub, app, "ana", "purchase")
    await facts_about(feed, segment.segment_id, [(ENTERED, "ana")])


async def test_exited_after_a_subscription_opt_out(
    identity_stub: Any, app: TestApp, feed: ChangeFeed
) -> None:
    await upsert(identity_stub, app, "ana")
    segment = await create_segment(identity_stub, app, subscribed(EMAIL))
    registered = await identity_stub.CreateSubscription(
        create(address(EMAIL), ext("ana")), metadata=app.server
    )
    await facts_about(feed, segment.segment_id, [(ENTERED, "ana")])
    await identity_stub.UpdateSubscription(
        pb.UpdateSubscriptionRequest(
            subscription=spb.Subscription(
                subscription_id=registered.subscription_id, opt_in=spb.OPT_IN_STATE_UNSUBSCRIBED
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["opt_in"]),
        ),
        metadata=app.server,
    )
    await facts_about(feed, segment.segment_id, [(ENTERED, "ana"), (EXITED, "ana")])


async def test_segments_referring_to_a_changed_segment_follow_it(
    identity_stub: Any, app: TestApp, feed: ChangeFeed
) -> None:
    await upsert(identity_stub, app, "ana", {"plan": "free"})
    await track(identity_stub, app, "ana", "purchase")
    await stored_events(identity_stub, app, {"ana": 1})
    gold = await create_segment(identity_stub, app, GOLD, name="gold")
    buyers = await create_segment(
        identity_stub, app, all_(member_of(gold.segment_id), event("purchase")), name="buyers"
    )
    await upsert(identity_stub, app, "ana", {"plan": "gold"})
    await facts_about(feed, gold.segment_id, [(ENTERED, "ana")])
    await facts_about(feed, buyers.segment_id, [(ENTERED, "ana")])
    # A condition change re-materialises, and segments referring to it follow.
    await identity_stub.UpdateSegment(
        sp.UpdateSegmentRequest(
            segment=sp.Segment(
                segment_id=gold.segment_id,
                condition=attr("attributes.plan", Op.OPERATOR_EQUALS, "platinum"),
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["condition"]),
        ),
        metadata=app.server,
    )
    await facts_about(feed, gold.segment_id, [(ENTERED, "ana"), (EXITED, "ana")])
    await facts_about(feed, buyers.segment_id, [(ENTERED, "ana"), (EXITED, "ana")])


async def test_history_and_membership_at_a_time(identity_stub: Any, app: TestApp) -> None:
    user_id = await upsert(identity_stub, app, "ana", {"plan": "gold"})
    segment = await create_segment(identity_stub, app, GOLD)

    async def membership(at: datetime | None = None) -> sp.GetSegmentMembershipResponse:
        request = sp.GetSegmentMembershipRequest(segment_id=segment.segment_id, user=ext("ana"))
        if at is not None:
            request.at_time.CopyFrom(ts(at))
        response: sp.GetSegmentMembershipResponse = await identity_stub.GetSegmentMembership(
            request, metadata=app.server
        )
        return response

    await upsert(identity_stub, app, "ana", {"plan": "silver"})
    await eventually(membership, lambda m: not m.member, what="exit")
    await upsert(identity_stub, app, "ana", {"plan": "gold"})
    now = await eventually(membership, lambda m: m.member, what="re-entry")
    assert len(now.history) == 2
    first, second = now.history
    assert first.HasField("exit_time")
    assert not second.HasField("exit_time")
    enter1 = first.enter_time.ToDatetime(tzinfo=UTC)
    exit1 = first.exit_time.ToDatetime(tzinfo=UTC)
    enter2 = second.enter_time.ToDatetime(tzinfo=UTC)
    assert enter1 < exit1 <= enter2
    during = enter1 + (exit1 - enter1) / 2
    assert (await membership(during)).member_at_time
    assert not (await membership(enter1 - timedelta(seconds=1))).member_at_time
    if exit1 < enter2:
        assert not (await membership(exit1 + (enter2 - exit1) / 2)).member_at_time
    assert (await membership(enter2 + timedelta(seconds=1))).member_at_time
    assert not (await membership()).member_at_time  # not asked
    named_by_id = await identity_stub.GetSegmentMembership(
        sp.GetSegmentMembershipRequest(segment_id=segment.segment_id, user=by_id(user_id)),
        metadata=app.server,
    )
    assert named_by_id.member


async def test_explain_says_which_conditions_held(identity_stub: Any, app: TestApp) -> None:
    await upsert(identity_stub, app, "ana", {"plan": "gold"})
    await track(identity_stub, app, "ana", "purchase")
    await stored_events(identity_stub, app, {"ana": 1})
    segment = await create_segment(identity_stub, app, all_(GOLD, event("purchase", count=2)))
    explained = await identity_stub.ExplainSegmentMembership(
        sp.ExplainSegmentMembershipRequest(segment_id=segment.segment_id, user=ext("ana")),
        metadata=app.server,
    )
    assert not explained.member
    root = explained.result
    assert (root.path, root.held) == ("condition.all", False)
    plan, purchases = root.children
    assert (plan.path, plan.held) == ("condition.all.conditions[0].attribute", True)
    assert '"gold"' in plan.detail
    assert (purchases.path, purchases.held) == ("condition.all.conditions[1].event", False)
    assert "purchase done 1 time" in purchases.detail
    await track(identity_stub, app, "ana", "purchase")
    await stored_events(identity_stub, app, {"ana": 2})
    again = await identity_stub.ExplainSegmentMembership(
        sp.ExplainSegmentMembershipRequest(segment_id=segment.segment_id, user=ext("ana")),
        metadata=app.server,
    )
    assert again.member
    assert [c.held for c in again.result.children] == [True, True]
    nobody = await failure(
        identity_stub.ExplainSegmentMembership(
            sp.ExplainSegmentMembershipRequest(segment_id=segment.segment_id, user=ext("nobody")),
            metadata=app.server,
        )
    )
    assert (nobody.code, nobody.reason) == (grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND")


async def test_erased_users_leave_without_a_trace(
    identity_stub: Any, app: TestApp, feed: ChangeFeed
) -> None:
    await upsert(identity_stub, app, "ana", {"plan": "gold"})
    await upsert(identity_stub, app, "bob", {"plan": "gold"})
    segment = await create_segment(identity_stub, app, GOLD)
    await identity_stub.DeleteUser(pb.DeleteUserRequest(ref=ext("ana")), metadata=app.server)

    async def member_count() -> int:
        got = await identity_stub.GetSegment(
            sp.GetSegmentRequest(segment_id=segment.segment_id), metadata=app.server
        )
        return int(got.member_count)

    await eventually(member_count, lambda n: n == 1, what="purge")
    assert await member_external_ids(identity_stub, app, segment.segment_id) == {"bob"}
    await feed.wait_for(IdentityChange.KIND_USER_DELETED)
    assert segment_facts(feed, segment.segment_id) == [(ENTERED, "ana"), (ENTERED, "bob")]
