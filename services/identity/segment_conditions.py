"""The condition tree of a segment: plain data, its JSON form, and what can be read off it.

A condition is a tree of :class:`AllOf` / :class:`AnyOf` / :class:`NotOf` over leaves: an
attribute of the profile, the user's events, subscriptions, or membership in another segment.
The gRPC layer builds it from the protobuf ``Condition`` (keeping what is unset or malformed as
:class:`NoCondition` / :class:`BadValue`, so validation can name the field);
:mod:`services.identity.segments` validates it and resolves the type of every attribute;
:mod:`services.identity.segment_sql` compiles it to SQL. Stored in ``segments.condition`` as the
JSON of :func:`to_json`.

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

__all__ = [
    "AllOf",
    "AnyOf",
    "AttributeCondition",
    "BadValue",
    "Condition",
    "CountOperator",
    "EventCondition",
    "MembershipCondition",
    "NoCondition",
    "NotOf",
    "Occurrence",
    "Operator",
    "PropertyCondition",
    "SubscriptionCondition",
    "Value",
    "from_json",
    "is_time_relative",
    "leaves",
    "referenced_segments",
    "to_json",
]


class Operator(StrEnum):
    """Comparison operators of attribute and property conditions (proto ``Operator``)."""

    EQUALS = "equals"
    NOT_EQUALS = "not_equals"
    IN = "in"
    NOT_IN = "not_in"
    CONTAINS = "contains"
    NOT_CONTAINS = "not_contains"
    STARTS_WITH = "starts_with"
    ENDS_WITH = "ends_with"
    EXISTS = "exists"
    NOT_EXISTS = "not_exists"
    GREATER_THAN = "greater_than"
    GREATER_OR_EQUAL = "greater_or_equal"
    LESS_THAN = "less_than"
    LESS_OR_EQUAL = "less_or_equal"
    BETWEEN = "between"
    BEFORE = "before"
    AFTER = "after"
    WITHIN_LAST_DAYS = "within_last_days"
    WITHIN_NEXT_DAYS = "within_next_days"
    ANNIVERSARY_IN_DAYS = "anniversary_in_days"


class CountOperator(StrEnum):
    """How an event count compares (proto ``CountOperator``)."""

    AT_LEAST = "at_least"
    AT_MOST = "at_most"
    EXACTLY = "exactly"


@dataclass(frozen=True, slots=True)
class BadValue:
    """An operand the request left unset or malformed; validation reports it.

    Attributes:
        problem: What is wrong, for the field violation.
    """

    problem: str


#: An operand: string, number, bool or point in time (or a :class:`BadValue`).
Value = str | float | bool | datetime | BadValue


@dataclass(frozen=True, slots=True)
class NoCondition:
    """A ``Condition`` message with none of its kinds set (refused by validation)."""


@dataclass(frozen=True, slots=True)
class AllOf:
    """Every condition holds."""

    conditions: tuple[Condition, ...]


@dataclass(frozen=True, slots=True)
class AnyOf:
    """At least one condition holds."""

    conditions: tuple[Condition, ...]


@dataclass(frozen=True, slots=True)
class NotOf:
    """The condition does not hold."""

    condition: Condition


@dataclass(frozen=True, slots=True)
class AttributeCondition:
    """A standard field or custom attribute compared with operands.

    Attributes:
        field: ``first_name``, ``birthdate``, ``create_time``, ``attributes.plan``...
        operator: How to compare; None when the request left it unset.
        values: The operands.
        days: The days of WITHIN_LAST_DAYS / WITHIN_NEXT_DAYS / ANNIVERSARY_IN_DAYS.
        type: The field's type once resolved: ``string``, ``number``, ``bool``, ``timestamp``
            or ``birthdate``; empty before validation.
    """

    field: str
    operator: Operator | None
    values: tuple[Value, ...] = ()
    days: int = 0
    type: str = ""


@dataclass(frozen=True, slots=True)
class PropertyCondition:
    """A top-level property of an event compared with operands (typed by the operands)."""

    property: str
    operator: Operator | None
    values: tuple[Value, ...] = ()


@dataclass(frozen=True, slots=True)
class Occurrence:
    """When a user first or last did an event: BEFORE / AFTER ``time``, or WITHIN_LAST_DAYS."""

    operator: Operator | None
    time: datetime | BadValue | None = None
    days: int = 0


@dataclass(frozen=True, slots=True)
class EventCondition:
    """A condition on the user's events named ``name`` matching every ``where``.

    Exactly one measure applies: a count (``count`` and ``count_operator``; both None means
    "at least once"), ``first_time`` or ``last_time``. The window (``within_last`` or
    ``between``) restricts the events counted.

    Attributes:
        name: The event name.
        where: Property conditions every counted event matches.
        count: The count to compare with; None when the measure is not a count or unset.
        count_operator: How the count compares; None when unset (AT_LEAST).
        first_time: When the user first did it.
        last_time: When the user last did it.
        within_last: Only events in this last span of time.
        between: Only events in ``[start, end)``; either end may be open (None).
    """

    name: str
    where: tuple[PropertyCondition, ...] = ()
    count: int | None = None
    count_operator: CountOperator | None = None
    first_time: Occurrence | None = None
    last_time: Occurrence | None = None
    within_last: timedelta | BadValue | None = None
    between: tuple[datetime | BadValue | None, datetime | BadValue | None] | None = None


@dataclass(frozen=True, slots=True)
class SubscriptionCondition:
    """The user holds an enabled, opted-in subscription of ``type`` (``email``...; empty if
    unset)."""

    type: str


@dataclass(frozen=True, slots=True)
class MembershipCondition:
    """The user is a member of another segment (as materialised)."""

    segment_id: str


#: A node of the tree.
Condition = (
    NoCondition
    | AllOf
    | AnyOf
    | NotOf
    | AttributeCondition
    | EventCondition
    | SubscriptionCondition
    | MembershipCondition
)


def leaves(condition: Condition) -> Iterator[Condition]:
    """Every leaf of the tree, depth first."""
    if isinstance(condition, AllOf | AnyOf):
        for child in condition.conditions:
            yield from leaves(child)
    elif isinstance(condition, NotOf):
        yield from leaves(condition.condition)
    else:
        yield condition


def referenced_segments(condition: Condition) -> list[str]:
    """The ids of the segments the tree is a member_of condition on, each once, in order."""
    found = [leaf.segment_id for leaf in leaves(condition) if isinstance(leaf, MembershipCondition)]
    return list(dict.fromkeys(found))


_RELATIVE_OPERATORS = frozenset(
    {Operator.WITHIN_LAST_DAYS, Operator.WITHIN_NEXT_DAYS, Operator.ANNIVERSARY_IN_DAYS}
)


def is_time_relative(condition: Condition) -> bool:
    """Whether membership can change by the passing of time alone.

    True for attribute conditions relative to today (within the last / next days, anniversaries)
    and for event conditions over a window ending now (``within_last``) or a first / last time
    within the last days. Fixed dates are not relative: ``before 2025-01-01`` never changes.
    """
    for leaf in leaves(condition):
        if isinstance(leaf, AttributeCondition) and leaf.operator in _RELATIVE_OPERATORS:
            return True
        if isinstance(leaf, EventCondition):
            if leaf.within_last is not None:
                return True
            for occurrence in (leaf.first_time, leaf.last_time):
                if occurrence is not None and occurrence.operator is Operator.WITHIN_LAST_DAYS:
                    return True
    return False


# -- JSON (segments.condition) -------------------------------------------------------------------


def _value_json(value: Value) -> dict[str, Any]:
    if isinstance(value, BadValue):
        raise ValueError(f"cannot store an invalid value: {value.problem}")
    if isinstance(value, bool):
        return {"b": value}
    if isinstance(value, float | int):
        return {"n": float(value)}
    if isinstance(value, datetime):
        return {"t": value.astimezone(UTC).isoformat()}
    return {"s": value}


def _value_from_json(data: dict[str, Any]) -> Value:
    if "b" in data:
        return bool(data["b"])
    if "n" in data:
        return float(data["n"])
    if "t" in data:
        return datetime.fromisoformat(data["t"])
    return str(data["s"])


def _time_json(moment: datetime | BadValue | None) -> str | None:
    if isinstance(moment, BadValue):
        raise ValueError(f"cannot store an invalid time: {moment.problem}")
    return None if moment is None else moment.astimezone(UTC).isoformat()


def _time_from_json(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def _occurrence_json(occurrence: Occurrence | None) -> dict[str, Any] | None:
    if occurrence is None:
        return None
    return {
        "operator": occurrence.operator,
        "time": _time_json(occurrence.time),
        "days": occurrence.days,
    }


def _occurrence_from_json(data: dict[str, Any] | None) -> Occurrence | None:
    if data is None:
        return None
    operator = data.get("operator")
    return Occurrence(
        operator=Operator(operator) if operator else None,
        time=_time_from_json(data.get("time")),
        days=int(data.get("days", 0)),
    )


def to_json(condition: Condition) -> dict[str, Any]:
    """The stored form of a validated tree.

    Raises:
        ValueError: The tree still holds an unset condition or an invalid value (validate
            first).
    """
    if isinstance(condition, AllOf):
        return {"all": [to_json(c) for c in condition.conditions]}
    if isinstance(condition, AnyOf):
        return {"any": [to_json(c) for c in condition.conditions]}
    if isinstance(condition, NotOf):
        return {"not": to_json(condition.condition)}
    if isinstance(condition, AttributeCondition):
        return {
            "attribute": {
                "field": condition.field,
                "type": condition.type,
                "operator": condition.operator,
                "values": [_value_json(v) for v in condition.values],
                "days": condition.days,
            }
        }
    if isinstance(condition, EventCondition):
        within = condition.within_last
        if isinstance(within, BadValue):
            raise ValueError(f"cannot store an invalid duration: {within.problem}")
        return {
            "event": {
                "name": condition.name,
                "where": [
                    {
                        "property": p.property,
                        "operator": p.operator,
                        "values": [_value_json(v) for v in p.values],
                    }
                    for p in condition.where
                ],
                "count": condition.count,
                "count_operator": condition.count_operator,
                "first_time": _occurrence_json(condition.first_time),
                "last_time": _occurrence_json(condition.last_time),
                "within_last_s": None if within is None else within.total_seconds(),
                "between": (
                    None
                    if condition.between is None
                    else [_time_json(condition.between[0]), _time_json(condition.between[1])]
                ),
            }
        }
    if isinstance(condition, SubscriptionCondition):
        return {"subscription": {"type": condition.type}}
    if isinstance(condition, MembershipCondition):
        return {"member_of": {"segment_id": condition.segment_id}}
    raise ValueError("cannot store an unset condition")


def from_json(data: dict[str, Any]) -> Condition:
    """The tree stored by :func:`to_json`."""
    if "all" in data:
        return AllOf(tuple(from_json(c) for c in data["all"]))
    if "any" in data:
        return AnyOf(tuple(from_json(c) for c in data["any"]))
    if "not" in data:
        return NotOf(from_json(data["not"]))
    if "attribute" in data:
        a = data["attribute"]
        return AttributeCondition(
            field=a["field"],
            operator=Operator(a["operator"]) if a.get("operator") else None,
            values=tuple(_value_from_json(v) for v in a.get("values", ())),
            days=int(a.get("days", 0)),
            type=a.get("type", ""),
        )
    if "event" in data:
        e = data["event"]
        between = e.get("between")
        within = e.get("within_last_s")
        return EventCondition(
            name=e["name"],
            where=tuple(
                PropertyCondition(
                    property=p["property"],
                    operator=Operator(p["operator"]) if p.get("operator") else None,
                    values=tuple(_value_from_json(v) for v in p.get("values", ())),
                )
                for p in e.get("where", ())
            ),
            count=e.get("count"),
            count_operator=CountOperator(e["count_operator"]) if e.get("count_operator") else None,
            first_time=_occurrence_from_json(e.get("first_time")),
            last_time=_occurrence_from_json(e.get("last_time")),
            within_last=None if within is None else timedelta(seconds=within),
            between=(
                None
                if between is None
                else (_time_from_json(between[0]), _time_from_json(between[1]))
            ),
        )
    if "subscription" in data:
        return SubscriptionCondition(type=data["subscription"]["type"])
    if "member_of" in data:
        return MembershipCondition(segment_id=data["member_of"]["segment_id"])
    raise ValueError(f"not a stored condition: {sorted(data)}")
