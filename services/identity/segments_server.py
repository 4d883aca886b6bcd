"""gRPC surface of segments (CRUD, Count, ListSegmentMembers, Explain, GetSegmentMembership).

Proto in, domain call (:mod:`services.identity.segments`, :mod:`services.identity.segment_explain`),
proto out. The condition tree is translated to :mod:`services.identity.segment_conditions`
keeping whatever the request left unset or malformed, so validation can name the field.
Every method needs a server key and works inside the caller's app.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import grpc.aio
from google.protobuf import empty_pb2
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from tidings.identity.v1 import segment_pb2, subscription_pb2, user_pb2

from services.identity import access, refs, segment_explain, segments
from services.identity.segment_conditions import (
    AllOf,
    AnyOf,
    AttributeCondition,
    BadValue,
    Condition,
    CountOperator,
    EventCondition,
    MembershipCondition,
    NoCondition,
    NotOf,
    Occurrence,
    Operator,
    PropertyCondition,
    SubscriptionCondition,
    Value,
    from_json,
)
from services.identity.segment_explain import ConditionResult
from services.identity.segments import SegmentDraft
from services.identity.segments_store import SegmentRecord
from services.runtime.app import ServiceContext
from services.runtime.errors import FieldViolations

__all__ = ["SegmentsRpcs", "condition_from_proto", "condition_to_proto", "segment_to_proto"]

_Context = grpc.aio.ServicerContext[Any, Any]

_KIND_FROM_PROTO = {
    segment_pb2.Segment.KIND_DYNAMIC: "dynamic",
    segment_pb2.Segment.KIND_LIST: "list",
}
_KIND_TO_PROTO = {value: key for key, value in _KIND_FROM_PROTO.items()}
_OPERATOR_PREFIX = "OPERATOR_"
_COUNT_PREFIX = "COUNT_OPERATOR_"
_SUBSCRIPTION_PREFIX = "SUBSCRIPTION_TYPE_"
_NO_VALUE = "set one of string_value, number_value, bool_value or timestamp_value"


# -- proto → domain ------------------------------------------------------------------------------


def _time(stamp: Timestamp) -> datetime | BadValue:
    try:
        return stamp.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        return BadValue("not a valid point in time")


def _value(value: user_pb2.AttributeValue) -> Value:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        return value.number_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "timestamp_value":
        return _time(value.timestamp_value)
    return BadValue(_NO_VALUE)


def _operator(value: int) -> Operator | None:
    try:
        name = segment_pb2.Operator.Name(value)  # type: ignore[arg-type]
    except ValueError:
        return None
    if name == "OPERATOR_UNSPECIFIED":
        return None
    return Operator[name.removeprefix(_OPERATOR_PREFIX)]


def _count_operator(value: int) -> CountOperator | None:
    try:
        name = segment_pb2.CountOperator.Name(value)  # type: ignore[arg-type]
    except ValueError:
        return None
    if name == "COUNT_OPERATOR_UNSPECIFIED":
        return None
    return CountOperator[name.removeprefix(_COUNT_PREFIX)]


def _subscription_type(value: int) -> str:
    try:
        name = subscription_pb2.SubscriptionType.Name(value)  # type: ignore[arg-type]
    except ValueError:
        return ""
    return "" if name.endswith("UNSPECIFIED") else name.removeprefix(_SUBSCRIPTION_PREFIX).lower()


def _occurrence(message: segment_pb2.EventCondition.Occurrence) -> Occurrence:
    return Occurrence(
        operator=_operator(message.operator),
        time=_time(message.time) if message.HasField("time") else None,
        days=message.days,
    )


def _duration(message: Duration) -> Any:
    try:
        return message.ToTimedelta()
    except (ValueError, OverflowError):
        return BadValue("not a valid duration")


def _event(message: segment_pb2.EventCondition) -> EventCondition:
    measure = message.WhichOneof("measure")
    window = message.WhichOneof("window")
    between = None
    if window == "between":
        start = message.between
        between = (
            _time(start.start_time) if start.HasField("start_time") else None,
            _time(start.end_time) if start.HasField("end_time") else None,
        )
    return EventCondition(
        name=message.name,
        where=tuple(
            PropertyCondition(
                property=item.property,
                operator=_operator(item.operator),
                values=tuple(_value(v) for v in item.values),
            )
            for item in message.where
        ),
        count=message.count if measure == "count" else None,
        count_operator=_count_operator(message.count_operator),
        first_time=_occurrence(message.first_time) if measure == "first_time" else None,
        last_time=_occurrence(message.last_time) if measure == "last_time" else None,
        within_last=_duration(message.within_last) if window == "within_last" else None,
        between=between,
    )


def condition_from_proto(message: segment_pb2.Condition) -> Condition:
    """The domain tree of a ``Condition`` (unset parts kept for validation to name)."""
    kind = message.WhichOneof("kind")
    if kind == "all":
        return AllOf(tuple(condition_from_proto(c) for c in message.all.conditions))
    if kind == "any":
        return AnyOf(tuple(condition_from_proto(c) for c in message.any.conditions))
    if kind == "not":
        return NotOf(condition_from_proto(getattr(message, "not")))
    if kind == "attribute":
        a = message.attribute
        return AttributeCondition(
            field=a.field,
            operator=_operator(a.operator),
            values=tuple(_value(v) for v in a.values),
            days=a.days,
        )
    if kind == "event":
        return _event(message.event)
    if kind == "subscription":
        return SubscriptionCondition(type=_subscription_type(message.subscription.type))
    if kind == "member_of":
        return MembershipCondition(segment_id=message.member_of.segment_id)
    return NoCondition()


def _draft(message: segment_pb2.Segment) -> SegmentDraft:
    return SegmentDraft(
        segment_id=message.segment_id,
        display_name=message.display_name,
        description=message.description,
        kind=_KIND_FROM_PROTO.get(message.kind, ""),
        condition=condition_from_proto(message.condition)
        if message.HasField("condition")
        else None,
    )


# -- domain → proto ------------------------------------------------------------------------------


def _timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _value_proto(value: Value) -> user_pb2.AttributeValue:
    if isinstance(value, bool):
        return user_pb2.AttributeValue(bool_value=value)
    if isinstance(value, float | int):
        return user_pb2.AttributeValue(number_value=value)
    if isinstance(value, datetime):
        return user_pb2.AttributeValue(timestamp_value=_timestamp(value))
    assert isinstance(value, str)
    return user_pb2.AttributeValue(string_value=value)


def _operator_proto(op: Operator | None) -> Any:
    return segment_pb2.Operator.Value(f"{_OPERATOR_PREFIX}{op.name}") if op else 0


def _occurrence_proto(occurrence: Occurrence) -> segment_pb2.EventCondition.Occurrence:
    message = segment_pb2.EventCondition.Occurrence(
        operator=_operator_proto(occurrence.operator), days=occurrence.days
    )
    if isinstance(occurrence.time, datetime):
        message.time.CopyFrom(_timestamp(occurrence.time))
    return message


def _event_proto(c: EventCondition) -> segment_pb2.EventCondition:
    message = segment_pb2.EventCondition(name=c.name)
    for where in c.where:
        message.where.add(
            property=where.property,
            operator=_operator_proto(where.operator),
            values=[_value_proto(v) for v in where.values],
        )
    if c.first_time is not None:
        message.first_time.CopyFrom(_occurrence_proto(c.first_time))
    elif c.last_time is not None:
        message.last_time.CopyFrom(_occurrence_proto(c.last_time))
    elif c.count is not None:
        message.count = c.count
    if c.count_operator is not None:
        message.count_operator = segment_pb2.CountOperator.Value(
            f"{_COUNT_PREFIX}{c.count_operator.name}"
        )
    if c.within_last is not None and not isinstance(c.within_last, BadValue):
        message.within_last.FromTimedelta(c.within_last)
    if c.between is not None:
        start, end = c.between
        message.between.SetInParent()
        if isinstance(start, datetime):
            message.between.start_time.CopyFrom(_timestamp(start))
        if isinstance(end, datetime):
            message.between.end_time.CopyFrom(_timestamp(end))
    return message


def condition_to_proto(condition: Condition) -> segment_pb2.Condition:
    """The ``Condition`` message of a stored tree."""
    message = segment_pb2.Condition()
    if isinstance(condition, AllOf):
        message.all.conditions.extend(condition_to_proto(c) for c in condition.conditions)
        message.all.SetInParent()
    elif isinstance(condition, AnyOf):
        message.any.conditions.extend(condition_to_proto(c) for c in condition.conditions)
        message.any.SetInParent()
    elif isinstance(condition, NotOf):
        getattr(message, "not").CopyFrom(condition_to_proto(condition.condition))
    elif isinstance(condition, AttributeCondition):
        message.attribute.field = condition.field
        message.attribute.operator = _operator_proto(condition.operator)
        message.attribute.values.extend(_value_proto(v) for v in condition.values)
        message.attribute.days = condition.days
    elif isinstance(condition, EventCondition):
        message.event.CopyFrom(_event_proto(condition))
    elif isinstance(condition, SubscriptionCondition):
        message.subscription.type = subscription_pb2.SubscriptionType.Value(
            f"{_SUBSCRIPTION_PREFIX}{condition.type.upper()}"
        )
    elif isinstance(condition, MembershipCondition):
        message.member_of.segment_id = condition.segment_id
    return message


def segment_to_proto(record: SegmentRecord) -> segment_pb2.Segment:
    """The ``Segment`` message of a stored segment."""
    message = segment_pb2.Segment(
        segment_id=str(record.segment_id),
        display_name=record.display_name,
        description=record.description,
        kind=_KIND_TO_PROTO[record.kind],
        member_count=record.member_count,
        import_id=record.import_id or "",
        create_time=_timestamp(record.create_time),
        update_time=_timestamp(record.update_time),
    )
    if record.condition is not None:
        message.condition.CopyFrom(condition_to_proto(from_json(record.condition)))
    return message


def _result_proto(result: ConditionResult) -> segment_pb2.ConditionResult:
    return segment_pb2.ConditionResult(
        path=result.path,
        held=result.held,
        detail=result.detail,
        children=[_result_proto(child) for child in result.children],
    )


class SegmentsRpcs:
    """Mixin of :class:`~services.identity.server.IdentityServicer` for segments."""

    _ctx: ServiceContext

    async def CreateSegment(
        self, request: segment_pb2.CreateSegmentRequest, context: _Context
    ) -> segment_pb2.Segment:
        """Create a DYNAMIC segment; answers once its members are materialised."""
        caller = access.server_app()
        record = await segments.create_segment(
            self._ctx.pool, caller.app_id, _draft(request.segment), at=self._ctx.clock()
        )
        return segment_to_proto(record)

    async def GetSegment(
        self, request: segment_pb2.GetSegmentRequest, context: _Context
    ) -> segment_pb2.Segment:
        """One segment of the caller's app."""
        caller = access.server_app()
        segment_id = segments.parse_segment_id(request.segment_id)
        async with self._ctx.pool.acquire() as conn:
            record = await segments.get_segment(conn, caller.app_id, segment_id)
        return segment_to_proto(record)

    async def ListSegments(
        self, request: segment_pb2.ListSegmentsRequest, context: _Context
    ) -> segment_pb2.ListSegmentsResponse:
        """A page of the app's segments, by name."""
        caller = access.server_app()
        async with self._ctx.pool.acquire() as conn:
            page, token = await segments.list_segments(
                conn, caller.app_id, size=request.page_size, token=request.page_token
            )
        return segment_pb2.ListSegmentsResponse(
            segments=[segment_to_proto(record) for record in page], next_page_token=token
        )

    async def UpdateSegment(
        self, request: segment_pb2.UpdateSegmentRequest, context: _Context
    ) -> segment_pb2.Segment:
        """Rename, describe or change the condition of a segment (then re-materialised)."""
        caller = access.server_app()
        record = await segments.update_segment(
            self._ctx.pool,
            caller.app_id,
            _draft(request.segment),
            list(request.update_mask.paths),
            at=self._ctx.clock(),
        )
        return segment_to_proto(record)

    async def DeleteSegment(
        self, request: segment_pb2.DeleteSegmentRequest, context: _Context
    ) -> empty_pb2.Empty:
        """Delete a segment no other segment refers to."""
        caller = access.server_app()
        segment_id = segments.parse_segment_id(request.segment_id)
        await segments.delete_segment(self._ctx.pool, caller.app_id, segment_id)
        return empty_pb2.Empty()

    async def CountSegment(
        self, request: segment_pb2.CountSegmentRequest, context: _Context
    ) -> segment_pb2.CountSegmentResponse:
        """Users matching a saved segment or an unsaved condition, now."""
        caller = access.server_app()
        target = request.WhichOneof("target")
        if target is None:
            violations = FieldViolations()
            violations.add("segment_id", "set segment_id or condition", reason="REQUIRED")
            violations.raise_if_any()
        count = await segments.count(
            self._ctx.pool,
            caller.app_id,
            segment_id=(
                segments.parse_segment_id(request.segment_id) if target == "segment_id" else None
            ),
            condition=condition_from_proto(request.condition) if target == "condition" else None,
            at=self._ctx.clock(),
        )
        return segment_pb2.CountSegmentResponse(count=count)

    async def ListSegmentMembers(
        self, request: segment_pb2.ListSegmentMembersRequest, context: _Context
    ) -> AsyncIterator[segment_pb2.SegmentMember]:
        """Every member (after ``after_user_id`` if set), from one snapshot taken when the
        stream starts, in user id order."""
        caller = access.server_app()
        violations = FieldViolations()
        segment_id = refs.parse_uuid(request.segment_id, "segment_id", violations)
        after: uuid.UUID | None = None
        if request.after_user_id:
            after = refs.parse_uuid(request.after_user_id, "after_user_id", violations)
        violations.raise_if_any()
        assert segment_id is not None
        async for member in segments.stream_members(
            self._ctx.pool, caller.app_id, segment_id, after_user_id=after
        ):
            yield segment_pb2.SegmentMember(
                user_id=str(member.user_id),
                external_id=member.external_id or "",
                enter_time=_timestamp(member.enter_time),
            )

    async def ExplainSegmentMembership(
        self, request: segment_pb2.ExplainSegmentMembershipRequest, context: _Context
    ) -> segment_pb2.ExplainSegmentMembershipResponse:
        """The segment's condition evaluated for one user now, node by node."""
        caller = access.server_app()
        violations = FieldViolations()
        if not request.segment_id:
            violations.add("segment_id", "required", reason="REQUIRED")
        user = refs.parse_ref(request.user, "user", violations)
        violations.raise_if_any()
        assert user is not None
        explanation = await segment_explain.explain(
            self._ctx.pool,
            caller.app_id,
            segments.parse_segment_id(request.segment_id),
            user,
            at=self._ctx.clock(),
        )
        response = segment_pb2.ExplainSegmentMembershipResponse(member=explanation.member)
        if explanation.result is not None:
            response.result.CopyFrom(_result_proto(explanation.result))
        return response

    async def GetSegmentMembership(
        self, request: segment_pb2.GetSegmentMembershipRequest, context: _Context
    ) -> segment_pb2.GetSegmentMembershipResponse:
        """Whether a user is (and was, at a time) a member, with every period."""
        caller = access.server_app()
        violations = FieldViolations()
        if not request.segment_id:
            violations.add("segment_id", "required", reason="REQUIRED")
        user = refs.parse_ref(request.user, "user", violations)
        at_time = _time(request.at_time) if request.HasField("at_time") else None
        if isinstance(at_time, BadValue):
            violations.add("at_time", at_time.problem, reason="INVALID_VALUE")
        violations.raise_if_any()
        assert user is not None
        assert not isinstance(at_time, BadValue)
        answer = await segments.membership(
            self._ctx.pool,
            caller.app_id,
            segments.parse_segment_id(request.segment_id),
            user,
            at_time=at_time,
        )
        response = segment_pb2.GetSegmentMembershipResponse(
            member=answer.member, member_at_time=answer.member_at_time
        )
        for start, end in answer.periods:
            period = response.history.add(enter_time=_timestamp(start))
            if end is not None:
                period.exit_time.CopyFrom(_timestamp(end))
        return response
