"""Evaluating identity's condition language for one customer: branches, event filters, goals.

Journey evaluates ``tidings.identity.v1.Condition`` itself, on the profile identity returns
(BatchGetUsers) at the moment the customer reaches the branch; what the profile does not
carry is asked of identity per customer: events (ListEvents) and segment membership
(GetSegmentMembership). Operators follow the contract's comments: string comparisons of
CONTAINS / STARTS_WITH / ENDS_WITH are case-insensitive, NOT_EQUALS and NOT_IN match customers
without the field, date-relative operators count days in the customer's time zone (the app's
default zone for customers without one). A customer field of type date arrives as a
``string_value`` 'YYYY-MM-DD': a calendar date, compared by day with no zone conversion.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from google.protobuf import json_format
from tidings.identity.v1 import segment_pb2 as spb
from tidings.identity.v1 import subscription_pb2, user_pb2

from services.journey.schedule import zone_of

__all__ = ["ProfileFacts", "calendar_date", "matches_profile", "matches_properties", "value_of"]

Op = spb.Operator


def value_of(value: user_pb2.AttributeValue) -> Any:
    """A plain Python value (None for null or unset; timestamps as aware datetimes)."""
    kind = value.WhichOneof("kind")
    if kind == "timestamp_value":
        return value.timestamp_value.ToDatetime(tzinfo=UTC)
    if kind in (None, "null_value"):
        return None
    return getattr(value, kind)


def _comparable(left: Any, right: Any) -> tuple[Any, Any] | None:
    """Both sides in one comparable type, or None when they cannot be compared."""
    if isinstance(left, bool) or isinstance(right, bool):
        return (left, right) if isinstance(left, bool) and isinstance(right, bool) else None
    if isinstance(left, int | float) and isinstance(right, int | float):
        return float(left), float(right)
    if isinstance(left, datetime) and isinstance(right, datetime):
        return left, right
    if isinstance(left, date) and isinstance(right, datetime):
        return left, right.date()
    if isinstance(left, datetime) and isinstance(right, str):
        try:
            return left, datetime.fromisoformat(right.replace("Z", "+00:00"))
        except ValueError:
            return None
    if isinstance(left, str) and isinstance(right, str):
        return left, right
    return None


def _compare(operator: int, actual: Any, operands: list[Any], now: datetime, days: int) -> bool:
    if operator == Op.OPERATOR_EXISTS:
        return actual is not None
    if operator == Op.OPERATOR_NOT_EXISTS:
        return actual is None
    if operator in (Op.OPERATOR_NOT_EQUALS, Op.OPERATOR_NOT_IN):
        if actual is None:
            return True
        return not any(_equal(actual, o) for o in operands)
    if actual is None:
        return False
    if operator in (Op.OPERATOR_EQUALS, Op.OPERATOR_IN):
        return any(_equal(actual, o) for o in operands)
    if operator in (
        Op.OPERATOR_CONTAINS,
        Op.OPERATOR_NOT_CONTAINS,
        Op.OPERATOR_STARTS_WITH,
        Op.OPERATOR_ENDS_WITH,
    ):
        if not isinstance(actual, str) or not operands or not isinstance(operands[0], str):
            return operator == Op.OPERATOR_NOT_CONTAINS
        text, part = actual.casefold(), operands[0].casefold()
        if operator == Op.OPERATOR_CONTAINS:
            return part in text
        if operator == Op.OPERATOR_NOT_CONTAINS:
            return part not in text
        if operator == Op.OPERATOR_STARTS_WITH:
            return text.startswith(part)
        return text.endswith(part)
    if operator in (Op.OPERATOR_WITHIN_LAST_DAYS, Op.OPERATOR_WITHIN_NEXT_DAYS):
        moment = actual if isinstance(actual, datetime) else None
        if moment is None:
            return False
        window = timedelta(days=days)
        if operator == Op.OPERATOR_WITHIN_LAST_DAYS:
            return now - window <= moment <= now
        return now <= moment <= now + window
    if operator == Op.OPERATOR_BETWEEN:
        if len(operands) != 2:
            return False
        low, high = _comparable(actual, operands[0]), _comparable(actual, operands[1])
        return bool(low and high and low[1] <= low[0] and high[0] <= high[1])
    if not operands:
        return False
    pair = _comparable(actual, operands[0])
    if pair is None:
        return False
    left, right = pair
    if operator in (Op.OPERATOR_GREATER_THAN, Op.OPERATOR_AFTER):
        return bool(left > right)
    if operator == Op.OPERATOR_GREATER_OR_EQUAL:
        return bool(left >= right)
    if operator in (Op.OPERATOR_LESS_THAN, Op.OPERATOR_BEFORE):
        return bool(left < right)
    if operator == Op.OPERATOR_LESS_OR_EQUAL:
        return bool(left <= right)
    return False


def _equal(actual: Any, operand: Any) -> bool:
    pair = _comparable(actual, operand)
    return pair is not None and pair[0] == pair[1]


def matches_properties(
    conditions: Iterable[spb.PropertyCondition], properties: dict[str, Any], now: datetime
) -> bool:
    """Whether event properties (a JSON object) satisfy every property condition."""
    for condition in conditions:
        actual = properties.get(condition.property)
        operands = [value_of(v) for v in condition.values]
        if not _compare(condition.operator, actual, operands, now, 0):
            return False
    return True


def struct_dict(struct: Any) -> dict[str, Any]:
    """A ``google.protobuf.Struct`` as a plain dict."""
    result: dict[str, Any] = json_format.MessageToDict(struct)
    return result


_SUBSCRIPTION_TYPES = {
    value: name.removeprefix("SUBSCRIPTION_TYPE_").lower()
    for name, value in subscription_pb2.SubscriptionType.items()
}


def _field(user: user_pb2.User, name: str) -> Any:
    if name.startswith("attributes."):
        key = name.removeprefix("attributes.")
        return value_of(user.attributes[key]) if key in user.attributes else None
    if name == "birthdate":
        if not user.HasField("birthdate"):
            return None
        b = user.birthdate
        return date(b.year or 2000, b.month, b.day)
    if name in ("create_time", "update_time"):
        stamp = getattr(user, name)
        return stamp.ToDatetime(tzinfo=UTC) if stamp.seconds else None
    text = getattr(user, name, "")
    return text or None


def _anniversary_in(actual: Any, days: int, now: datetime, zone: str) -> bool:
    if not isinstance(actual, date):
        return False
    today = now.astimezone(zone_of(zone)).date()
    target = today + timedelta(days=days)
    month, day = actual.month, actual.day
    if (month, day) == (2, 29) and not _leap(target.year):
        month, day = 2, 28
    return (target.month, target.day) == (month, day)


_RELATIVE = (Op.OPERATOR_WITHIN_LAST_DAYS, Op.OPERATOR_WITHIN_NEXT_DAYS)


def calendar_date(text: str) -> date | None:
    """The date of a date field's value ('YYYY-MM-DD'), or None when ``text`` is not one."""
    if len(text) != 10 or text[4] != "-" or text[7] != "-":
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        return None


def _within_days(operator: int, day: date, today: date, days: int) -> bool:
    """A calendar date within the last / next ``days`` of the customer's local today."""
    if operator == Op.OPERATOR_WITHIN_LAST_DAYS:
        return today - timedelta(days=days) <= day <= today
    return today <= day <= today + timedelta(days=days)


def _leap(year: int) -> bool:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


@dataclass
class ProfileFacts:
    """What a condition may need beyond the profile, asked of identity on demand."""

    events: Callable[[str, datetime | None, datetime | None], Awaitable[list[Any]]]
    is_member: Callable[[str], Awaitable[bool]]
    #: The app's default zone, for customers without one (asked only when a condition needs it).
    default_zone: Callable[[], Awaitable[str]] | None = None

    async def zone(self, user: user_pb2.User) -> str:
        """The customer's zone: their own, else the app's default, else ``""`` (UTC)."""
        if user.timezone or self.default_zone is None:
            return str(user.timezone)
        return await self.default_zone()


async def matches_profile(
    condition: spb.Condition, user: user_pb2.User, now: datetime, facts: ProfileFacts
) -> bool:
    """Whether one customer satisfies a condition now."""
    kind = condition.WhichOneof("kind")
    if kind == "all":
        for child in condition.all.conditions:
            if not await matches_profile(child, user, now, facts):
                return False
        return True
    if kind == "any":
        for child in condition.any.conditions:
            if await matches_profile(child, user, now, facts):
                return True
        return False
    if kind == "not":
        return not await matches_profile(condition.__getattribute__("not"), user, now, facts)
    if kind == "attribute":
        attr = condition.attribute
        actual = _field(user, attr.field)
        if attr.operator == Op.OPERATOR_ANNIVERSARY_IN_DAYS:
            zone = await facts.zone(user)
            if isinstance(actual, datetime):
                actual = actual.astimezone(zone_of(zone)).date()
            elif isinstance(actual, str):
                actual = calendar_date(actual)
            return _anniversary_in(actual, attr.days, now, zone)
        if isinstance(actual, str) and attr.operator in _RELATIVE:
            day = calendar_date(actual)
            today = now.astimezone(zone_of(await facts.zone(user))).date()
            return day is not None and _within_days(attr.operator, day, today, attr.days)
        if isinstance(actual, date) and not isinstance(actual, datetime):
            actual = datetime(actual.year, actual.month, actual.day, tzinfo=UTC)
        operands = [value_of(v) for v in attr.values]
        if isinstance(actual, str) and any(isinstance(o, datetime) for o in operands):
            # A date field against a point in time: compared by the time's (UTC) date, as
            # identity's segments do.
            actual = calendar_date(actual) or actual
        return _compare(attr.operator, actual, operands, now, attr.days)
    if kind == "subscription":
        wanted = _SUBSCRIPTION_TYPES.get(condition.subscription.type, "")
        return any(
            _SUBSCRIPTION_TYPES.get(s.type) == wanted and s.enabled and _opted_in(s)
            for s in user.subscriptions
        )
    if kind == "member_of":
        return await facts.is_member(condition.member_of.segment_id)
    if kind == "event":
        return await _event_condition(condition.event, now, facts)
    return False


def _opted_in(subscription: Any) -> bool:
    opt_in = getattr(subscription, "opt_in", None)
    # OPT_IN_SUBSCRIBED (or an unset opt-in field on older messages) counts as reachable.
    return opt_in is None or int(opt_in) in (0, 1)


async def _event_condition(
    condition: spb.EventCondition, now: datetime, facts: ProfileFacts
) -> bool:
    start: datetime | None = None
    end: datetime | None = None
    window = condition.WhichOneof("window")
    if window == "within_last":
        d = condition.within_last
        start = now - timedelta(seconds=d.seconds, microseconds=d.nanos // 1000)
    elif window == "between":
        if condition.between.HasField("start_time"):
            start = condition.between.start_time.ToDatetime(tzinfo=UTC)
        if condition.between.HasField("end_time"):
            end = condition.between.end_time.ToDatetime(tzinfo=UTC)
    events = [
        e
        for e in await facts.events(condition.name, start, end)
        if matches_properties(condition.where, struct_dict(e.properties), now)
    ]
    measure = condition.WhichOneof("measure")
    if measure in ("first_time", "last_time"):
        if not events:
            return False
        times = [e.occurred_at.ToDatetime(tzinfo=UTC) for e in events]
        moment = min(times) if measure == "first_time" else max(times)
        occurrence = getattr(condition, measure)
        operand = occurrence.time.ToDatetime(tzinfo=UTC) if occurrence.HasField("time") else now
        return _compare(occurrence.operator, moment, [operand], now, occurrence.days)
    count = len(events)
    wanted = condition.count if measure == "count" else 1
    operator = condition.count_operator
    if operator == spb.COUNT_OPERATOR_AT_MOST:
        return count <= wanted
    if operator == spb.COUNT_OPERATOR_EXACTLY:
        return count == wanted
    return count >= wanted


def user_uuid(user: user_pb2.User) -> uuid.UUID:
    """The user's id as a UUID."""
    return uuid.UUID(user.user_id)
