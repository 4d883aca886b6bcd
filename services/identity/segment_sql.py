"""Compiles a segment's condition tree into one parameterised SQL predicate over ``users u``.

The predicate is set-based: event, subscription and membership leaves are ``u.user_id IN
(SELECT ...)`` sub-queries that PostgreSQL runs once per statement (a semi-join, or a hashed
sub-plan under OR / NOT), never a query per user. Two scopes:

* **everyone** (:attr:`Scope.ALL`): counts and full materialisations; ``$1`` is the app id,
  ``$2`` the evaluation time ("now").
* **a batch of users** (:attr:`Scope.BATCH`): re-evaluation of the users a change may have
  moved; ``$3`` is the ``uuid[]`` of those users, and every sub-query is restricted to them too,
  so it reads only their events through ``events_user_time``.

Operands are always parameters; only custom attribute names (``[a-z][a-z0-9_]*``, checked
again here) are inlined, as the literal keys of ``attributes->>'name'`` so that expression
indexes match (docs/segments.md, "Indexes").

Three-valued logic: a comparison with a missing value is NULL, which WHERE treats as false —
right for a leaf in a positive position, wrong under NOT (``NOT NULL`` is NULL, so "not plan =
gold" would drop users without a plan). Leaves under a NOT are therefore wrapped in
``coalesce(..., false)``; sub-query leaves are never NULL (user ids are never NULL).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from enum import Enum
from typing import Any

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
)

__all__ = [
    "CUSTOM_PREFIX",
    "STANDARD_FIELDS",
    "Compiled",
    "Scope",
    "SqlParams",
    "anniversary_candidates",
    "compile_condition",
    "compile_leaf_detail",
]

#: Custom attributes are addressed as ``attributes.<name>``.
CUSTOM_PREFIX = "attributes."

#: Standard fields and their type (columns of ``users``; ``birthdate`` is three of them).
STANDARD_FIELDS: dict[str, str] = {
    "external_id": "string",
    "first_name": "string",
    "last_name": "string",
    "email": "string",
    "phone": "string",
    "timezone": "string",
    "language": "string",
    "country": "string",
    "birthdate": "birthdate",
    "create_time": "timestamp",
    "update_time": "timestamp",
}

_NAME = re.compile(r"[a-z][a-z0-9_]*")
_SQL_TYPE = {
    "string": "text",
    "number": "float8",
    "bool": "boolean",
    "timestamp": "timestamptz",
    "birthdate": "date",
    "date": "date",
}
#: The zone of a user's local calendar: their own, else the app's default, else UTC.
_ZONE = (
    "coalesce(u.timezone, (SELECT coalesce(nullif(a.settings->>'default_timezone', ''), 'UTC') "
    "FROM apps a WHERE a.app_id = $1), 'UTC')"
)
#: The user's local date now: what relative conditions on calendar dates count from.
_TODAY = f"(($2::timestamptz AT TIME ZONE {_ZONE})::date)"


class Scope(Enum):
    """Which users a compiled predicate is evaluated for."""

    ALL = "all"
    BATCH = "batch"


@dataclass
class SqlParams:
    """The parameters of one statement: ``$1`` app id, ``$2`` now, ``$3`` the batch (if any),
    then whatever the compiler and the store add."""

    values: list[Any] = field(default_factory=list)

    def add(self, value: Any, sql_type: str) -> str:
        """Append a parameter; returns its placeholder, cast to ``sql_type``."""
        self.values.append(value)
        return f"${len(self.values)}::{sql_type}"


@dataclass(frozen=True)
class Compiled:
    """A compiled predicate and the parameters it was compiled with.

    Attributes:
        sql: A boolean SQL expression over ``users u``.
        params: Its parameters (``$1`` app id, ``$2`` now, ``$3`` batch in BATCH scope).
        scope: Which users it is meant for.
    """

    sql: str
    params: SqlParams
    scope: Scope


def _params(app_id: str, now: datetime, scope: Scope, batch: list[Any] | None) -> SqlParams:
    values: list[Any] = [app_id, now]
    if scope is Scope.BATCH:
        values.append(list(batch or ()))
    return SqlParams(values)


def compile_condition(
    condition: Condition,
    *,
    app_id: str,
    now: datetime,
    scope: Scope = Scope.ALL,
    batch: list[Any] | None = None,
    params: SqlParams | None = None,
) -> Compiled:
    """Compile a validated tree.

    Args:
        condition: The tree (validated: types resolved, no unset parts).
        app_id: The app, ``$1``.
        now: The evaluation time, ``$2``.
        scope: Everyone, or the users of ``batch`` (``$3``).
        batch: The user ids of a BATCH scope.
        params: Parameters to continue from (must hold ``$1``.. already); fresh by default.

    Returns:
        The predicate and its parameters.
    """
    p = params if params is not None else _params(app_id, now, scope, batch)
    compiler = _Compiler(p, scope, now)
    return Compiled(compiler.node(condition, negated=False), p, scope)


def compile_leaf_detail(
    leaf: Condition, params: SqlParams, *, now: datetime
) -> tuple[str, str | None]:
    """For Explain: a leaf's predicate and an expression showing what was found, for one user.

    Both are over ``users u`` of a BATCH scope (``$3`` holds the one user).

    Returns:
        ``(predicate, detail)``; the detail is SQL giving the attribute's value as text, the
        event count, the first / last time, or the number of reachable subscriptions (None for
        membership, whose detail is the predicate itself).
    """
    compiler = _Compiler(params, Scope.BATCH, now)
    predicate = compiler.node(leaf, negated=False)
    return predicate, compiler.detail(leaf)


def _like_pattern(text: str, *, prefix: bool, suffix: bool) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"{'%' if prefix else ''}{escaped}{'%' if suffix else ''}"


def anniversary_candidates(now: datetime, days: int) -> list[date]:
    """The local dates ``days`` after today somewhere on Earth at ``now`` (UTC-12 to UTC+14).

    Every user's target day is one of these three, so a birthday condition can first narrow
    to three (month, day) pairs, which ``users_birthday`` finds, then check each user's zone.
    """
    base = now.astimezone(UTC).date() + timedelta(days=days)
    return [base - timedelta(days=1), base, base + timedelta(days=1)]


class _Compiler:
    def __init__(self, params: SqlParams, scope: Scope, now: datetime) -> None:
        self.p = params
        self.scope = scope
        self.now = now

    # -- tree --------------------------------------------------------------------------------

    def node(self, condition: Condition, *, negated: bool) -> str:
        if isinstance(condition, AllOf):
            return (
                "("
                + " AND ".join(self.node(c, negated=negated) for c in condition.conditions)
                + ")"
            )
        if isinstance(condition, AnyOf):
            return (
                "(" + " OR ".join(self.node(c, negated=negated) for c in condition.conditions) + ")"
            )
        if isinstance(condition, NotOf):
            return f"(NOT {self.node(condition.condition, negated=True)})"
        if isinstance(condition, AttributeCondition):
            sql = self.attribute(condition)
            return f"coalesce({sql}, false)" if negated else sql
        if isinstance(condition, EventCondition):
            return self.event(condition)
        if isinstance(condition, SubscriptionCondition):
            return self.subscription(condition)
        if isinstance(condition, MembershipCondition):
            return self.membership(condition)
        if isinstance(condition, NoCondition):
            raise ValueError("cannot compile an unset condition (validate first)")
        raise TypeError(f"not a condition: {condition!r}")

    def _batch(self, column: str) -> str:
        return f" AND {column} = ANY($3::uuid[])" if self.scope is Scope.BATCH else ""

    # -- attributes --------------------------------------------------------------------------

    def _expression(self, condition: AttributeCondition) -> str:
        name = condition.field
        if name.startswith(CUSTOM_PREFIX):
            key = name[len(CUSTOM_PREFIX) :]
            if not _NAME.fullmatch(key):
                raise ValueError(f"not an attribute name: {key!r}")
            raw = f"(u.attributes->>'{key}')"
            if condition.type == "number":
                return f"({raw}::float8)"
            if condition.type == "bool":
                return f"({raw}::boolean)"
            if condition.type == "timestamp":
                return f"segment_timestamp(u.attributes->>'{key}')"
            if condition.type == "date":
                # A calendar date: never moved to a zone (a birthday is the same day anywhere).
                return f"segment_date(u.attributes->>'{key}')"
            return raw
        if name not in STANDARD_FIELDS:
            raise ValueError(f"not a standard field: {name!r}")
        if name == "birthdate":
            # Only dates with a known year compare as dates.
            return "make_date(u.birth_year, u.birth_month, u.birth_day)"
        return f"u.{name}"

    def _exists(self, condition: AttributeCondition) -> str:
        name = condition.field
        if name.startswith(CUSTOM_PREFIX):
            return f"(u.attributes ? '{name[len(CUSTOM_PREFIX) :]}')"
        if name == "birthdate":
            return "(u.birth_month IS NOT NULL)"
        return f"(u.{name} IS NOT NULL)"

    def _operand(self, value: Value, sql_type: str) -> str:
        if isinstance(value, BadValue):
            raise ValueError(f"cannot compile an invalid value: {value.problem}")
        if sql_type == "date" and isinstance(value, datetime):
            return self.p.add(value.date(), "date")
        if sql_type == "date" and isinstance(value, str):
            return self.p.add(date.fromisoformat(value), "date")
        return self.p.add(value, sql_type)

    def attribute(self, c: AttributeCondition) -> str:
        op = c.operator
        if op is Operator.EXISTS:
            return self._exists(c)
        if op is Operator.NOT_EXISTS:
            return f"(NOT {self._exists(c)})"
        if op is Operator.ANNIVERSARY_IN_DAYS:
            return self._anniversary(c)
        expr = self._expression(c)
        sql_type = _SQL_TYPE[c.type]
        if sql_type == "date" and op in (Operator.WITHIN_LAST_DAYS, Operator.WITHIN_NEXT_DAYS):
            # Whole days, counted from the user's local today (both ends included).
            days = self.p.add(c.days, "int")
            if op is Operator.WITHIN_LAST_DAYS:
                return f"({expr} BETWEEN {_TODAY} - {days} AND {_TODAY})"
            return f"({expr} BETWEEN {_TODAY} AND {_TODAY} + {days})"
        if op is Operator.WITHIN_LAST_DAYS or op is Operator.WITHIN_NEXT_DAYS:
            span = self.p.add(timedelta(days=c.days), "interval")
            if op is Operator.WITHIN_LAST_DAYS:
                return f"({expr} >= $2::timestamptz - {span} AND {expr} <= $2::timestamptz)"
            return f"({expr} >= $2::timestamptz AND {expr} <= $2::timestamptz + {span})"
        return _compare(expr, op, c.values, lambda v: self._operand(v, sql_type), self.p, sql_type)

    def _anniversary(self, c: AttributeCondition) -> str:
        days = self.p.add(c.days, "int")
        target = f"({_TODAY} + {days})"
        if c.type == "birthdate":
            month, day, year = "u.birth_month", "u.birth_day", "u.birth_year"
            # Narrow to the three (month, day) pairs any zone can be on, so users_birthday
            # serves the common case; the exact local check follows.
            pairs = [
                f"(u.birth_month = {self.p.add(d.month, 'int')} "
                f"AND u.birth_day = {self.p.add(d.day, 'int')})"
                for d in anniversary_candidates(self.now, c.days)
            ]
            pairs.append("(u.birth_month = 2 AND u.birth_day = 29)")
            narrow = "(" + " OR ".join(pairs) + ")"
            not_before = f"({year} IS NULL OR {year} < extract(year FROM {target}))"
        else:
            # A date is the user's own calendar day already; a point in time becomes one in
            # the user's zone.
            expr = self._expression(c)
            local = expr if c.type == "date" else f"({expr} AT TIME ZONE {_ZONE})::date"
            month = f"extract(month FROM {local})"
            day = f"extract(day FROM {local})"
            narrow = "true"
            not_before = f"({local} < {target})"
        # 29 February is celebrated on the 28th in years without one.
        same_day = (
            f"(({month} = extract(month FROM {target}) AND {day} = extract(day FROM {target})) "
            f"OR ({month} = 2 AND {day} = 29 AND extract(month FROM {target}) = 2 "
            f"AND extract(day FROM {target}) = 28 AND extract(month FROM {target} + 1) = 3))"
        )
        return f"({narrow} AND {same_day} AND {not_before})"

    # -- events ------------------------------------------------------------------------------

    def _event_filter(self, c: EventCondition) -> str:
        parts = [f"e.app_id = $1 AND e.name = {self.p.add(c.name, 'text')}"]
        if self.scope is Scope.BATCH:
            parts.append("e.user_id = ANY($3::uuid[])")
        if isinstance(c.within_last, timedelta):
            parts.append(
                f"e.occurred_at >= $2::timestamptz - {self.p.add(c.within_last, 'interval')}"
            )
        if c.between is not None:
            start, end = c.between
            if isinstance(start, datetime):
                parts.append(f"e.occurred_at >= {self.p.add(start, 'timestamptz')}")
            if isinstance(end, datetime):
                parts.append(f"e.occurred_at < {self.p.add(end, 'timestamptz')}")
        parts.extend(self.property(w) for w in c.where)
        return " AND ".join(parts)

    def event(self, c: EventCondition) -> str:
        at_least = (c.count_operator or CountOperator.AT_LEAST) is CountOperator.AT_LEAST
        if c.first_time is None and c.last_time is None and at_least and c.count == 0:
            return "true"  # at least 0 times: everyone (and no parameter left unused)
        where = self._event_filter(c)
        users = f"SELECT e.user_id FROM events e WHERE {where}"
        for occurrence, aggregate in ((c.first_time, "min"), (c.last_time, "max")):
            if occurrence is not None:
                having = self._occurrence(occurrence, f"{aggregate}(e.occurred_at)")
                return f"(u.user_id IN ({users} GROUP BY e.user_id HAVING {having}))"
        count = 1 if c.count is None else c.count
        operator = c.count_operator or CountOperator.AT_LEAST
        if operator is CountOperator.AT_LEAST:
            if count == 1:
                return f"(u.user_id IN ({users}))"
            n = self.p.add(count, "bigint")
            return f"(u.user_id IN ({users} GROUP BY e.user_id HAVING count(*) >= {n}))"
        if operator is CountOperator.AT_MOST or count == 0:
            # Users with no such events at all count as 0: they match.
            if count == 0:
                return f"(NOT (u.user_id IN ({users})))"
            n = self.p.add(count, "bigint")
            return f"(NOT (u.user_id IN ({users} GROUP BY e.user_id HAVING count(*) > {n})))"
        n = self.p.add(count, "bigint")
        return f"(u.user_id IN ({users} GROUP BY e.user_id HAVING count(*) = {n}))"

    def _occurrence(self, occurrence: Occurrence, moment: str) -> str:
        if occurrence.operator is Operator.WITHIN_LAST_DAYS:
            span = self.p.add(timedelta(days=occurrence.days), "interval")
            return f"{moment} >= $2::timestamptz - {span}"
        time = self.p.add(occurrence.time, "timestamptz")
        return (
            f"{moment} < {time}" if occurrence.operator is Operator.BEFORE else f"{moment} > {time}"
        )

    def property(self, c: PropertyCondition) -> str:
        key = self.p.add(c.property, "text")
        value = f"(e.properties -> {key})"
        op = c.operator
        if op is Operator.EXISTS:
            return f"(e.properties ? {key})"
        if op is Operator.NOT_EXISTS:
            return f"(NOT (e.properties ? {key}))"
        first = c.values[0]
        if isinstance(first, bool):
            operand_type = "boolean"
        elif isinstance(first, float | int):
            operand_type = "float8"
        elif isinstance(first, datetime):
            operand_type = "timestamptz"
        else:
            operand_type = "text"
        if operand_type == "timestamptz":
            expr = f"segment_try_timestamp(e.properties ->> {key})"
            return _compare(
                expr, op, c.values, lambda v: self.p.add(v, "timestamptz"), self.p, "timestamptz"
            )
        if op in (Operator.EQUALS, Operator.NOT_EQUALS, Operator.IN, Operator.NOT_IN):
            # Compared as JSON: a number never equals a string, and nothing is cast.
            return _compare(
                value,
                op,
                c.values,
                lambda v: f"to_jsonb({self.p.add(v, operand_type)})",
                self.p,
                "jsonb",
                array=lambda vs: (
                    "ARRAY["
                    + ", ".join(f"to_jsonb({self.p.add(v, operand_type)})" for v in vs)
                    + "]"
                ),
            )
        if operand_type == "text":
            # String operators only see string properties.
            expr = f"(CASE WHEN jsonb_typeof({value}) = 'string' THEN e.properties ->> {key} END)"
            return _compare(expr, op, c.values, lambda v: self.p.add(v, "text"), self.p, "text")
        # Numbers: jsonb orders numbers numerically; other types never match.
        return (
            f"(jsonb_typeof({value}) = 'number' AND "
            + _compare(
                value,
                op,
                c.values,
                lambda v: f"to_jsonb({self.p.add(v, 'float8')})",
                self.p,
                "jsonb",
            )
            + ")"
        )

    # -- subscriptions and membership --------------------------------------------------------

    def subscription(self, c: SubscriptionCondition) -> str:
        kind = self.p.add(c.type, "text")
        return (
            "(u.user_id IN (SELECT s.user_id FROM subscriptions s WHERE s.app_id = $1 "
            f"AND s.type = {kind} AND s.enabled AND s.opt_in = 'subscribed'"
            f"{self._batch('s.user_id')}))"
        )

    def membership(self, c: MembershipCondition) -> str:
        segment = self.p.add(c.segment_id, "uuid")
        return (
            "(u.user_id IN (SELECT m.user_id FROM segment_members m WHERE m.app_id = $1 "
            f"AND m.segment_id = {segment}{self._batch('m.user_id')}))"
        )

    # -- details (Explain) -------------------------------------------------------------------

    def detail(self, leaf: Condition) -> str | None:
        if isinstance(leaf, AttributeCondition):
            if leaf.field == "birthdate":
                return (
                    "CASE WHEN u.birth_month IS NULL THEN NULL ELSE concat_ws('-', "
                    "lpad(coalesce(u.birth_year::text, '????'), 4, '0'), "
                    "lpad(u.birth_month::text, 2, '0'), lpad(u.birth_day::text, 2, '0')) END"
                )
            if leaf.field.startswith(CUSTOM_PREFIX):
                value = f"(u.attributes -> '{leaf.field[len(CUSTOM_PREFIX) :]}')"
                # A PII value is sealed (an object): the answer says it is there, not what.
                return (
                    f"CASE WHEN jsonb_typeof({value}) = 'object' THEN '\"(encrypted)\"' "
                    f"ELSE {value}::text END"
                )
            return f"u.{leaf.field}::text"
        if isinstance(leaf, EventCondition):
            where = self._event_filter(leaf) + " AND e.user_id = u.user_id"
            if leaf.first_time is not None:
                return f"(SELECT min(e.occurred_at) FROM events e WHERE {where})::text"
            if leaf.last_time is not None:
                return f"(SELECT max(e.occurred_at) FROM events e WHERE {where})::text"
            return f"(SELECT count(*) FROM events e WHERE {where})::text"
        if isinstance(leaf, SubscriptionCondition):
            kind = self.p.add(leaf.type, "text")
            return (
                "(SELECT count(*) FROM subscriptions s WHERE s.app_id = $1 "
                f"AND s.user_id = u.user_id AND s.type = {kind} AND s.enabled "
                "AND s.opt_in = 'subscribed')::text"
            )
        return None


def _compare(
    expr: str,
    op: Operator | None,
    values: tuple[Value, ...],
    operand: Any,
    params: SqlParams,
    sql_type: str,
    *,
    array: Any = None,
) -> str:
    """``expr`` compared with ``values`` by ``op``; ``operand(v)`` makes a value's SQL."""
    if op is Operator.EQUALS:
        return f"({expr} = {operand(values[0])})"
    if op is Operator.NOT_EQUALS:
        return f"({expr} IS DISTINCT FROM {operand(values[0])})"
    if op is Operator.IN or op is Operator.NOT_IN:
        listed = (
            array(values) if array is not None else params.add([v for v in values], f"{sql_type}[]")
        )
        found = f"({expr} = ANY({listed}))"
        return found if op is Operator.IN else f"(NOT coalesce({found}, false))"
    if op in (Operator.CONTAINS, Operator.NOT_CONTAINS, Operator.STARTS_WITH, Operator.ENDS_WITH):
        text = str(values[0])
        pattern = _like_pattern(
            text,
            prefix=op is not Operator.STARTS_WITH,
            suffix=op is not Operator.ENDS_WITH,
        )
        found = f"({expr} ILIKE {params.add(pattern, 'text')})"
        return found if op is not Operator.NOT_CONTAINS else f"(NOT coalesce({found}, false))"
    symbol = (
        {
            Operator.GREATER_THAN: ">",
            Operator.AFTER: ">",
            Operator.GREATER_OR_EQUAL: ">=",
            Operator.LESS_THAN: "<",
            Operator.BEFORE: "<",
            Operator.LESS_OR_EQUAL: "<=",
        }.get(op)
        if op is not None
        else None
    )
    if symbol is not None:
        return f"({expr} {symbol} {operand(values[0])})"
    if op is Operator.BETWEEN:
        return f"({expr} BETWEEN {operand(values[0])} AND {operand(values[1])})"
    raise ValueError(f"operator {op} cannot compare {sql_type} (validate first)")
