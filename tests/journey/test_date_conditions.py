"""Branch conditions on a date customer field, as journey evaluates them on identity's profile.

A date field arrives as a ``string_value`` 'YYYY-MM-DD': a calendar date, compared by day,
with relative operators and anniversaries counted from the customer's local today.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from tidings.identity.v1 import segment_pb2 as spb
from tidings.identity.v1 import user_pb2

from services.journey.conditions import ProfileFacts, matches_profile

Op = spb.Operator
#: 03:30 UTC on 10 May 2026: still 9 May in New York, already 10 May in Tokyo.
NOW = datetime(2026, 5, 10, 3, 30, tzinfo=UTC)


async def _no_events(*_: Any) -> list[Any]:
    raise AssertionError("no events needed")


async def _not_a_member(_: str) -> bool:
    return False


FACTS = ProfileFacts(events=_no_events, is_member=_not_a_member)


def _user(zone: str, joined: str) -> user_pb2.User:
    user = user_pb2.User(timezone=zone)
    user.attributes["joined"].string_value = joined
    return user


def _condition(op: Any, *values: user_pb2.AttributeValue, days: int = 0) -> spb.Condition:
    return spb.Condition(
        attribute=spb.AttributeCondition(
            field="attributes.joined", operator=op, values=list(values), days=days
        )
    )


def _s(text: str) -> user_pb2.AttributeValue:
    return user_pb2.AttributeValue(string_value=text)


def _t(moment: datetime) -> user_pb2.AttributeValue:
    value = user_pb2.AttributeValue()
    value.timestamp_value.FromDatetime(moment)
    return value


@pytest.mark.parametrize(
    ("zone", "joined", "condition", "expected"),
    [
        # Anniversaries on the customer's own calendar day, the date never moved to a zone.
        ("America/New_York", "2020-05-09", _condition(Op.OPERATOR_ANNIVERSARY_IN_DAYS), True),
        ("America/New_York", "2020-05-10", _condition(Op.OPERATOR_ANNIVERSARY_IN_DAYS), False),
        (
            "America/New_York",
            "2020-05-10",
            _condition(Op.OPERATOR_ANNIVERSARY_IN_DAYS, days=1),
            True,
        ),
        ("Asia/Tokyo", "2020-05-10", _condition(Op.OPERATOR_ANNIVERSARY_IN_DAYS), True),
        ("Asia/Tokyo", "2024-02-29", _condition(Op.OPERATOR_ANNIVERSARY_IN_DAYS), False),
        # Within the last / next days of the local today.
        ("America/New_York", "2026-05-12", _condition(Op.OPERATOR_WITHIN_NEXT_DAYS, days=3), True),
        ("Asia/Tokyo", "2026-05-14", _condition(Op.OPERATOR_WITHIN_NEXT_DAYS, days=3), False),
        ("America/New_York", "2026-05-10", _condition(Op.OPERATOR_WITHIN_LAST_DAYS, days=3), False),
        ("Asia/Tokyo", "2026-05-10", _condition(Op.OPERATOR_WITHIN_LAST_DAYS, days=3), True),
        # Fixed dates: a 'YYYY-MM-DD' operand, or a point in time by its UTC date.
        ("UTC", "2020-05-10", _condition(Op.OPERATOR_EQUALS, _s("2020-05-10")), True),
        (
            "UTC",
            "2020-05-10",
            _condition(Op.OPERATOR_EQUALS, _t(datetime(2020, 5, 10, 18, tzinfo=UTC))),
            True,
        ),
        (
            "UTC",
            "2020-05-10",
            _condition(Op.OPERATOR_BEFORE, _t(datetime(2020, 5, 11, tzinfo=UTC))),
            True,
        ),
        ("UTC", "2020-05-10", _condition(Op.OPERATOR_AFTER, _s("2020-05-10")), False),
        (
            "UTC",
            "2020-05-10",
            _condition(Op.OPERATOR_BETWEEN, _s("2020-01-01"), _s("2020-05-10")),
            True,
        ),
    ],
)
async def test_date_field_conditions(
    zone: str, joined: str, condition: spb.Condition, expected: bool
) -> None:
    assert await matches_profile(condition, _user(zone, joined), NOW, FACTS) is expected
