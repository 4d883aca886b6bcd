"""Builders and calls shared by the segment tests: conditions, segments, members, waiting.

Conditions are built as protobuf messages, the way a client sends them; waiting is polling
with a deadline (the maintainer applies changes asynchronously, within a second or so).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from google.protobuf.timestamp_pb2 import Timestamp
from tidings.identity.v1 import identity_service_pb2 as pb
from tidings.identity.v1 import segment_pb2 as sp
from tidings.identity.v1 import user_pb2

from tests.conftest import unique_name
from tests.identity.conftest import TestApp
from tests.identity.support import b, ext, n, s
from tests.polling import eventually

if TYPE_CHECKING:
    from tidings.identity.v1.identity_service_pb2_grpc import IdentityServiceAsyncStub

Op = sp.Operator
T = TypeVar("T")


def ts(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def t(moment: datetime) -> user_pb2.AttributeValue:
    """A timestamp operand."""
    return user_pb2.AttributeValue(timestamp_value=ts(moment))


def value(v: object) -> user_pb2.AttributeValue:
    """An operand from a Python value."""
    if isinstance(v, user_pb2.AttributeValue):
        return v
    if isinstance(v, bool):
        return b(v)
    if isinstance(v, int | float):
        return n(float(v))
    if isinstance(v, datetime):
        return t(v)
    return s(str(v))


def attr(field: str, op: Any, *values: object, days: int = 0) -> sp.Condition:
    """An attribute condition."""
    return sp.Condition(
        attribute=sp.AttributeCondition(
            field=field, operator=op, values=[value(v) for v in values], days=days
        )
    )


def prop(name: str, op: Any, *values: object) -> sp.PropertyCondition:
    """A property condition of an event condition."""
    return sp.PropertyCondition(property=name, operator=op, values=[value(v) for v in values])


def event(name: str, **fields: Any) -> sp.Condition:
    """An event condition (fields as in EventCondition)."""
    return sp.Condition(event=sp.EventCondition(name=name, **fields))


def all_(*conditions: sp.Condition) -> sp.Condition:
    return sp.Condition(all=sp.ConditionList(conditions=list(conditions)))


def any_(*conditions: sp.Condition) -> sp.Condition:
    return sp.Condition(any=sp.ConditionList(conditions=list(conditions)))


def not_(condition: sp.Condition) -> sp.Condition:
    negated = sp.Condition()
    getattr(negated, "not").CopyFrom(condition)  # `not` is a Python keyword
    return negated


def subscribed(kind: Any) -> sp.Condition:
    return sp.Condition(subscription=sp.SubscriptionCondition(type=kind))


def member_of(segment_id: str) -> sp.Condition:
    return sp.Condition(member_of=sp.MembershipCondition(segment_id=segment_id))


async def create_segment(
    stub: IdentityServiceAsyncStub, app: TestApp, condition: sp.Condition, name: str = ""
) -> sp.Segment:
    segment = await stub.CreateSegment(
        sp.CreateSegmentRequest(
            segment=sp.Segment(display_name=name or unique_name("seg"), condition=condition)
        ),
        metadata=app.server,
    )
    return segment


async def members(
    stub: IdentityServiceAsyncStub, app: TestApp, segment_id: str, after_user_id: str = ""
) -> list[Any]:
    """The streamed members of a segment (after a user id, if given)."""
    call = stub.ListSegmentMembers(
        sp.ListSegmentMembersRequest(segment_id=segment_id, after_user_id=after_user_id),
        metadata=app.server,
    )
    return [member async for member in call]


async def member_external_ids(
    stub: IdentityServiceAsyncStub, app: TestApp, segment_id: str
) -> set[str]:
    return {m.external_id for m in await members(stub, app, segment_id)}


async def matching(
    stub: IdentityServiceAsyncStub, app: TestApp, condition: sp.Condition
) -> set[str]:
    """External ids of the users a new segment of ``condition`` holds once materialised."""
    segment = await create_segment(stub, app, condition)
    return await member_external_ids(stub, app, segment.segment_id)


async def count(stub: IdentityServiceAsyncStub, app: TestApp, condition: sp.Condition) -> int:
    response = await stub.CountSegment(
        sp.CountSegmentRequest(condition=condition), metadata=app.server
    )
    return int(response.count)


async def upsert(
    stub: IdentityServiceAsyncStub,
    app: TestApp,
    external_id: str,
    attributes: dict[str, object] | None = None,
    **fields: Any,
) -> str:
    """Upsert a user by external id; returns the user id."""
    user = user_pb2.User(**fields)
    for name, v in (attributes or {}).items():
        user.attributes[name].CopyFrom(value(v))
    response = await stub.UpsertUser(
        pb.UpsertUserRequest(ref=ext(external_id), user=user), metadata=app.server
    )
    return str(response.user.user_id)


async def track(
    stub: IdentityServiceAsyncStub,
    app: TestApp,
    external_id: str,
    name: str,
    *,
    at: datetime | None = None,
    properties: dict[str, Any] | None = None,
) -> None:
    """Track one event for a user (by external id)."""
    request = pb.TrackEventsRequest()
    item = request.events.add(user=ext(external_id), name=name)
    if at is not None:
        item.occurred_at.CopyFrom(ts(at))
    if properties:
        item.properties.update(properties)
    response = await stub.TrackEvents(request, metadata=app.server)
    assert not response.results[0].HasField("error"), response.results[0].error


async def stored_events(
    stub: IdentityServiceAsyncStub, app: TestApp, expected: dict[str, int]
) -> None:
    """Wait until identity's consumer stored the given number of events per external id."""

    async def counts() -> dict[str, int]:
        found = {}
        for external_id in expected:
            response = await stub.ListEvents(
                pb.ListEventsRequest(user=ext(external_id), page_size=1000), metadata=app.server
            )
            found[external_id] = len(response.events)
        return found

    await eventually(counts, lambda found: found == expected, what="stored events")


def days_ago(now: datetime, days: float) -> datetime:
    return now - timedelta(days=days)


def names(items: Iterable[Any]) -> set[str]:
    return {item.external_id for item in items}
