"""ExplainSegmentMembership: a segment's condition evaluated for one user, node by node.

Every leaf is compiled for the one user (BATCH scope, the same SQL the maintainer runs) into a
column of a single query, together with what was found (the attribute's value, the event
count, the first / last time, the number of reachable subscriptions); and / or / not are
combined here. A leaf that compares a missing value is false, as in the set-based evaluation.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from services.identity import refs
from services.identity.refs import RefKey
from services.identity.segment_conditions import (
    AllOf,
    AnyOf,
    AttributeCondition,
    Condition,
    CountOperator,
    EventCondition,
    MembershipCondition,
    NotOf,
    SubscriptionCondition,
)
from services.identity.segment_sql import SqlParams, compile_leaf_detail
from services.identity.segments import get_segment, segment_condition
from services.identity.segments_store import explain_row

__all__ = ["ConditionResult", "Explanation", "explain"]


@dataclass(frozen=True, slots=True)
class ConditionResult:
    """One node of the evaluated tree.

    Attributes:
        path: The node's path (``condition.all.conditions[1].event``).
        held: Whether it held for the user.
        detail: What was found, in words.
        children: Results of an and / or / not's children.
    """

    path: str
    held: bool
    detail: str
    children: list[ConditionResult] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Explanation:
    """The answer: membership now, and the evaluated tree (DYNAMIC segments)."""

    member: bool
    result: ConditionResult | None


async def explain(
    pool: asyncpg.Pool, app_id: str, segment_id: uuid.UUID, user: RefKey, *, at: datetime
) -> Explanation:
    """Evaluate a segment for one user now.

    For a LIST segment, ``member`` is whether the user is on the list and there is no tree.

    Raises:
        NotFound: ``SEGMENT_NOT_FOUND`` or ``USER_NOT_FOUND``.
    """
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        record = await get_segment(conn, app_id, segment_id)
        user_id = (await refs.lookup(conn, app_id, [user])).get(user)
        if user_id is None:
            raise refs.user_not_found(user)
        if record.kind == "list":
            member = await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM segment_members WHERE app_id = $1 "
                "AND segment_id = $2 AND user_id = $3)",
                app_id,
                segment_id,
                user_id,
            )
            return Explanation(member=bool(member), result=None)
        condition = segment_condition(record)
        params = SqlParams([app_id, at, [user_id]])
        leaves: list[tuple[Condition, int]] = []
        columns: list[str] = []
        _collect(condition, leaves, columns, params, at)
        row = await explain_row(conn, columns, params)
    if row is None:
        raise refs.user_not_found(user)
    values = [row[f"c{i}"] for i in range(len(columns))]
    result = _evaluate(condition, "condition", iter(values))
    return Explanation(member=result.held, result=result)


def _collect(
    condition: Condition,
    leaves: list[tuple[Condition, int]],
    columns: list[str],
    params: SqlParams,
    now: datetime,
) -> None:
    """Two columns per leaf (held, detail), depth first, in the order :func:`_evaluate`
    reads them."""
    if isinstance(condition, AllOf | AnyOf):
        for child in condition.conditions:
            _collect(child, leaves, columns, params, now)
        return
    if isinstance(condition, NotOf):
        _collect(condition.condition, leaves, columns, params, now)
        return
    predicate, detail = compile_leaf_detail(condition, params, now=now)
    leaves.append((condition, len(columns)))
    columns.append(f"coalesce({predicate}, false)")
    columns.append(detail or "NULL::text")


def _evaluate(condition: Condition, path: str, it: Iterator[object]) -> ConditionResult:
    """The result of a node, reading its leaves' columns from ``it`` (the row, in order)."""
    if isinstance(condition, AllOf | AnyOf):
        name = "all" if isinstance(condition, AllOf) else "any"
        children = [
            _evaluate(child, f"{path}.{name}.conditions[{index}]", it)
            for index, child in enumerate(condition.conditions)
        ]
        held = (
            all(c.held for c in children)
            if isinstance(condition, AllOf)
            else any(c.held for c in children)
        )
        kept = sum(c.held for c in children)
        detail = f"{kept} of {len(children)} held ({'all' if name == 'all' else 'any'} needed)"
        return ConditionResult(f"{path}.{name}", held, detail, children)
    if isinstance(condition, NotOf):
        child = _evaluate(condition.condition, f"{path}.not", it)
        return ConditionResult(
            f"{path}.not",
            not child.held,
            f"the condition {'held' if child.held else 'did not hold'}",
            [child],
        )
    held = bool(next(it))
    found = next(it)
    return _leaf_result(condition, path, held, found)


def _leaf_result(condition: Condition, path: str, held: bool, found: object) -> ConditionResult:
    if isinstance(condition, AttributeCondition):
        value = "not set" if found is None else f"= {found}"
        op = condition.operator.name if condition.operator else "?"
        detail = f"{condition.field} {value} ({op}"
        detail += f" {', '.join(_show(v) for v in condition.values)})" if condition.values else ")"
        return ConditionResult(f"{path}.attribute", held, detail)
    if isinstance(condition, EventCondition):
        if condition.first_time is not None or condition.last_time is not None:
            which = "first" if condition.first_time is not None else "last"
            detail = (
                f"never did {condition.name}"
                if found is None
                else f"{which} did {condition.name} at {found}"
            )
        else:
            operator = condition.count_operator or CountOperator.AT_LEAST
            wanted = 1 if condition.count is None else condition.count
            detail = (
                f"{condition.name} done {found} time{'s' if found != '1' else ''}"
                f"{' in the window' if condition.within_last or condition.between else ''}"
                f"{' matching the property conditions' if condition.where else ''}"
                f" ({operator.name.lower().replace('_', ' ')} {wanted} needed)"
            )
        return ConditionResult(f"{path}.event", held, detail)
    if isinstance(condition, SubscriptionCondition):
        detail = f"{found} reachable {condition.type} subscription(s)"
        return ConditionResult(f"{path}.subscription", held, detail)
    assert isinstance(condition, MembershipCondition)
    detail = f"{'a' if held else 'not a'} member of segment {condition.segment_id}"
    return ConditionResult(f"{path}.member_of", held, detail)


def _show(value: object) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)
