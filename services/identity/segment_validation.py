"""Validation of a segment's condition tree, with the path of every bad field.

:func:`check_condition` walks a tree built from a request, records a violation for each
problem under its field path (``segment.condition.all.conditions[1].event.count``), and returns
the tree with the type of every attribute resolved (standard fields by name, custom attributes
from the app's customer fields). The lookups it needs (customer fields, the segments a
``member_of`` names) are made by the caller and handed in, so this module stays pure.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta

from services.identity.fields import ATTRIBUTE_NAME_PATTERN, FieldType, parse_date
from services.identity.segment_conditions import (
    AllOf,
    AnyOf,
    AttributeCondition,
    BadValue,
    Condition,
    EventCondition,
    MembershipCondition,
    NoCondition,
    NotOf,
    Occurrence,
    Operator,
    PropertyCondition,
    SubscriptionCondition,
    Value,
    leaves,
)
from services.identity.segment_sql import CUSTOM_PREFIX, STANDARD_FIELDS
from services.identity.validation import text_problem
from services.runtime.errors import FieldViolations

__all__ = [
    "MAX_CONDITIONS",
    "MAX_COUNT",
    "MAX_DAYS",
    "MAX_DEPTH",
    "MAX_VALUES",
    "MAX_WHERE",
    "PII_OPERATORS",
    "Lookups",
    "check_condition",
    "custom_attribute_names",
    "member_of_ids",
    "pii_operator_problem",
]

#: Most leaf conditions in one tree.
MAX_CONDITIONS = 100
#: Deepest nesting of all / any / not.
MAX_DEPTH = 10
#: Most operands of IN / NOT_IN.
MAX_VALUES = 1_000
#: Most property conditions on one event condition.
MAX_WHERE = 20
#: Largest event count compared with.
MAX_COUNT = 1_000_000
#: Longest span of days (100 years).
MAX_DAYS = 36_500
#: Longest operand string and property name.
MAX_STRING = 1_000
MAX_PROPERTY_NAME = 128
MAX_EVENT_NAME = 128

# The names TrackEvents accepts (services/identity/events.py): others can never match.
_EVENT_NAME = re.compile(r"[A-Za-z0-9_.\-]+")

_COMPARISONS = frozenset(
    {
        Operator.GREATER_THAN,
        Operator.GREATER_OR_EQUAL,
        Operator.LESS_THAN,
        Operator.LESS_OR_EQUAL,
        Operator.BETWEEN,
    }
)
_EQUALITY = frozenset({Operator.EQUALS, Operator.NOT_EQUALS, Operator.IN, Operator.NOT_IN})
_PRESENCE = frozenset({Operator.EXISTS, Operator.NOT_EXISTS})
_STRINGS = frozenset(
    {Operator.CONTAINS, Operator.NOT_CONTAINS, Operator.STARTS_WITH, Operator.ENDS_WITH}
)
_DATES = frozenset({Operator.BEFORE, Operator.AFTER})
_RELATIVE = frozenset({Operator.WITHIN_LAST_DAYS, Operator.WITHIN_NEXT_DAYS})

#: Operators each field type takes.
OPERATORS_BY_TYPE: dict[str, frozenset[Operator]] = {
    "string": _EQUALITY | _PRESENCE | _STRINGS | _COMPARISONS,
    "number": _EQUALITY | _PRESENCE | _COMPARISONS,
    "bool": frozenset({Operator.EQUALS, Operator.NOT_EQUALS}) | _PRESENCE,
    "timestamp": frozenset({Operator.EQUALS, Operator.NOT_EQUALS})
    | _PRESENCE
    | _COMPARISONS
    | _DATES
    | _RELATIVE
    | {Operator.ANNIVERSARY_IN_DAYS},
    "birthdate": frozenset({Operator.EQUALS, Operator.NOT_EQUALS})
    | _PRESENCE
    | _COMPARISONS
    | _DATES
    | {Operator.ANNIVERSARY_IN_DAYS},
    # A calendar date (a customer field of type date): compared by day, relative operators
    # against the user's local today.
    "date": frozenset({Operator.EQUALS, Operator.NOT_EQUALS})
    | _PRESENCE
    | _COMPARISONS
    | _DATES
    | _RELATIVE
    | {Operator.ANNIVERSARY_IN_DAYS},
}

#: Field types whose operands are calendar dates: a 'YYYY-MM-DD' string_value or a
#: timestamp_value (its UTC date).
_CALENDAR = frozenset({"birthdate", "date"})

#: Operators of property conditions by the operands' type (properties are untyped JSON).
_PROPERTY_OPERATORS: dict[str, frozenset[Operator]] = {
    "string": _EQUALITY | _STRINGS | _COMPARISONS,
    "number": _EQUALITY | _COMPARISONS,
    "bool": _EQUALITY,
    "timestamp": _EQUALITY | _COMPARISONS | _DATES,
}

_VALUE_FIELD = {
    "string": "string_value",
    "number": "number_value",
    "bool": "bool_value",
    "timestamp": "timestamp_value",
    "birthdate": "timestamp_value (or a string_value 'YYYY-MM-DD')",
    "date": "string_value 'YYYY-MM-DD' (or a timestamp_value)",
}


@dataclass(frozen=True, slots=True)
class Lookups:
    """What validation needs from the database.

    Attributes:
        field_types: Types of the app's customer fields named by the tree.
        segments: Kinds (``dynamic`` / ``list``) of the app's segments named by ``member_of``.
        reaches: For a segment id: every segment it refers to, directly or not (cycles).
        segment_id: The segment being updated (None on create and for unsaved conditions).
        pii_fields: Those of the named customer fields that are PII (only EXISTS / NOT_EXISTS
            apply: their values are sealed at rest).
    """

    field_types: Mapping[str, FieldType]
    segments: Mapping[uuid.UUID, str]
    reaches: Callable[[uuid.UUID], set[uuid.UUID]]
    segment_id: uuid.UUID | None = None
    pii_fields: frozenset[str] = frozenset()


#: The only operators a condition on a PII customer field may use (its values are sealed).
PII_OPERATORS = frozenset({Operator.EXISTS, Operator.NOT_EXISTS})


def pii_operator_problem(field: str, op: Operator) -> str | None:
    """Why ``op`` cannot compare the PII attribute ``field`` (``attributes.<name>``), or None."""
    if op in PII_OPERATORS:
        return None
    return (
        f"{field} is a PII customer field: its values are encrypted at rest, so conditions on it "
        f"can only be EXISTS or NOT_EXISTS, not {_operator_name(op)}"
    )


def custom_attribute_names(condition: Condition) -> set[str]:
    """Names of the custom attributes a tree compares."""
    return {
        leaf.field[len(CUSTOM_PREFIX) :]
        for leaf in leaves(condition)
        if isinstance(leaf, AttributeCondition) and leaf.field.startswith(CUSTOM_PREFIX)
    }


def member_of_ids(condition: Condition) -> set[uuid.UUID]:
    """The well-formed segment ids of the tree's member_of conditions."""
    found = set()
    for leaf in leaves(condition):
        if isinstance(leaf, MembershipCondition):
            try:
                found.add(uuid.UUID(leaf.segment_id))
            except ValueError:
                continue
    return found


def check_condition(
    condition: Condition, path: str, lookups: Lookups, violations: FieldViolations
) -> Condition:
    """Validate a tree, recording problems under ``path``; returns it with types resolved.

    Args:
        condition: The tree as the request gave it.
        path: Its path in the request (``segment.condition``, ``condition``).
        lookups: Customer fields and segments it names.
        violations: Where problems are recorded.
    """
    count = sum(1 for _ in leaves(condition))
    if count > MAX_CONDITIONS:
        violations.add(
            path,
            f"at most {MAX_CONDITIONS} conditions in one tree, got {count}",
            reason="TOO_MANY_CONDITIONS",
        )
        return condition
    return _Checker(lookups, violations).node(condition, path, 0)


def _kind_of(value: Value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, float | int):
        return "number"
    if isinstance(value, datetime):
        return "timestamp"
    if isinstance(value, str):
        return "string"
    return "bad"


def _values_wanted(op: Operator) -> tuple[int, int]:
    """Least and most operands an operator takes."""
    if op in _PRESENCE or op in _RELATIVE or op is Operator.ANNIVERSARY_IN_DAYS:
        return 0, 0
    if op is Operator.BETWEEN:
        return 2, 2
    if op in (Operator.IN, Operator.NOT_IN):
        return 1, MAX_VALUES
    return 1, 1


def _operator_name(op: Operator) -> str:
    return f"OPERATOR_{op.name}"


class _Checker:
    def __init__(self, lookups: Lookups, violations: FieldViolations) -> None:
        self.lookups = lookups
        self.v = violations

    def node(self, condition: Condition, path: str, depth: int) -> Condition:
        if depth > MAX_DEPTH:
            self.v.add(path, f"nested deeper than {MAX_DEPTH} levels", reason="TOO_DEEP")
            return condition
        if isinstance(condition, AllOf | AnyOf):
            name = "all" if isinstance(condition, AllOf) else "any"
            if not condition.conditions:
                self.v.add(f"{path}.{name}.conditions", "at least one condition", reason="REQUIRED")
            children = tuple(
                self.node(child, f"{path}.{name}.conditions[{index}]", depth + 1)
                for index, child in enumerate(condition.conditions)
            )
            return type(condition)(children)
        if isinstance(condition, NotOf):
            return NotOf(self.node(condition.condition, f"{path}.not", depth + 1))
        if isinstance(condition, AttributeCondition):
            return self.attribute(condition, f"{path}.attribute")
        if isinstance(condition, EventCondition):
            self.event(condition, f"{path}.event")
            return condition
        if isinstance(condition, SubscriptionCondition):
            if not condition.type:
                self.v.add(f"{path}.subscription.type", "required", reason="REQUIRED")
            return condition
        if isinstance(condition, MembershipCondition):
            self.membership(condition, f"{path}.member_of")
            return condition
        assert isinstance(condition, NoCondition)
        self.v.add(
            path,
            "set one of all, any, not, attribute, event, subscription or member_of",
            reason="REQUIRED",
        )
        return condition

    # -- attributes ------------------------------------------------------------------------

    def _field_type(self, name: str, path: str) -> str | None:
        if not name:
            self.v.add(path, "required", reason="REQUIRED")
            return None
        if name in STANDARD_FIELDS:
            return STANDARD_FIELDS[name]
        if name.startswith(CUSTOM_PREFIX):
            key = name[len(CUSTOM_PREFIX) :]
            defined = self.lookups.field_types.get(key)
            if defined is not None and ATTRIBUTE_NAME_PATTERN.fullmatch(key):
                return str(defined.value)
            self.v.add(
                path,
                f"{key[:64]!r} is not a defined customer field (see ListCustomerFields)",
                reason="UNKNOWN_FIELD",
            )
            return None
        self.v.add(
            path,
            f"{name[:64]!r} is neither a standard field ({', '.join(STANDARD_FIELDS)}) "
            "nor attributes.<customer field>",
            reason="UNKNOWN_FIELD",
        )
        return None

    def attribute(self, c: AttributeCondition, path: str) -> AttributeCondition:
        field_type = self._field_type(c.field, f"{path}.field")
        op = c.operator
        if op is None:
            self.v.add(f"{path}.operator", "required", reason="REQUIRED")
            return c
        if field_type is None:
            return c
        if c.field.startswith(CUSTOM_PREFIX) and c.field[len(CUSTOM_PREFIX) :] in (
            self.lookups.pii_fields
        ):
            problem = pii_operator_problem(c.field, op)
            if problem is not None:
                self.v.add(f"{path}.operator", problem, reason="PII_FIELD_OPERATOR")
                return c
        if op not in OPERATORS_BY_TYPE[field_type]:
            self.v.add(
                f"{path}.operator",
                f"{_operator_name(op)} does not apply to {c.field} (a {field_type} field)",
                reason="OPERATOR_TYPE_MISMATCH",
            )
            return c
        self._days(op, c.days, f"{path}.days")
        self._values(c.values, op, field_type, f"{path}.values", property_operand=False)
        return replace(c, type=field_type)

    def _days(self, op: Operator, days: int, path: str) -> None:
        if op in _RELATIVE:
            if not 1 <= days <= MAX_DAYS:
                self.v.add(path, f"must be 1 to {MAX_DAYS}", reason="OUT_OF_RANGE")
        elif op is Operator.ANNIVERSARY_IN_DAYS:
            if not 0 <= days <= 366:
                self.v.add(path, "must be 0 (today) to 366", reason="OUT_OF_RANGE")
        elif days:
            self.v.add(
                path,
                "only WITHIN_LAST_DAYS, WITHIN_NEXT_DAYS and ANNIVERSARY_IN_DAYS take days",
                reason="UNEXPECTED_FIELD",
            )

    def _values(
        self,
        values: tuple[Value, ...],
        op: Operator,
        wanted: str,
        path: str,
        *,
        property_operand: bool,
    ) -> None:
        least, most = _values_wanted(op)
        if not least <= len(values) <= most:
            expected = (
                "no values"
                if most == 0
                else f"exactly {least} value{'s' if least > 1 else ''}"
                if least == most
                else f"{least} to {most} values"
            )
            self.v.add(
                path, f"{_operator_name(op)} takes {expected}, got {len(values)}", reason="VALUES"
            )
            return
        problems = 0
        for index, value in enumerate(values):
            problem = self._value_problem(value, wanted, property_operand=property_operand)
            if problem is not None:
                self.v.add(f"{path}[{index}]", problem, reason="INVALID_VALUE")
                problems += 1
        if op is Operator.BETWEEN and not problems:
            low, high = (_comparable(v, wanted) for v in values)
            if low > high:  # type: ignore[operator]
                self.v.add(path, "values[0] must not be above values[1]", reason="INVALID_RANGE")

    def _value_problem(self, value: Value, wanted: str, *, property_operand: bool) -> str | None:
        if isinstance(value, BadValue):
            return value.problem
        kind = _kind_of(value)
        if wanted in _CALENDAR and kind == "string":
            try:
                _calendar_date(str(value), wanted)
            except ValueError:
                return f"a {wanted} operand is a timestamp_value or a 'YYYY-MM-DD' string_value"
            return None
        if kind != ("timestamp" if wanted in _CALENDAR else wanted):
            what = "the operands are" if property_operand else "the field is"
            return f"must be a {_VALUE_FIELD[wanted]} ({what} {wanted})"
        if isinstance(value, float) and not math.isfinite(value):
            return "must be a finite number"
        if isinstance(value, str):
            return text_problem(value, max_length=MAX_STRING)
        return None

    # -- events ----------------------------------------------------------------------------

    def event(self, c: EventCondition, path: str) -> None:
        if not c.name:
            self.v.add(f"{path}.name", "required", reason="REQUIRED")
        elif len(c.name) > MAX_EVENT_NAME or not _EVENT_NAME.fullmatch(c.name):
            self.v.add(
                f"{path}.name",
                f"must be 1 to {MAX_EVENT_NAME} letters, digits, '_', '.' or '-' (as tracked)",
                reason="INVALID_EVENT_NAME",
            )
        if len(c.where) > MAX_WHERE:
            self.v.add(
                f"{path}.where", f"at most {MAX_WHERE} property conditions", reason="TOO_MANY"
            )
        for index, where in enumerate(c.where):
            self.property(where, f"{path}.where[{index}]")
        occurrence = c.first_time or c.last_time
        if occurrence is not None:
            which = "first_time" if c.first_time is not None else "last_time"
            self._occurrence(occurrence, f"{path}.{which}")
            if c.count_operator is not None:
                self.v.add(
                    f"{path}.count_operator",
                    f"applies to a count, not {which}",
                    reason="UNEXPECTED_FIELD",
                )
            if c.within_last is not None:
                self.v.add(
                    f"{path}.within_last",
                    f"applies to a count, not {which}",
                    reason="UNEXPECTED_FIELD",
                )
            if c.between is not None:
                self.v.add(
                    f"{path}.between", f"applies to a count, not {which}", reason="UNEXPECTED_FIELD"
                )
        elif c.count is None:
            if c.count_operator is not None:
                self.v.add(f"{path}.count", "required with count_operator", reason="REQUIRED")
        elif not 0 <= c.count <= MAX_COUNT:
            self.v.add(f"{path}.count", f"must be 0 to {MAX_COUNT}", reason="OUT_OF_RANGE")
        if isinstance(c.within_last, BadValue):
            self.v.add(f"{path}.within_last", c.within_last.problem, reason="INVALID_VALUE")
        elif c.within_last is not None and not timedelta(0) < c.within_last <= timedelta(
            days=MAX_DAYS
        ):
            self.v.add(
                f"{path}.within_last",
                f"must be positive and at most {MAX_DAYS} days",
                reason="OUT_OF_RANGE",
            )
        if c.between is not None:
            self._between(c.between, f"{path}.between")

    def _between(
        self, between: tuple[datetime | BadValue | None, datetime | BadValue | None], path: str
    ) -> None:
        start, end = between
        for value, name in ((start, "start_time"), (end, "end_time")):
            if isinstance(value, BadValue):
                self.v.add(f"{path}.{name}", value.problem, reason="INVALID_VALUE")
        if start is None and end is None:
            self.v.add(path, "set start_time, end_time or both", reason="REQUIRED")
        elif isinstance(start, datetime) and isinstance(end, datetime) and start >= end:
            self.v.add(path, "start_time must be before end_time", reason="INVALID_RANGE")

    def _occurrence(self, occurrence: Occurrence, path: str) -> None:
        op = occurrence.operator
        if op is None:
            self.v.add(f"{path}.operator", "required", reason="REQUIRED")
        elif op in _DATES:
            if occurrence.time is None:
                self.v.add(f"{path}.time", f"required with {_operator_name(op)}", reason="REQUIRED")
            elif isinstance(occurrence.time, BadValue):
                self.v.add(f"{path}.time", occurrence.time.problem, reason="INVALID_VALUE")
            if occurrence.days:
                self.v.add(
                    f"{path}.days", "only WITHIN_LAST_DAYS takes days", reason="UNEXPECTED_FIELD"
                )
        elif op is Operator.WITHIN_LAST_DAYS:
            if not 1 <= occurrence.days <= MAX_DAYS:
                self.v.add(f"{path}.days", f"must be 1 to {MAX_DAYS}", reason="OUT_OF_RANGE")
            if occurrence.time is not None:
                self.v.add(
                    f"{path}.time", "only BEFORE and AFTER take a time", reason="UNEXPECTED_FIELD"
                )
        else:
            self.v.add(
                f"{path}.operator",
                "must be OPERATOR_BEFORE, OPERATOR_AFTER or OPERATOR_WITHIN_LAST_DAYS",
                reason="OPERATOR_TYPE_MISMATCH",
            )

    def property(self, c: PropertyCondition, path: str) -> None:
        if not c.property:
            self.v.add(f"{path}.property", "required", reason="REQUIRED")
        else:
            problem = text_problem(c.property, max_length=MAX_PROPERTY_NAME)
            if problem is not None:
                self.v.add(f"{path}.property", problem, reason="INVALID_TEXT")
        op = c.operator
        if op is None:
            self.v.add(f"{path}.operator", "required", reason="REQUIRED")
            return
        if op in _PRESENCE:
            self._values(c.values, op, "string", f"{path}.values", property_operand=True)
            return
        kinds = [_kind_of(v) for v in c.values if not isinstance(v, BadValue)]
        wanted = kinds[0] if kinds else "string"
        if wanted not in _PROPERTY_OPERATORS or op not in _PROPERTY_OPERATORS[wanted]:
            self.v.add(
                f"{path}.operator",
                f"{_operator_name(op)} does not apply to {wanted} operands"
                + (
                    " (no date-relative operators on properties)"
                    if op in _RELATIVE or op is Operator.ANNIVERSARY_IN_DAYS
                    else ""
                ),
                reason="OPERATOR_TYPE_MISMATCH",
            )
            return
        self._values(c.values, op, wanted, f"{path}.values", property_operand=True)

    # -- membership ------------------------------------------------------------------------

    def membership(self, c: MembershipCondition, path: str) -> None:
        field = f"{path}.segment_id"
        if not c.segment_id:
            self.v.add(field, "required", reason="REQUIRED")
            return
        try:
            segment_id = uuid.UUID(c.segment_id)
        except ValueError:
            self.v.add(field, f"{c.segment_id[:64]!r} is not a segment id", reason="INVALID_ID")
            return
        own = self.lookups.segment_id
        if segment_id not in self.lookups.segments and segment_id != own:
            self.v.add(field, f"no segment {c.segment_id} in this app", reason="UNKNOWN_SEGMENT")
        elif own is not None and (segment_id == own or own in self.lookups.reaches(segment_id)):
            self.v.add(
                field,
                "this would make the segment depend on itself (a cycle of member_of)",
                reason="SEGMENT_CYCLE",
            )


def _comparable(value: Value, wanted: str) -> object:
    """A value the bounds of a BETWEEN compare by (birthdates and dates by calendar date)."""
    if wanted in _CALENDAR:
        if isinstance(value, datetime):
            return value.date()
        return _calendar_date(str(value), wanted)
    return value


def _calendar_date(text: str, wanted: str) -> date:
    """A calendar operand's date. Date fields take the one spelling they are stored in, so the
    journey's branches, which compare the stored strings, agree; birthdates any ISO date."""
    return parse_date(text) if wanted == "date" else date.fromisoformat(text)
