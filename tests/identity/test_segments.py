"""Segments through gRPC against the real identity process: definitions, validation with field
paths, every attribute operator, Count, ListSegmentMembers, app isolation.

Event, subscription and membership conditions are in ``test_segments_conditions.py``; the
maintainer (facts, history, Explain) in ``test_segments_membership.py``; time passing in
``test_segments_time.py``.
"""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.type import date_pb2
from tidings.identity.v1 import customer_field_pb2, user_pb2
from tidings.identity.v1 import identity_service_pb2 as pb
from tidings.identity.v1 import segment_pb2 as sp

from tests.identity.conftest import TestApp
from tests.identity.support import ext, failure
from tests.identity.test_segments_support import (
    Op,
    all_,
    any_,
    attr,
    count,
    create_segment,
    event,
    matching,
    member_external_ids,
    member_of,
    members,
    not_,
    upsert,
)
from tests.polling import eventually

GOLD = attr("attributes.plan", Op.OPERATOR_EQUALS, "gold")


# -- definitions ---------------------------------------------------------------------------------


async def test_create_get_list_update_delete(identity_stub: Any, app: TestApp) -> None:
    await upsert(identity_stub, app, "ana", {"plan": "gold"})
    await upsert(identity_stub, app, "bob", {"plan": "silver"})
    created = await identity_stub.CreateSegment(
        sp.CreateSegmentRequest(
            segment=sp.Segment(display_name="Gold", description="paying", condition=GOLD)
        ),
        metadata=app.server,
    )
    assert created.kind == sp.Segment.KIND_DYNAMIC
    assert created.member_count == 1  # materialised before the answer
    assert created.condition == GOLD
    assert created.description == "paying"
    assert created.create_time.seconds > 0

    got = await identity_stub.GetSegment(
        sp.GetSegmentRequest(segment_id=created.segment_id), metadata=app.server
    )
    assert got == created

    await create_segment(identity_stub, app, GOLD, name="Another")
    listed = await identity_stub.ListSegments(
        sp.ListSegmentsRequest(page_size=1), metadata=app.server
    )
    assert [x.display_name for x in listed.segments] == ["Another"]
    rest = await identity_stub.ListSegments(
        sp.ListSegmentsRequest(page_size=1, page_token=listed.next_page_token),
        metadata=app.server,
    )
    assert [x.display_name for x in rest.segments] == ["Gold"]
    assert rest.next_page_token == ""

    silver = attr("attributes.plan", Op.OPERATOR_EQUALS, "silver")
    updated = await identity_stub.UpdateSegment(
        sp.UpdateSegmentRequest(
            segment=sp.Segment(
                segment_id=created.segment_id, display_name="Silver", condition=silver
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name", "condition"]),
        ),
        metadata=app.server,
    )
    assert (updated.display_name, updated.description) == ("Silver", "paying")
    assert updated.condition == silver
    assert await member_external_ids(identity_stub, app, created.segment_id) == {"bob"}

    await identity_stub.DeleteSegment(
        sp.DeleteSegmentRequest(segment_id=created.segment_id), metadata=app.server
    )
    missing = await failure(
        identity_stub.GetSegment(
            sp.GetSegmentRequest(segment_id=created.segment_id), metadata=app.server
        )
    )
    assert (missing.code, missing.reason) == (grpc.StatusCode.NOT_FOUND, "SEGMENT_NOT_FOUND")


async def test_display_names_are_unique_per_app(
    identity_stub: Any, app: TestApp, other_app: TestApp
) -> None:
    for owner in (app, other_app):
        await upsert(identity_stub, owner, "ana", {"plan": "gold"})
    await create_segment(identity_stub, app, GOLD, name="VIP")
    taken = await failure(create_segment(identity_stub, app, GOLD, name="VIP"))
    assert (taken.code, taken.reason) == (grpc.StatusCode.ALREADY_EXISTS, "SEGMENT_NAME_TAKEN")
    assert taken.fields == ["segment.display_name"]
    await create_segment(identity_stub, other_app, GOLD, name="VIP")
    second = await create_segment(identity_stub, app, GOLD, name="VIP 2")
    renamed = await failure(
        identity_stub.UpdateSegment(
            sp.UpdateSegmentRequest(
                segment=sp.Segment(segment_id=second.segment_id, display_name="VIP"),
                update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
            ),
            metadata=app.server,
        )
    )
    assert renamed.code == grpc.StatusCode.ALREADY_EXISTS


async def test_another_apps_segment_is_not_found(
    identity_stub: Any, app: TestApp, other_app: TestApp
) -> None:
    await upsert(identity_stub, app, "ana", {"plan": "gold"})
    segment = await create_segment(identity_stub, app, GOLD)
    calls = [
        identity_stub.GetSegment(
            sp.GetSegmentRequest(segment_id=segment.segment_id), metadata=other_app.server
        ),
        identity_stub.DeleteSegment(
            sp.DeleteSegmentRequest(segment_id=segment.segment_id), metadata=other_app.server
        ),
        identity_stub.CountSegment(
            sp.CountSegmentRequest(segment_id=segment.segment_id), metadata=other_app.server
        ),
        identity_stub.UpdateSegment(
            sp.UpdateSegmentRequest(
                segment=sp.Segment(segment_id=segment.segment_id, display_name="x"),
                update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
            ),
            metadata=other_app.server,
        ),
        members(identity_stub, other_app, segment.segment_id),
    ]
    for call in calls:
        found = await failure(call)
        assert (found.code, found.reason) == (grpc.StatusCode.NOT_FOUND, "SEGMENT_NOT_FOUND")
    # member_of another app's segment is an unknown segment.
    bad = await failure(create_segment(identity_stub, other_app, member_of(segment.segment_id)))
    assert bad.fields == ["segment.condition.member_of.segment_id"]
    # A client key may not touch segments.
    denied = await failure(
        identity_stub.GetSegment(
            sp.GetSegmentRequest(segment_id=segment.segment_id), metadata=app.client
        )
    )
    assert denied.code == grpc.StatusCode.PERMISSION_DENIED


async def test_delete_is_refused_while_another_segment_refers_to_it(
    identity_stub: Any, app: TestApp
) -> None:
    await upsert(identity_stub, app, "ana", {"plan": "gold"})
    base = await create_segment(identity_stub, app, GOLD, name="Base")
    user = await create_segment(identity_stub, app, member_of(base.segment_id), name="User")
    refused = await failure(
        identity_stub.DeleteSegment(
            sp.DeleteSegmentRequest(segment_id=base.segment_id), metadata=app.server
        )
    )
    assert (refused.code, refused.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "SEGMENT_IN_USE",
    )
    assert "'User'" in refused.message
    await identity_stub.DeleteSegment(
        sp.DeleteSegmentRequest(segment_id=user.segment_id), metadata=app.server
    )
    await identity_stub.DeleteSegment(
        sp.DeleteSegmentRequest(segment_id=base.segment_id), metadata=app.server
    )


async def test_member_of_cycles_are_refused(identity_stub: Any, app: TestApp) -> None:
    await upsert(identity_stub, app, "ana", {"plan": "gold"})
    a = await create_segment(identity_stub, app, GOLD, name="A")
    b = await create_segment(identity_stub, app, member_of(a.segment_id), name="B")
    c = await create_segment(identity_stub, app, not_(member_of(b.segment_id)), name="C")
    for target in (c.segment_id, a.segment_id):
        cycle = await failure(
            identity_stub.UpdateSegment(
                sp.UpdateSegmentRequest(
                    segment=sp.Segment(
                        segment_id=a.segment_id, condition=all_(GOLD, member_of(target))
                    ),
                    update_mask=field_mask_pb2.FieldMask(paths=["condition"]),
                ),
                metadata=app.server,
            )
        )
        assert cycle.code == grpc.StatusCode.INVALID_ARGUMENT
        assert cycle.fields == ["segment.condition.all.conditions[1].member_of.segment_id"]
        assert "cycle" in cycle.message or cycle.reason == "INVALID_FIELDS"


# -- validation ----------------------------------------------------------------------------------


async def invalid(stub: Any, app: TestApp, condition: sp.Condition | None, **segment: Any) -> Any:
    request = sp.CreateSegmentRequest(
        segment=sp.Segment(
            display_name=segment.pop("display_name", "ok"), condition=condition, **segment
        )
    )
    found = await failure(stub.CreateSegment(request, metadata=app.server))
    assert found.code == grpc.StatusCode.INVALID_ARGUMENT, found
    return found


async def test_validation_names_each_bad_field(identity_stub: Any, app: TestApp) -> None:
    await upsert(identity_stub, app, "ana", {"plan": "gold", "age": 3})
    cases: list[tuple[sp.Condition | None, dict[str, Any], list[str]]] = [
        (None, {}, ["segment.condition"]),
        (GOLD, {"display_name": ""}, ["segment.display_name"]),
        (GOLD, {"display_name": "x" * 201}, ["segment.display_name"]),
        (GOLD, {"kind": sp.Segment.KIND_LIST}, ["segment.kind"]),
        (sp.Condition(), {}, ["segment.condition"]),
        (all_(), {}, ["segment.condition.all.conditions"]),
        (any_(), {}, ["segment.condition.any.conditions"]),
        (not_(sp.Condition()), {}, ["segment.condition.not"]),
        (attr("", Op.OPERATOR_EXISTS), {}, ["segment.condition.attribute.field"]),
        (attr("nickname", Op.OPERATOR_EXISTS), {}, ["segment.condition.attribute.field"]),
        (
            attr("attributes.undefined_thing", Op.OPERATOR_EXISTS),
            {},
            ["segment.condition.attribute.field"],
        ),
        (
            attr("first_name", Op.OPERATOR_UNSPECIFIED, "x"),
            {},
            ["segment.condition.attribute.operator"],
        ),
        # Operator / type mismatches.
        (
            attr("attributes.age", Op.OPERATOR_CONTAINS, "3"),
            {},
            ["segment.condition.attribute.operator"],
        ),
        (
            attr("first_name", Op.OPERATOR_WITHIN_LAST_DAYS, days=3),
            {},
            ["segment.condition.attribute.operator"],
        ),
        (
            attr("attributes.age", Op.OPERATOR_EQUALS, "3"),
            {},
            ["segment.condition.attribute.values[0]"],
        ),
        (
            attr("attributes.plan", Op.OPERATOR_EQUALS, 3),
            {},
            ["segment.condition.attribute.values[0]"],
        ),
        (attr("attributes.plan", Op.OPERATOR_EQUALS), {}, ["segment.condition.attribute.values"]),
        (
            attr("attributes.plan", Op.OPERATOR_EXISTS, "x"),
            {},
            ["segment.condition.attribute.values"],
        ),
        (
            attr("attributes.plan", Op.OPERATOR_EQUALS, user_pb2.AttributeValue()),
            {},
            ["segment.condition.attribute.values[0]"],
        ),
        (
            attr("attributes.age", Op.OPERATOR_BETWEEN, 5, 1),
            {},
            ["segment.condition.attribute.values"],
        ),
        (
            attr("create_time", Op.OPERATOR_WITHIN_LAST_DAYS),
            {},
            ["segment.condition.attribute.days"],
        ),
        (
            attr("first_name", Op.OPERATOR_EQUALS, "x", days=2),
            {},
            ["segment.condition.attribute.days"],
        ),
        (
            attr("birthdate", Op.OPERATOR_BEFORE, "1990-13-01"),
            {},
            ["segment.condition.attribute.values[0]"],
        ),
        # Events.
        (
            all_(GOLD, event("purchase", count=-1)),
            {},
            ["segment.condition.all.conditions[1].event.count"],
        ),
        (event(""), {}, ["segment.condition.event.name"]),
        (
            event("purchase", count_operator=sp.COUNT_OPERATOR_AT_MOST),
            {},
            ["segment.condition.event.count"],
        ),
        (
            event("purchase", within_last={"seconds": -5}),
            {},
            ["segment.condition.event.within_last"],
        ),
        (
            event("purchase", between=sp.TimeRange()),
            {},
            ["segment.condition.event.between"],
        ),
        (
            event(
                "purchase",
                first_time=sp.EventCondition.Occurrence(operator=Op.OPERATOR_BEFORE),
            ),
            {},
            ["segment.condition.event.first_time.time"],
        ),
        (
            event(
                "purchase",
                last_time=sp.EventCondition.Occurrence(operator=Op.OPERATOR_EQUALS),
            ),
            {},
            ["segment.condition.event.last_time.operator"],
        ),
        (
            event(
                "purchase",
                where=[
                    sp.PropertyCondition(
                        property="amount",
                        operator=Op.OPERATOR_CONTAINS,
                        values=[user_pb2.AttributeValue(number_value=3)],
                    )
                ],
            ),
            {},
            ["segment.condition.event.where[0].operator"],
        ),
        (
            event("purchase", where=[sp.PropertyCondition(operator=Op.OPERATOR_EXISTS)]),
            {},
            ["segment.condition.event.where[0].property"],
        ),
        (
            event(
                "purchase",
                where=[sp.PropertyCondition(property="d", operator=Op.OPERATOR_WITHIN_LAST_DAYS)],
            ),
            {},
            ["segment.condition.event.where[0].operator"],
        ),
        (
            sp.Condition(subscription=sp.SubscriptionCondition()),
            {},
            ["segment.condition.subscription.type"],
        ),
        (member_of(""), {}, ["segment.condition.member_of.segment_id"]),
        (member_of("not-an-id"), {}, ["segment.condition.member_of.segment_id"]),
        (
            member_of("00000000-0000-4000-8000-000000000000"),
            {},
            ["segment.condition.member_of.segment_id"],
        ),
    ]
    for condition, segment, fields in cases:
        found = await invalid(identity_stub, app, condition, **segment)
        assert found.fields == fields, (condition, segment, found)
    # Every problem of one request is reported at once.
    several = await invalid(
        identity_stub,
        app,
        all_(attr("nope", Op.OPERATOR_EXISTS), event("", count=-2)),
        display_name="",
    )
    assert set(several.fields) == {
        "segment.display_name",
        "segment.condition.all.conditions[0].attribute.field",
        "segment.condition.all.conditions[1].event.name",
        "segment.condition.all.conditions[1].event.count",
    }


async def test_empty_and_malformed_requests(identity_stub: Any, app: TestApp) -> None:
    for call, field in [
        (identity_stub.GetSegment(sp.GetSegmentRequest(), metadata=app.server), "segment_id"),
        (identity_stub.CountSegment(sp.CountSegmentRequest(), metadata=app.server), "segment_id"),
        (
            identity_stub.UpdateSegment(sp.UpdateSegmentRequest(), metadata=app.server),
            "segment.segment_id",
        ),
        (
            identity_stub.UpdateSegment(
                sp.UpdateSegmentRequest(
                    segment=sp.Segment(segment_id="x"),
                    update_mask=field_mask_pb2.FieldMask(paths=["kind"]),
                ),
                metadata=app.server,
            ),
            "update_mask.paths[0]",
        ),
        (
            identity_stub.ListSegments(
                sp.ListSegmentsRequest(page_token="bogus"), metadata=app.server
            ),
            "page_token",
        ),
        (
            identity_stub.ExplainSegmentMembership(
                sp.ExplainSegmentMembershipRequest(), metadata=app.server
            ),
            "segment_id",
        ),
        (
            identity_stub.CountSegment(
                sp.CountSegmentRequest(condition=event("")), metadata=app.server
            ),
            "condition.event.name",
        ),
    ]:
        found = await failure(call)
        assert found.code == grpc.StatusCode.INVALID_ARGUMENT, (field, found)
        assert field in found.fields, (field, found)
    malformed = await failure(
        identity_stub.GetSegment(sp.GetSegmentRequest(segment_id="nope"), metadata=app.server)
    )
    assert (malformed.code, malformed.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["segment_id"])
    updated = await failure(
        identity_stub.UpdateSegment(
            sp.UpdateSegmentRequest(
                segment=sp.Segment(segment_id="nope", display_name="renamed"),
                update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
            ),
            metadata=app.server,
        )
    )
    assert (updated.code, updated.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        ["segment.segment_id"],
    )
    unknown = await failure(
        identity_stub.GetSegment(
            sp.GetSegmentRequest(segment_id=str(uuid.uuid4())), metadata=app.server
        )
    )
    assert (unknown.code, unknown.reason) == (grpc.StatusCode.NOT_FOUND, "SEGMENT_NOT_FOUND")


# -- attribute operators -------------------------------------------------------------------------


@pytest.fixture
async def people(identity_stub: Any, app: TestApp) -> datetime:
    """Four users covering every attribute type; returns the time they were written."""
    now = datetime.now(UTC)
    madrid = ZoneInfo("Europe/Madrid")
    today_madrid = now.astimezone(madrid).date()
    tomorrow_utc = (now + timedelta(days=1)).date()
    await upsert(
        identity_stub,
        app,
        "ana",
        {
            "plan": "gold",
            "age": 34,
            "vip": True,
            "signup_at": datetime(2024, 1, 10, 10, tzinfo=UTC),
            # Anniversary today in her zone: four years ago, at noon local time.
            "joined_at": datetime(
                today_madrid.year - 4,
                today_madrid.month,
                min(today_madrid.day, 28),
                12,
                tzinfo=madrid,
            )
            if today_madrid.day <= 28
            else datetime(today_madrid.year - 4, today_madrid.month, 1, 12, tzinfo=madrid),
        },
        first_name="Ana",
        email="ana@example.com",
        country="ES",
        timezone="Europe/Madrid",
        birthdate=date_pb2.Date(year=1990, month=today_madrid.month, day=today_madrid.day),
    )
    await upsert(
        identity_stub,
        app,
        "bob",
        {
            "plan": "silver",
            "age": 19,
            "vip": False,
            "signup_at": datetime(2025, 6, 1, tzinfo=UTC),
            "renewal_at": now + timedelta(days=5),
        },
        first_name="Bob",
        email="bob@example.org",
        country="FR",
        # No zone: the app's default (UTC). Birthday tomorrow, year unknown.
        birthdate=date_pb2.Date(year=0, month=tomorrow_utc.month, day=tomorrow_utc.day),
    )
    await upsert(
        identity_stub,
        app,
        "cyd",
        {"plan": "Gold Plus", "age": 50, "signup_at": now - timedelta(days=3)},
    )
    await upsert(identity_stub, app, "dan")
    return now


async def test_every_attribute_operator(identity_stub: Any, app: TestApp, people: datetime) -> None:
    now = people
    everyone = {"ana", "bob", "cyd", "dan"}
    cases: list[tuple[sp.Condition, set[str]]] = [
        # Strings (custom and standard).
        (attr("attributes.plan", Op.OPERATOR_EQUALS, "gold"), {"ana"}),
        (attr("attributes.plan", Op.OPERATOR_NOT_EQUALS, "gold"), {"bob", "cyd", "dan"}),
        (attr("attributes.plan", Op.OPERATOR_IN, "gold", "silver"), {"ana", "bob"}),
        (attr("attributes.plan", Op.OPERATOR_NOT_IN, "gold"), {"bob", "cyd", "dan"}),
        (attr("attributes.plan", Op.OPERATOR_CONTAINS, "GOLD"), {"ana", "cyd"}),
        (attr("attributes.plan", Op.OPERATOR_NOT_CONTAINS, "gold"), {"bob", "dan"}),
        (attr("attributes.plan", Op.OPERATOR_STARTS_WITH, "SIL"), {"bob"}),
        (attr("attributes.plan", Op.OPERATOR_ENDS_WITH, "plus"), {"cyd"}),
        (attr("attributes.plan", Op.OPERATOR_CONTAINS, "%"), set()),  # wildcards are literal
        (attr("attributes.plan", Op.OPERATOR_EXISTS), {"ana", "bob", "cyd"}),
        (attr("attributes.plan", Op.OPERATOR_NOT_EXISTS), {"dan"}),
        (attr("attributes.plan", Op.OPERATOR_LESS_THAN, "h"), {"ana", "cyd"}),
        (attr("first_name", Op.OPERATOR_EQUALS, "Ana"), {"ana"}),
        (attr("country", Op.OPERATOR_IN, "ES", "FR"), {"ana", "bob"}),
        (attr("country", Op.OPERATOR_NOT_EXISTS), {"cyd", "dan"}),
        (attr("email", Op.OPERATOR_ENDS_WITH, "@example.com"), {"ana"}),
        (attr("external_id", Op.OPERATOR_STARTS_WITH, "c"), {"cyd"}),
        (attr("timezone", Op.OPERATOR_EQUALS, "Europe/Madrid"), {"ana"}),
        # Numbers.
        (attr("attributes.age", Op.OPERATOR_EQUALS, 34), {"ana"}),
        (attr("attributes.age", Op.OPERATOR_NOT_EQUALS, 34), {"bob", "cyd", "dan"}),
        (attr("attributes.age", Op.OPERATOR_GREATER_THAN, 34), {"cyd"}),
        (attr("attributes.age", Op.OPERATOR_GREATER_OR_EQUAL, 34), {"ana", "cyd"}),
        (attr("attributes.age", Op.OPERATOR_LESS_THAN, 34), {"bob"}),
        (attr("attributes.age", Op.OPERATOR_LESS_OR_EQUAL, 34), {"ana", "bob"}),
        (attr("attributes.age", Op.OPERATOR_BETWEEN, 19, 34), {"ana", "bob"}),
        (attr("attributes.age", Op.OPERATOR_IN, 19, 50), {"bob", "cyd"}),
        (attr("attributes.age", Op.OPERATOR_NOT_IN, 19), {"ana", "cyd", "dan"}),
        # Booleans.
        (attr("attributes.vip", Op.OPERATOR_EQUALS, True), {"ana"}),
        (attr("attributes.vip", Op.OPERATOR_NOT_EQUALS, True), {"bob", "cyd", "dan"}),
        (attr("attributes.vip", Op.OPERATOR_EXISTS), {"ana", "bob"}),
        # Timestamps.
        (
            attr("attributes.signup_at", Op.OPERATOR_BEFORE, datetime(2025, 1, 1, tzinfo=UTC)),
            {"ana"},
        ),
        (
            attr("attributes.signup_at", Op.OPERATOR_AFTER, datetime(2025, 1, 1, tzinfo=UTC)),
            {"bob", "cyd"},
        ),
        (
            attr(
                "attributes.signup_at",
                Op.OPERATOR_BETWEEN,
                datetime(2024, 1, 1, tzinfo=UTC),
                datetime(2025, 6, 1, tzinfo=UTC),
            ),
            {"ana", "bob"},
        ),
        (attr("attributes.signup_at", Op.OPERATOR_WITHIN_LAST_DAYS, days=7), {"cyd"}),
        (attr("attributes.renewal_at", Op.OPERATOR_WITHIN_NEXT_DAYS, days=7), {"bob"}),
        (attr("attributes.renewal_at", Op.OPERATOR_WITHIN_NEXT_DAYS, days=2), set()),
        (attr("attributes.joined_at", Op.OPERATOR_ANNIVERSARY_IN_DAYS, days=0), {"ana"}),
        (attr("create_time", Op.OPERATOR_WITHIN_LAST_DAYS, days=1), everyone),
        (attr("create_time", Op.OPERATOR_AFTER, now + timedelta(hours=1)), set()),
        # Birthdates: ana's birthday is today in Madrid, bob's tomorrow in UTC (year unknown).
        (attr("birthdate", Op.OPERATOR_ANNIVERSARY_IN_DAYS, days=0), {"ana"}),
        (attr("birthdate", Op.OPERATOR_ANNIVERSARY_IN_DAYS, days=1), {"bob"}),
        (attr("birthdate", Op.OPERATOR_EXISTS), {"ana", "bob"}),
        (attr("birthdate", Op.OPERATOR_BEFORE, "2000-01-01"), {"ana"}),
        (attr("birthdate", Op.OPERATOR_AFTER, datetime(1980, 1, 1, tzinfo=UTC)), {"ana"}),
        # and / or / not, with users missing the field.
        (not_(attr("attributes.plan", Op.OPERATOR_EQUALS, "gold")), {"bob", "cyd", "dan"}),
        (not_(attr("attributes.age", Op.OPERATOR_GREATER_THAN, 30)), {"bob", "dan"}),
        (
            all_(
                attr("attributes.age", Op.OPERATOR_GREATER_THAN, 18),
                attr("attributes.plan", Op.OPERATOR_CONTAINS, "gold"),
            ),
            {"ana", "cyd"},
        ),
        (
            any_(
                attr("attributes.vip", Op.OPERATOR_EQUALS, True),
                attr("attributes.age", Op.OPERATOR_GREATER_THAN, 40),
            ),
            {"ana", "cyd"},
        ),
        (
            not_(
                any_(
                    attr("attributes.vip", Op.OPERATOR_EQUALS, True),
                    attr("country", Op.OPERATOR_EQUALS, "FR"),
                )
            ),
            {"cyd", "dan"},
        ),
        (not_(not_(attr("attributes.plan", Op.OPERATOR_EXISTS))), {"ana", "bob", "cyd"}),
    ]
    for condition, expected in cases:
        got = await matching(identity_stub, app, condition)
        assert got == expected, (condition, got)
        assert await count(identity_stub, app, condition) == len(expected), condition


async def test_app_default_timezone_decides_birthdays(identity_stub: Any, apps_stub: Any) -> None:
    from tidings.identity.v1 import app_pb2

    from tests.identity.conftest import create_test_app

    now = datetime.now(UTC)
    # Kiritimati (UTC+14) differs from UTC's date from 10:00 UTC on, Pago Pago (UTC-11) until
    # 11:00 UTC: at any moment one of them has another date.
    zone = next(
        z
        for z in ("Pacific/Kiritimati", "Pacific/Pago_Pago")
        if now.astimezone(ZoneInfo(z)).date() != now.date()
    )
    local_today = now.astimezone(ZoneInfo(zone)).date()
    app = await create_test_app(apps_stub, app_pb2.AppSettings(default_timezone=zone))
    await upsert(
        identity_stub,
        app,
        "local",
        birthdate=date_pb2.Date(year=1990, month=local_today.month, day=local_today.day),
    )
    utc_today = now.date()
    await upsert(
        identity_stub,
        app,
        "utc",
        timezone="UTC",
        birthdate=date_pb2.Date(year=1990, month=utc_today.month, day=utc_today.day),
    )
    today = attr("birthdate", Op.OPERATOR_ANNIVERSARY_IN_DAYS, days=0)
    assert await matching(identity_stub, app, today) == {"local", "utc"}


async def test_date_field_conditions_compare_calendar_days(
    identity_stub: Any, app: TestApp
) -> None:
    """A date field is compared as a calendar day: relative operators count from each user's
    local today, and the stored date is never moved to a zone."""
    for name in ("renews_on", "joined_on"):
        await identity_stub.CreateCustomerField(
            pb.CreateCustomerFieldRequest(
                field=customer_field_pb2.CustomerField(
                    name=name, type=customer_field_pb2.FIELD_TYPE_DATE
                )
            ),
            metadata=app.server,
        )
    now = datetime.now(UTC)
    # UTC+14 and UTC-11: 25 hours apart, so their dates always differ, and at least one of
    # them differs from UTC's.
    kiri_zone, pago_zone = "Pacific/Kiritimati", "Pacific/Pago_Pago"
    kiri_today = now.astimezone(ZoneInfo(kiri_zone)).date()
    pago_today = now.astimezone(ZoneInfo(pago_zone)).date()

    def years_before(day: date) -> str:  # the same day (Feb 29 included) four years before
        return day.replace(year=day.year - 4).isoformat()

    await upsert(
        identity_stub,
        app,
        "kiri",
        {
            "renews_on": (kiri_today + timedelta(days=3)).isoformat(),
            "joined_on": years_before(kiri_today),
        },
        timezone=kiri_zone,
    )
    await upsert(
        identity_stub,
        app,
        "pago",
        {
            "renews_on": (pago_today - timedelta(days=2)).isoformat(),
            "joined_on": years_before(pago_today),
        },
        timezone=pago_zone,
    )
    await upsert(identity_stub, app, "utc", {"renews_on": "2020-05-10", "joined_on": "2020-05-10"})
    await upsert(identity_stub, app, "nobody")
    renews = "attributes.renews_on"
    cases: list[tuple[sp.Condition, set[str]]] = [
        (attr(renews, Op.OPERATOR_EQUALS, "2020-05-10"), {"utc"}),
        # A point in time compares by its UTC date.
        (attr(renews, Op.OPERATOR_EQUALS, datetime(2020, 5, 10, 23, tzinfo=UTC)), {"utc"}),
        (attr(renews, Op.OPERATOR_NOT_EQUALS, "2020-05-10"), {"kiri", "pago", "nobody"}),
        (attr(renews, Op.OPERATOR_BEFORE, "2021-01-01"), {"utc"}),
        (attr(renews, Op.OPERATOR_AFTER, "2021-01-01"), {"kiri", "pago"}),
        (attr(renews, Op.OPERATOR_BETWEEN, "2020-05-10", "2020-05-10"), {"utc"}),
        (attr(renews, Op.OPERATOR_EXISTS), {"kiri", "pago", "utc"}),
        (attr(renews, Op.OPERATOR_WITHIN_NEXT_DAYS, days=3), {"kiri"}),
        (attr(renews, Op.OPERATOR_WITHIN_NEXT_DAYS, days=2), set()),
        (attr(renews, Op.OPERATOR_WITHIN_LAST_DAYS, days=2), {"pago"}),
        (attr(renews, Op.OPERATOR_WITHIN_LAST_DAYS, days=1), set()),
        # Each on their own local day, which are never the same day.
        (attr("attributes.joined_on", Op.OPERATOR_ANNIVERSARY_IN_DAYS, days=0), {"kiri", "pago"}),
        (not_(attr(renews, Op.OPERATOR_WITHIN_NEXT_DAYS, days=3)), {"pago", "utc", "nobody"}),
    ]
    for condition, expected in cases:
        got = await matching(identity_stub, app, condition)
        assert got == expected, (condition, got)
        assert await count(identity_stub, app, condition) == len(expected), condition
    refused = [
        (attr(renews, Op.OPERATOR_IN, "2020-05-10"), "segment.condition.attribute.operator"),
        (attr(renews, Op.OPERATOR_CONTAINS, "2020"), "segment.condition.attribute.operator"),
        (attr(renews, Op.OPERATOR_EQUALS, "2020-5-10"), "segment.condition.attribute.values[0]"),
        (attr(renews, Op.OPERATOR_EQUALS, 2020), "segment.condition.attribute.values[0]"),
        (
            attr(renews, Op.OPERATOR_BETWEEN, "2021-01-01", "2020-01-01"),
            "segment.condition.attribute.values",
        ),
    ]
    for condition, field in refused:
        assert (await invalid(identity_stub, app, condition)).fields == [field], condition


# -- Count ---------------------------------------------------------------------------------------


async def test_count_of_a_saved_segment_is_now(identity_stub: Any, app: TestApp) -> None:
    await upsert(identity_stub, app, "ana", {"plan": "gold"})
    segment = await create_segment(identity_stub, app, GOLD)
    for external_id in ("bob", "cyd"):
        await upsert(identity_stub, app, external_id, {"plan": "gold"})
    counted = await identity_stub.CountSegment(
        sp.CountSegmentRequest(segment_id=segment.segment_id), metadata=app.server
    )
    assert counted.count == 3
    assert await count(identity_stub, app, not_(GOLD)) == 0


# -- ListSegmentMembers --------------------------------------------------------------------------


async def test_members_stream_in_pages_from_one_snapshot(identity_stub: Any, app: TestApp) -> None:
    total = 2_300  # more than two internal pages
    for start in range(0, total, 1000):
        await identity_stub.BatchUpsertUsers(
            pb.BatchUpsertUsersRequest(
                requests=[
                    pb.UpsertUserRequest(
                        ref=ext(f"m-{i:05d}"),
                        user=user_pb2.User(
                            attributes={"plan": user_pb2.AttributeValue(string_value="gold")}
                        ),
                    )
                    for i in range(start, min(start + 1000, total))
                ]
            ),
            metadata=app.server,
        )
    segment = await create_segment(identity_stub, app, GOLD)
    assert segment.member_count == total
    call = identity_stub.ListSegmentMembers(
        sp.ListSegmentMembersRequest(segment_id=segment.segment_id), metadata=app.server
    )
    first = await call.read()
    # While the stream is open, 300 members leave.
    await identity_stub.BatchUpsertUsers(
        pb.BatchUpsertUsersRequest(
            requests=[
                pb.UpsertUserRequest(
                    ref=ext(f"m-{i:05d}"),
                    user=user_pb2.User(
                        attributes={"plan": user_pb2.AttributeValue(string_value="silver")}
                    ),
                )
                for i in range(total - 300, total)
            ]
        ),
        metadata=app.server,
    )

    async def member_count() -> int:
        got = await identity_stub.GetSegment(
            sp.GetSegmentRequest(segment_id=segment.segment_id), metadata=app.server
        )
        return int(got.member_count)

    await eventually(
        member_count, lambda n: n == total - 300, within=20, what="300 members leaving"
    )
    streamed = [first]
    while (member := await call.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
        streamed.append(member)
    ids = [m.user_id for m in streamed]
    assert len(ids) == total == len(set(ids))  # each member of the snapshot exactly once
    assert ids == sorted(ids)
    assert {m.external_id for m in streamed} == {f"m-{i:05d}" for i in range(total)}
    assert all(m.enter_time.seconds > 0 for m in streamed)
    # A new stream sees the change.
    assert len(await members(identity_stub, app, segment.segment_id)) == total - 300


async def test_members_after_a_user_id_resume_by_id(identity_stub: Any, app: TestApp) -> None:
    by_id = {}
    for name in ("ana", "bob", "cyd", "dan", "eve"):
        by_id[await upsert(identity_stub, app, name, {"plan": "gold"})] = name
    segment = await create_segment(identity_stub, app, GOLD)
    ids = [m.user_id for m in await members(identity_stub, app, segment.segment_id)]
    assert ids == sorted(by_id)
    for i, after in enumerate(ids):
        after_it = await members(identity_stub, app, segment.segment_id, after)
        assert [m.user_id for m in after_it] == ids[i + 1 :]
    # The cursor need not be a member now (the last one handled may have left since).
    lowest = ids[0]
    await upsert(identity_stub, app, by_id[lowest], {"plan": "free"})
    await eventually(
        lambda: members(identity_stub, app, segment.segment_id),
        lambda found: len(found) == 4,
        what="the lowest member left",
    )
    after_it = await members(identity_stub, app, segment.segment_id, lowest)
    assert [m.user_id for m in after_it] == ids[1:]


async def test_members_after_a_malformed_user_id_is_refused(
    identity_stub: Any, app: TestApp
) -> None:
    await upsert(identity_stub, app, "ana", {"plan": "gold"})
    segment = await create_segment(identity_stub, app, GOLD)
    found = await failure(members(identity_stub, app, segment.segment_id, "not-an-id"))
    assert found.code == grpc.StatusCode.INVALID_ARGUMENT
    assert found.fields == ["after_user_id"]
    both = await failure(members(identity_stub, app, "nope", "not-an-id"))
    assert both.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(both.fields) == {"segment_id", "after_user_id"}


# -- grpcurl (docs/segments.md) ------------------------------------------------------------------


async def test_a_segment_created_and_counted_with_grpcurl(
    identity_process: Any, identity_stub: Any, app: TestApp
) -> None:
    import json

    from tests.e2e.processes import grpcurl

    await upsert(identity_stub, app, "crm-42", {"plan": "gold"}, country="ES")
    await upsert(identity_stub, app, "crm-43", {"plan": "free"}, country="PT")

    async def g(payload: str, method: str) -> dict[str, Any]:
        result = await grpcurl(
            "-H",
            f"authorization: Bearer {app.server_key}",
            "-d",
            payload,
            identity_process.grpc_target,
            f"tidings.identity.v1.IdentityService/{method}",
        )
        assert result.returncode == 0, result.stderr
        answer: dict[str, Any] = json.loads(result.stdout) if result.stdout.strip() else {}
        return answer

    created = await g(
        """{"segment": {"display_name": "Gold buyers", "condition": {"all": {"conditions": [
            {"attribute": {"field": "attributes.plan", "operator": "OPERATOR_EQUALS",
                           "values": [{"string_value": "gold"}]}},
            {"event": {"name": "purchase", "count": 0, "count_operator": "COUNT_OPERATOR_AT_MOST",
                       "within_last": "2592000s"}}]}}}}""",
        "CreateSegment",
    )
    assert created["kind"] == "KIND_DYNAMIC", created
    assert created["member_count"] == "1"
    counted = await g(json.dumps({"segment_id": created["segment_id"]}), "CountSegment")
    assert counted == {"count": "1"}
    preview = await g(
        """{"condition": {"attribute": {"field": "country", "operator": "OPERATOR_IN",
            "values": [{"string_value": "ES"}, {"string_value": "PT"}]}}}""",
        "CountSegment",
    )
    assert preview == {"count": "2"}
    explained = await g(
        json.dumps({"segment_id": created["segment_id"], "user": {"external_id": "crm-42"}}),
        "ExplainSegmentMembership",
    )
    assert explained["member"] is True
