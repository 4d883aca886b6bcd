"""Customer fields: CreateCustomerField, ListCustomerFields, auto-definition by first write,
date fields (written, read and imported as 'YYYY-MM-DD')."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

import grpc
import pytest
from tidings.identity.v1 import customer_field_pb2 as cf
from tidings.identity.v1 import identity_service_pb2 as pb
from tidings.identity.v1 import user_pb2

from services.identity.fields import attribute_name_problem
from tests.identity.conftest import TestApp as AppKeys
from tests.identity.import_support import DATE, attribute, csv_bytes, options, upload, user
from tests.identity.support import ext, failure, n, new_id, s
from tests.identity.test_segments_support import t

if TYPE_CHECKING:
    from tidings.identity.v1.identity_service_pb2_grpc import (
        IdentityServiceAsyncStub as IdentityServiceStub,
    )


async def _create(
    stub: IdentityServiceStub, app: AppKeys, name: str, field_type: int, **extra: object
) -> cf.CustomerField:
    field: cf.CustomerField = await stub.CreateCustomerField(
        pb.CreateCustomerFieldRequest(
            field=cf.CustomerField(name=name, type=field_type, **extra)  # type: ignore[arg-type]
        ),
        metadata=app.server,
    )
    return field


async def _all(stub: IdentityServiceStub, app: AppKeys, page_size: int) -> list[cf.CustomerField]:
    fields: list[cf.CustomerField] = []
    token = ""
    while True:
        page = await stub.ListCustomerFields(
            pb.ListCustomerFieldsRequest(page_size=page_size, page_token=token),
            metadata=app.server,
        )
        fields.extend(page.fields)
        token = page.next_page_token
        if not token:
            return fields


@pytest.mark.parametrize(
    ("name", "ok"),
    [("plan", True), ("ltv_2024", True), ("Plan", False), ("2fa", False), ("email", False)],
)
def test_attribute_names(name: str, ok: bool) -> None:
    assert (attribute_name_problem(name) is None) is ok


async def test_define_and_list_fields(identity_stub: IdentityServiceStub, app: AppKeys) -> None:
    created = await _create(
        identity_stub, app, "plan", cf.FIELD_TYPE_STRING, description="Billing plan", pii=False
    )
    assert (created.name, created.type, created.auto_defined) == (
        "plan",
        cf.FIELD_TYPE_STRING,
        False,
    )
    assert created.create_time.seconds > 0
    await _create(identity_stub, app, "ltv", cf.FIELD_TYPE_NUMBER)
    await _create(identity_stub, app, "vip", cf.FIELD_TYPE_BOOL)
    await _create(identity_stub, app, "last_order", cf.FIELD_TYPE_TIMESTAMP, pii=True)
    listed = await _all(identity_stub, app, page_size=3)
    assert [f.name for f in listed] == ["last_order", "ltv", "plan", "vip"]
    assert listed[0].pii
    duplicate = await failure(_create(identity_stub, app, "plan", cf.FIELD_TYPE_NUMBER))
    assert (duplicate.code, duplicate.reason) == (
        grpc.StatusCode.ALREADY_EXISTS,
        "CUSTOMER_FIELD_EXISTS",
    )
    assert duplicate.fields == ["field.name"]


@pytest.mark.parametrize(
    ("name", "field_type", "description", "bad_field"),
    [
        ("Bad Name", cf.FIELD_TYPE_STRING, "", "field.name"),
        ("", cf.FIELD_TYPE_STRING, "", "field.name"),
        ("first_name", cf.FIELD_TYPE_STRING, "", "field.name"),
        ("a" * 65, cf.FIELD_TYPE_STRING, "", "field.name"),
        ("ok", cf.FIELD_TYPE_UNSPECIFIED, "", "field.type"),
        ("ok", cf.FIELD_TYPE_STRING, "x" * 1001, "field.description"),
    ],
)
async def test_bad_definitions_name_the_field(
    identity_stub: IdentityServiceStub,
    app: AppKeys,
    name: str,
    field_type: int,
    description: str,
    bad_field: str,
) -> None:
    bad = await failure(_create(identity_stub, app, name, field_type, description=description))
    assert (bad.code, bad.fields) == (grpc.StatusCode.INVALID_ARGUMENT, [bad_field])


async def test_first_writes_define_fields_which_can_then_be_documented(
    identity_stub: IdentityServiceStub, app: AppKeys
) -> None:
    await identity_stub.UpsertUser(
        pb.UpsertUserRequest(
            ref=ext(new_id()),
            user=user_pb2.User(attributes={"plan": s("pro"), "seats": n(3)}),
            increment_attributes={"logins": 1},
        ),
        metadata=app.server,
    )
    listed = {f.name: f for f in await _all(identity_stub, app, page_size=100)}
    assert {name: (f.type, f.auto_defined) for name, f in listed.items()} == {
        "logins": (cf.FIELD_TYPE_NUMBER, True),
        "plan": (cf.FIELD_TYPE_STRING, True),
        "seats": (cf.FIELD_TYPE_NUMBER, True),
    }
    adopted = await _create(
        identity_stub, app, "plan", cf.FIELD_TYPE_STRING, description="Billing plan", pii=True
    )
    assert (adopted.auto_defined, adopted.description, adopted.pii) == (False, "Billing plan", True)
    other_type = await failure(_create(identity_stub, app, "seats", cf.FIELD_TYPE_STRING))
    assert other_type.code == grpc.StatusCode.ALREADY_EXISTS


async def test_fields_are_per_app(
    identity_stub: IdentityServiceStub, app: AppKeys, other_app: AppKeys
) -> None:
    await _create(identity_stub, app, "plan", cf.FIELD_TYPE_NUMBER)
    # The other app is free to give "plan" another type.
    await _create(identity_stub, other_app, "plan", cf.FIELD_TYPE_STRING)
    assert [f.type for f in await _all(identity_stub, other_app, 10)] == [cf.FIELD_TYPE_STRING]
    bad_token = await failure(
        identity_stub.ListCustomerFields(
            pb.ListCustomerFieldsRequest(page_token="zzz"), metadata=app.server
        )
    )
    assert (bad_token.code, bad_token.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["page_token"])


# -- date fields -----------------------------------------------------------------------------------


async def _upsert_attribute(
    stub: IdentityServiceStub, app: AppKeys, external_id: str, name: str, value: object
) -> user_pb2.User:
    response = await stub.UpsertUser(
        pb.UpsertUserRequest(
            ref=ext(external_id),
            user=user_pb2.User(attributes={name: value}),  # type: ignore[dict-item]
        ),
        metadata=app.server,
    )
    return response.user


def t_now() -> user_pb2.AttributeValue:
    """A timestamp value (now): not what a date field holds."""
    return t(datetime.now(UTC))


async def test_a_date_field_is_written_and_read_as_yyyy_mm_dd(
    identity_stub: IdentityServiceStub, app: AppKeys
) -> None:
    created = await _create(identity_stub, app, "renews_on", cf.FIELD_TYPE_DATE)
    assert (created.type, created.auto_defined) == (cf.FIELD_TYPE_DATE, False)
    key = new_id()
    written = await _upsert_attribute(identity_stub, app, key, "renews_on", s("2024-02-29"))
    assert written.attributes["renews_on"] == s("2024-02-29")
    assert (await user(identity_stub, app, key)).attributes["renews_on"] == s("2024-02-29")
    # Anything but a valid 'YYYY-MM-DD' string is refused, naming the attribute.
    for bad in (s("2023-02-29"), s("10/05/2026"), s("2026-5-1"), s("20260501"), n(1), t_now()):
        refused = await failure(_upsert_attribute(identity_stub, app, key, "renews_on", bad))
        assert (refused.code, refused.fields) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            ["user.attributes.renews_on"],
        ), bad
    assert (await user(identity_stub, app, key)).attributes["renews_on"] == s("2024-02-29")
    # A bare string cannot say it is a date: a first write defines a string field.
    await _upsert_attribute(identity_stub, app, key, "seen_on", s("2026-05-01"))
    types = {f.name: f.type for f in await _all(identity_stub, app, 10)}
    assert types == {"renews_on": cf.FIELD_TYPE_DATE, "seen_on": cf.FIELD_TYPE_STRING}


async def test_an_import_date_column_defines_a_date_field(
    identity_stub: IdentityServiceStub, app: AppKeys
) -> None:
    key = new_id()
    rows = [["id", "joined", "renews"], [key, "10/05/2020", "2027-01-31"]]
    opts = options(attribute("joined", DATE, fmt="%d/%m/%Y"), attribute("renews", DATE))
    job = await upload(identity_stub, app, opts, csv_bytes(rows))
    assert (job.created, list(job.rejections)) == (1, [])
    types = {f.name: (f.type, f.auto_defined) for f in await _all(identity_stub, app, 10)}
    assert types == {
        "joined": (cf.FIELD_TYPE_DATE, True),
        "renews": (cf.FIELD_TYPE_DATE, True),
    }
    got = (await user(identity_stub, app, key)).attributes
    assert (got["joined"], got["renews"]) == (s("2020-05-10"), s("2027-01-31"))
