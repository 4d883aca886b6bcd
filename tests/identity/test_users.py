"""Profiles: UpsertUser, BatchUpsertUsers, GetUser, BatchGetUsers, ListUsers, and their rules.

Pure tests of the domain first (masks, typing, the in-order fold of a batch), then the same
rules through the real gRPC server, and the change feed on ``identity.changes``.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.type import date_pb2
from tidings.events.v1.identity_change_pb2 import IdentityChange
from tidings.identity.v1 import app_pb2, user_pb2, user_ref_pb2
from tidings.identity.v1 import identity_service_pb2 as pb

from services.identity.fields import CustomerField, FieldCatalog, FieldType
from services.identity.refs import ByAlias, ByExternalId, ByUserId
from services.identity.users import (
    MAX_ATTRIBUTES,
    BatchPlan,
    InvalidValue,
    UpsertRequest,
    UserFields,
    UserWrite,
    apply_write,
    changed_fields,
    decode_page_token,
    encode_page_token,
    prepare_write,
)
from services.identity.users_store import Birthdate, Profile, new_user_ids
from services.runtime.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from tests.identity.conftest import TestApp as AppKeys
from tests.identity.conftest import create_test_app
from tests.identity.support import (
    NULL,
    ChangeFeed,
    b,
    by_alias,
    by_id,
    ext,
    failure,
    item_failure,
    n,
    new_id,
    s,
)

if TYPE_CHECKING:
    from tidings.identity.v1.identity_service_pb2_grpc import (
        IdentityServiceAsyncStub as IdentityServiceStub,
    )

AT = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TODAY = AT.date()

# -- pure domain ---------------------------------------------------------------------------------


def _prepare(
    user: UserFields, mask: tuple[str, ...] = (), increments: dict[str, float] | None = None
) -> UserWrite:
    return prepare_write(
        UpsertRequest(
            ref=ByExternalId("c1"), user=user, update_mask=mask, increments=increments or {}
        ),
        today=TODAY,
    )


def _violations(error: pytest.ExceptionInfo[InvalidArgument]) -> list[str]:
    return [v.field for v in error.value.field_violations]


def _profile(**values: object) -> Profile:
    profile = Profile(user_id=uuid.uuid4(), create_time=AT, update_time=AT)
    for name, value in values.items():
        setattr(profile, name, value)
    return profile


def test_an_empty_mask_writes_what_is_set_and_normalises_it() -> None:
    write = _prepare(
        UserFields(
            first_name="Ana",
            email="Ana@Example.COM",
            phone="+34 600 111 222",
            timezone="europe/madrid",
            language="pt_br",
            country="es",
            birthdate=(0, 2, 29),
            attributes={"plan": "pro", "old": None},
        )
    )
    assert write.standard == {
        "first_name": "Ana",
        "email": "Ana@example.com",
        "phone": "+34600111222",
        "timezone": "Europe/Madrid",
        "language": "pt-BR",
        "country": "ES",
        "birthdate": Birthdate(month=2, day=29, year=None),
    }
    assert write.attributes == {"plan": "pro", "old": None}
    assert not write.replace_attributes


def test_every_bad_standard_field_is_named_at_once() -> None:
    with pytest.raises(InvalidArgument) as error:
        _prepare(
            UserFields(
                first_name="x" * 201,
                email="nope",
                phone="600",
                timezone="Mars/Base",
                language="xx",
                country="XX",
                birthdate=(2023, 2, 29),
            )
        )
    assert sorted(_violations(error)) == sorted(
        f"user.{name}"
        for name in (
            "first_name",
            "email",
            "phone",
            "timezone",
            "language",
            "country",
            "birthdate",
        )
    )


@pytest.mark.parametrize(
    "birthdate", [(2000, 13, 1), (2000, 4, 31), (1999, 2, 29), (2999, 1, 1), (0, 0, 0)]
)
def test_bad_birthdates(birthdate: tuple[int, int, int]) -> None:
    with pytest.raises(InvalidArgument) as error:
        _prepare(UserFields(birthdate=birthdate))
    assert _violations(error) == ["user.birthdate"]


def test_a_mask_writes_exactly_its_paths_and_clears_empty_ones() -> None:
    write = _prepare(
        UserFields(first_name="", last_name="Ignored", attributes={"a": "1", "b": "2"}),
        mask=("first_name", "attributes.a", "attributes.gone"),
    )
    assert write.standard == {"first_name": None}
    assert write.attributes == {"a": "1", "gone": None}
    replace = _prepare(UserFields(attributes={"a": "1", "b": None}), mask=("attributes",))
    assert replace.replace_attributes
    assert replace.attributes == {"a": "1"}


def test_bad_mask_paths_and_attribute_problems_are_named() -> None:
    with pytest.raises(InvalidArgument) as error:
        _prepare(
            UserFields(attributes={"Bad-Name": "x", "big": "x" * 1001, "kind": InvalidValue("?")}),
            mask=("nickname", "user_id", "attributes"),
        )
    assert sorted(_violations(error)) == [
        "update_mask",
        "update_mask",
        "user.attributes.Bad-Name",
        "user.attributes.big",
        "user.attributes.kind",
    ]


def test_increments_must_be_finite_and_not_also_set() -> None:
    with pytest.raises(InvalidArgument) as error:
        _prepare(
            UserFields(attributes={"visits": 1.0}),
            increments={"visits": 1.0, "score": float("nan")},
        )
    assert sorted(_violations(error)) == [
        "increment_attributes.score",
        "increment_attributes.visits",
    ]


def test_the_external_id_must_match_an_external_id_ref() -> None:
    with pytest.raises(InvalidArgument) as error:
        _prepare(UserFields(external_id="c2"))
    assert _violations(error) == ["user.external_id"]


def test_attributes_are_typed_by_their_fields() -> None:
    catalog = FieldCatalog({"plan": CustomerField("plan", FieldType.STRING)}, auto_define=True)
    write = UserWrite(ref=ByExternalId("c1"), attributes={"plan": 3.0})
    with pytest.raises(InvalidArgument) as error:
        apply_write(_profile(), write, catalog)
    assert _violations(error) == ["user.attributes.plan"]
    moment = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    new, defined = apply_write(
        _profile(),
        UserWrite(ref=ByExternalId("c1"), attributes={"plan": "pro", "seen": moment}),
        catalog,
    )
    assert new.attributes == {"plan": "pro", "seen": "2026-01-02T03:04:05.000000Z"}
    assert defined == [CustomerField("seen", FieldType.TIMESTAMP, auto_defined=True)]


def test_date_fields_hold_yyyy_mm_dd_strings() -> None:
    catalog = FieldCatalog(
        {"renews_on": CustomerField("renews_on", FieldType.DATE)}, auto_define=True
    )
    new, defined = apply_write(
        _profile(),
        UserWrite(ref=ByExternalId("c1"), attributes={"renews_on": "2028-02-29"}),
        catalog,
    )
    assert (new.attributes, defined) == ({"renews_on": "2028-02-29"}, [])
    moment = datetime(2026, 1, 2, tzinfo=UTC)
    for bad, reason in (("2027-02-29", "INVALID_DATE"), (moment, "FIELD_TYPE_MISMATCH")):
        write = UserWrite(ref=ByExternalId("c1"), attributes={"renews_on": bad})
        with pytest.raises(InvalidArgument) as error:
            apply_write(_profile(), write, catalog)
        [violation] = error.value.field_violations
        assert (violation.field, violation.reason) == ("user.attributes.renews_on", reason)
        assert "date" in violation.description


def test_undefined_fields_are_refused_when_the_app_says_so() -> None:
    catalog = FieldCatalog({}, auto_define=False)
    with pytest.raises(InvalidArgument) as error:
        apply_write(_profile(), UserWrite(ref=ByExternalId("c1"), attributes={"x": True}), catalog)
    assert error.value.field_violations[0].reason == "UNDEFINED_FIELD"


def test_increments_add_to_numbers_and_null_removes() -> None:
    catalog = FieldCatalog({}, auto_define=True)
    profile = _profile(attributes={"visits": 2.0, "plan": "pro"})
    new, _ = apply_write(
        profile,
        UserWrite(
            ref=ByExternalId("c1"),
            attributes={"plan": None},
            increments={"visits": 3.0, "fresh": 1.5},
        ),
        catalog,
    )
    assert new.attributes == {"visits": 5.0, "fresh": 1.5}
    assert profile.attributes == {"visits": 2.0, "plan": "pro"}  # pure: input untouched
    with pytest.raises(InvalidArgument):
        apply_write(
            _profile(attributes={"visits": 1e308}),
            UserWrite(ref=ByExternalId("c1"), increments={"visits": 1e308}),
            catalog,
        )


def test_the_attribute_limit_is_resource_exhausted() -> None:
    catalog = FieldCatalog({}, auto_define=True)
    full = _profile(attributes={f"a{i}": 1.0 for i in range(MAX_ATTRIBUTES)})
    with pytest.raises(ResourceExhausted):
        apply_write(full, UserWrite(ref=ByExternalId("c1"), attributes={"one_more": 1.0}), catalog)
    # Changing one of the hundred is fine.
    apply_write(full, UserWrite(ref=ByExternalId("c1"), attributes={"a1": 2.0}), catalog)


def test_an_external_id_cannot_change() -> None:
    catalog = FieldCatalog({}, auto_define=True)
    with pytest.raises(FailedPrecondition):
        apply_write(
            _profile(external_id="a"), UserWrite(ref=ByExternalId("a"), external_id="b"), catalog
        )


def test_changed_fields_names_standard_fields_and_attributes() -> None:
    before = _profile(first_name="Ana", attributes={"plan": "pro", "n": 1.0, "flag": True})
    after = _profile(
        user_id=before.user_id, first_name="Eva", attributes={"plan": "pro", "n": True}
    )
    assert changed_fields(before, after) == ["first_name", "attributes.flag", "attributes.n"]
    assert changed_fields(None, _profile(external_id="x")) == ["external_id"]


def test_a_batch_folds_items_on_the_same_user_in_order() -> None:
    existing = _profile(external_id="known", attributes={"n": 1.0})
    plan = BatchPlan(
        {ByExternalId("known"): existing.user_id},
        {existing.user_id: existing},
        FieldCatalog({}, auto_define=True),
        iter(new_user_ids(10)),
        AT,
    )
    first, created = plan.apply(0, UserWrite(ref=ByExternalId("new"), standard={"first_name": "A"}))
    assert created
    again, created = plan.apply(1, UserWrite(ref=ByExternalId("new"), standard={"last_name": "B"}))
    assert (again, created) == (first, False)
    plan.apply(2, UserWrite(ref=ByExternalId("known"), increments={"n": 2.0}))
    plan.apply(3, UserWrite(ref=ByExternalId("known"), increments={"n": 3.0}))
    # The alias-created user gets an external id another new user of the batch holds: refused.
    with pytest.raises(AlreadyExists):
        plan.apply(4, UserWrite(ref=ByAlias("crm", "1"), external_id="new"))
    with pytest.raises(NotFound):
        plan.apply(5, UserWrite(ref=ByUserId(uuid.uuid4())))
    created_profiles, updated, aliases, facts = plan.finish("app")
    assert [(p.first_name, p.last_name) for p in created_profiles] == [("A", "B")]
    assert [p.attributes for p in updated] == [{"n": 6.0}]
    assert aliases == []  # the alias item failed, so nothing of it is written
    kinds = sorted(fact.kind for fact in facts)
    assert kinds == [IdentityChange.KIND_USER_CREATED, IdentityChange.KIND_USER_UPDATED]


def test_an_unchanged_user_publishes_nothing() -> None:
    existing = _profile(external_id="same", first_name="Ana")
    plan = BatchPlan(
        {ByExternalId("same"): existing.user_id},
        {existing.user_id: existing},
        FieldCatalog({}, auto_define=True),
        iter(new_user_ids(1)),
        AT,
    )
    plan.apply(0, UserWrite(ref=ByExternalId("same"), standard={"first_name": "Ana"}))
    assert plan.finish("app") == ([], [], [], [])


def test_page_tokens_round_trip_and_refuse_forgeries() -> None:
    token = encode_page_token("users", {"t": "x", "u": "y"})
    assert decode_page_token("users", token) == {"t": "x", "u": "y"}
    for bad in ("garbage!", encode_page_token("fields", {"n": "a"}), "e30"):
        with pytest.raises(InvalidArgument):
            decode_page_token("users", bad)


def test_user_ids_are_time_ordered_uuid7() -> None:
    ids = new_user_ids(3)
    assert all(i.version == 7 for i in ids)
    assert len(set(ids)) == 3


# -- through the gRPC server ---------------------------------------------------------------------


async def _upsert(
    stub: IdentityServiceStub,
    app: AppKeys,
    ref: user_ref_pb2.UserRef,
    mask: list[str] | None = None,
    increments: dict[str, float] | None = None,
    **user: object,
) -> pb.UpsertUserResponse:
    request = pb.UpsertUserRequest(
        ref=ref,
        user=user_pb2.User(**user),  # type: ignore[arg-type]
        update_mask=field_mask_pb2.FieldMask(paths=mask or []),
        increment_attributes=increments or {},
    )
    response: pb.UpsertUserResponse = await stub.UpsertUser(request, metadata=app.server)
    return response


async def _get(stub: IdentityServiceStub, app: AppKeys, ref: user_ref_pb2.UserRef) -> user_pb2.User:
    user: user_pb2.User = await stub.GetUser(pb.GetUserRequest(ref=ref), metadata=app.server)
    return user


async def test_upsert_by_external_id_creates_then_updates(
    identity_stub: IdentityServiceStub, app: AppKeys
) -> None:
    cid = new_id()
    first = await _upsert(
        identity_stub,
        app,
        ext(cid),
        first_name="Ana",
        email="Ana@Example.com",
        birthdate=date_pb2.Date(year=0, month=2, day=29),
    )
    assert first.created
    assert first.user.external_id == cid
    assert first.user.email == "Ana@example.com"
    second = await _upsert(identity_stub, app, ext(cid), last_name="Pérez")
    assert not second.created
    assert second.user.user_id == first.user.user_id
    got = await _get(identity_stub, app, ext(cid))
    assert (got.first_name, got.last_name) == ("Ana", "Pérez")
    assert (got.birthdate.year, got.birthdate.month, got.birthdate.day) == (0, 2, 29)
    assert got.update_time.ToDatetime() >= got.create_time.ToDatetime()
    assert got == await _get(identity_stub, app, by_id(first.user.user_id))


async def test_bad_standard_attributes_name_each_field(
    identity_stub: IdentityServiceStub, app: AppKeys
) -> None:
    result = await failure(
        _upsert(
            identity_stub,
            app,
            ext(new_id()),
            email="ana@",
            phone="12345",
            timezone="Europe/Nowhere",
            language="klingon",
            country="ZZ",
        )
    )
    assert result.code == grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(result.fields) == [
        "user.country",
        "user.email",
        "user.language",
        "user.phone",
        "user.timezone",
    ]


@pytest.mark.parametrize("bad", ["", "null", "undefined", "0", "-1", "  ", "[object Object]"])
async def test_placeholder_external_ids_are_refused(
    identity_stub: IdentityServiceStub, app: AppKeys, bad: str
) -> None:
    result = await failure(_upsert(identity_stub, app, ext(bad), first_name="x"))
    assert result.code == grpc.StatusCode.INVALID_ARGUMENT
    assert result.fields == ["ref.external_id"]


async def test_refs_that_must_exist(identity_stub: IdentityServiceStub, app: AppKeys) -> None:
    missing_user = await failure(_upsert(identity_stub, app, by_id(str(uuid.uuid4()))))
    assert (missing_user.code, missing_user.reason) == (grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND")
    missing_sub = await failure(
        _upsert(identity_stub, app, user_ref_pb2.UserRef(subscription_id=str(uuid.uuid4())))
    )
    assert missing_sub.code == grpc.StatusCode.NOT_FOUND
    malformed = await failure(_upsert(identity_stub, app, by_id("not-a-uuid")))
    assert (malformed.code, malformed.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["ref.user_id"])
    unset = await failure(_upsert(identity_stub, app, user_ref_pb2.UserRef()))
    assert (unset.code, unset.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["ref"])
    not_found = await failure(_get(identity_stub, app, ext(new_id())))
    assert not_found.code == grpc.StatusCode.NOT_FOUND


async def test_external_id_is_set_once_and_never_shared(
    identity_stub: IdentityServiceStub, app: AppKeys
) -> None:
    label_value = new_id("crm")
    anonymous = await _upsert(identity_stub, app, by_alias("crm_id", label_value), first_name="A")
    assert anonymous.created
    assert anonymous.user.external_id == ""
    cid = new_id()
    named = await _upsert(identity_stub, app, by_id(anonymous.user.user_id), external_id=cid)
    assert named.user.external_id == cid
    changed = await failure(
        _upsert(identity_stub, app, by_id(anonymous.user.user_id), external_id=new_id())
    )
    assert (changed.code, changed.reason, changed.fields) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "EXTERNAL_ID_IMMUTABLE",
        ["user.external_id"],
    )
    other = await _upsert(identity_stub, app, by_alias("crm_id", new_id("crm")))
    taken = await failure(_upsert(identity_stub, app, by_id(other.user.user_id), external_id=cid))
    assert (taken.code, taken.reason) == (grpc.StatusCode.ALREADY_EXISTS, "EXTERNAL_ID_TAKEN")
    mismatch = await failure(_upsert(identity_stub, app, ext(cid), external_id=new_id()))
    assert (mismatch.code, mismatch.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        ["user.external_id"],
    )


async def test_update_masks(identity_stub: IdentityServiceStub, app: AppKeys) -> None:
    cid = new_id()
    await _upsert(
        identity_stub,
        app,
        ext(cid),
        first_name="Ana",
        last_name="Ruiz",
        country="ES",
        attributes={"plan": s("pro"), "seats": n(3), "vip": b(True)},
    )
    masked = await _upsert(
        identity_stub,
        app,
        ext(cid),
        mask=["first_name", "attributes.seats", "attributes.vip"],
        last_name="Ignored",
        attributes={"seats": n(5)},
    )
    user = masked.user
    assert (user.first_name, user.last_name, user.country) == ("", "Ruiz", "ES")
    assert dict(user.attributes) == {"plan": s("pro"), "seats": n(5)}
    replaced = await _upsert(
        identity_stub, app, ext(cid), mask=["attributes"], attributes={"plan": s("free")}
    )
    assert dict(replaced.user.attributes) == {"plan": s("free")}
    bad = await failure(_upsert(identity_stub, app, ext(cid), mask=["nickname"]))
    assert (bad.code, bad.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["update_mask"])


async def test_custom_attributes_are_typed_removed_and_incremented(
    identity_stub: IdentityServiceStub, app: AppKeys
) -> None:
    cid = new_id()
    await _upsert(identity_stub, app, ext(cid), attributes={"plan": s("pro"), "visits": n(1)})
    mismatch = await failure(_upsert(identity_stub, app, ext(cid), attributes={"plan": n(2)}))
    assert (mismatch.code, mismatch.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        ["user.attributes.plan"],
    )
    # The type sticks for every user of the app, not only this one.
    other = await failure(_upsert(identity_stub, app, ext(new_id()), attributes={"plan": b(True)}))
    assert other.fields == ["user.attributes.plan"]
    after = await _upsert(
        identity_stub, app, ext(cid), attributes={"plan": NULL}, increments={"visits": 2.5}
    )
    assert dict(after.user.attributes) == {"visits": n(3.5)}
    not_a_number = await failure(_upsert(identity_stub, app, ext(new_id()), increments={"plan": 1}))
    assert not_a_number.fields == ["increment_attributes.plan"]
    moment = datetime(2026, 1, 31, 9, 30, 15, 123456, tzinfo=UTC)
    stamp = user_pb2.AttributeValue()
    stamp.timestamp_value.FromDatetime(moment)
    timed = await _upsert(identity_stub, app, ext(cid), attributes={"last_order": stamp})
    assert timed.user.attributes["last_order"] == stamp
    assert (await _get(identity_stub, app, ext(cid))).attributes["last_order"] == stamp
    no_kind = await failure(
        _upsert(identity_stub, app, ext(cid), attributes={"x": user_pb2.AttributeValue()})
    )
    assert no_kind.fields == ["user.attributes.x"]


async def test_an_app_can_refuse_undefined_fields(
    identity_stub: IdentityServiceStub, apps_stub: object
) -> None:
    strict = await create_test_app(
        apps_stub,  # type: ignore[arg-type]
        app_pb2.AppSettings(undefined_fields=app_pb2.UNDEFINED_FIELD_POLICY_REJECT),
    )
    refused = await failure(
        _upsert(identity_stub, strict, ext(new_id()), attributes={"plan": s("pro")})
    )
    assert (refused.code, refused.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        ["user.attributes.plan"],
    )
    await identity_stub.CreateCustomerField(
        pb.CreateCustomerFieldRequest(
            field={"name": "plan", "type": "FIELD_TYPE_STRING"}  # type: ignore[arg-type]
        ),
        metadata=strict.server,
    )
    ok = await _upsert(identity_stub, strict, ext(new_id()), attributes={"plan": s("pro")})
    assert ok.user.attributes["plan"] == s("pro")


async def test_attribute_limits(identity_stub: IdentityServiceStub, app: AppKeys) -> None:
    cid = new_id()
    too_long = await failure(_upsert(identity_stub, app, ext(cid), attributes={"t": s("x" * 1001)}))
    assert (too_long.code, too_long.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        ["user.attributes.t"],
    )
    long_name = "a" * 65
    named = await failure(_upsert(identity_stub, app, ext(cid), attributes={long_name: n(1)}))
    assert named.fields == [f"user.attributes.{long_name}"]
    reserved = await failure(_upsert(identity_stub, app, ext(cid), attributes={"email": s("x")}))
    assert reserved.fields == ["user.attributes.email"]
    await _upsert(
        identity_stub, app, ext(cid), attributes={f"a{i}": n(i) for i in range(MAX_ATTRIBUTES)}
    )
    full = await failure(_upsert(identity_stub, app, ext(cid), attributes={"one_more": n(1)}))
    assert (full.code, full.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "ATTRIBUTE_LIMIT")


async def test_batch_upsert_partial_success_in_order(
    identity_stub: IdentityServiceStub, app: AppKeys
) -> None:
    a, c = new_id(), new_id()
    requests = [
        pb.UpsertUserRequest(ref=ext(a), user=user_pb2.User(first_name="A")),
        pb.UpsertUserRequest(ref=ext(new_id()), user=user_pb2.User(email="broken")),
        pb.UpsertUserRequest(ref=ext(a), user=user_pb2.User(last_name="Later")),
        pb.UpsertUserRequest(ref=by_id(str(uuid.uuid4()))),
        pb.UpsertUserRequest(ref=ext(c), increment_attributes={"n": 1}),
        pb.UpsertUserRequest(ref=ext(c), increment_attributes={"n": 2}),
        pb.UpsertUserRequest(ref=ext("null")),
    ]
    response = await identity_stub.BatchUpsertUsers(
        pb.BatchUpsertUsersRequest(requests=requests), metadata=app.server
    )
    results = response.results
    assert len(results) == len(requests)
    assert [r.HasField("error") for r in results] == [
        False,
        True,
        False,
        True,
        False,
        False,
        True,
    ]
    assert [r.created for r in results] == [True, False, False, False, True, False, False]
    assert item_failure(results[1].error).fields == ["requests[1].user.email"]
    assert item_failure(results[1].error).code == grpc.StatusCode.INVALID_ARGUMENT
    assert item_failure(results[3].error).code == grpc.StatusCode.NOT_FOUND
    assert item_failure(results[6].error).fields == ["requests[6].ref.external_id"]
    assert results[0].user.user_id == results[2].user.user_id
    stored = await _get(identity_stub, app, ext(a))
    assert (stored.first_name, stored.last_name) == ("A", "Later")
    assert (await _get(identity_stub, app, ext(c))).attributes["n"] == n(3)


async def test_batch_upsert_ids_view_answers_ids_and_errors_only(
    identity_stub: IdentityServiceStub, app: AppKeys
) -> None:
    a = new_id()
    requests = [
        pb.UpsertUserRequest(ref=ext(a), user=user_pb2.User(first_name="A", language="fr")),
        pb.UpsertUserRequest(ref=ext(new_id()), user=user_pb2.User(phone="12")),
    ]
    response = await identity_stub.BatchUpsertUsers(
        pb.BatchUpsertUsersRequest(
            requests=requests, result_view=pb.BatchUpsertUsersRequest.RESULT_VIEW_IDS
        ),
        metadata=app.server,
    )
    first, second = response.results
    assert first.created
    assert (first.user.external_id, bool(first.user.user_id)) == (a, True)
    assert (first.user.first_name, first.user.language) == ("", "")
    assert item_failure(second.error).fields == ["requests[1].user.phone"]
    stored = await _get(identity_stub, app, ext(a))
    assert (stored.user_id, stored.first_name) == (first.user.user_id, "A")


async def test_batch_sizes_are_limited(identity_stub: IdentityServiceStub, app: AppKeys) -> None:
    too_many = [pb.UpsertUserRequest(ref=ext(f"x{i}")) for i in range(1001)]
    result = await failure(
        identity_stub.BatchUpsertUsers(
            pb.BatchUpsertUsersRequest(requests=too_many), metadata=app.server
        )
    )
    assert (result.code, result.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["requests"])
    refs = [ext(f"x{i}") for i in range(1001)]
    result = await failure(
        identity_stub.BatchGetUsers(pb.BatchGetUsersRequest(refs=refs), metadata=app.server)
    )
    assert (result.code, result.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["refs"])


async def test_a_full_batch_of_a_thousand(identity_stub: IdentityServiceStub, app: AppKeys) -> None:
    ids = [new_id() for _ in range(1000)]
    requests = [
        pb.UpsertUserRequest(
            ref=ext(cid), user=user_pb2.User(first_name=f"N{i}", attributes={"i": n(i)})
        )
        for i, cid in enumerate(ids)
    ]
    created = await identity_stub.BatchUpsertUsers(
        pb.BatchUpsertUsersRequest(requests=requests), metadata=app.server
    )
    assert all(r.created and not r.HasField("error") for r in created.results)
    updated = await identity_stub.BatchUpsertUsers(
        pb.BatchUpsertUsersRequest(
            requests=[
                pb.UpsertUserRequest(ref=ext(cid), increment_attributes={"i": 1}) for cid in ids
            ]
        ),
        metadata=app.server,
    )
    assert [r.user.attributes["i"] for r in updated.results] == [n(i + 1) for i in range(1000)]
    got = await identity_stub.BatchGetUsers(
        pb.BatchGetUsersRequest(refs=[ext(cid) for cid in ids]), metadata=app.server
    )
    assert [r.user.external_id for r in got.results] == ids


async def test_concurrent_batches_on_the_same_new_users_agree(
    identity_stub: IdentityServiceStub, app: AppKeys
) -> None:
    ids = [new_id() for _ in range(50)]

    async def batch(reverse: bool) -> pb.BatchUpsertUsersResponse:
        order = list(reversed(ids)) if reverse else ids
        response: pb.BatchUpsertUsersResponse = await identity_stub.BatchUpsertUsers(
            pb.BatchUpsertUsersRequest(
                requests=[
                    pb.UpsertUserRequest(ref=ext(cid), increment_attributes={"hits": 1})
                    for cid in order
                ]
            ),
            metadata=app.server,
        )
        return response

    results = await asyncio.gather(*(batch(i % 2 == 1) for i in range(4)))
    assert all(not r.HasField("error") for response in results for r in response.results)
    got = await identity_stub.BatchGetUsers(
        pb.BatchGetUsersRequest(refs=[ext(cid) for cid in ids]), metadata=app.server
    )
    assert {r.user.attributes["hits"].number_value for r in got.results} == {4.0}


async def test_batch_get_answers_per_ref_in_order(
    identity_stub: IdentityServiceStub, app: AppKeys
) -> None:
    a = (await _upsert(identity_stub, app, ext(new_id()), first_name="A")).user
    b_ = (await _upsert(identity_stub, app, ext(new_id()), first_name="B")).user
    response = await identity_stub.BatchGetUsers(
        pb.BatchGetUsersRequest(
            refs=[
                ext(b_.external_id),
                ext(new_id()),
                by_id("bad"),
                by_id(a.user_id),
                ext(a.external_id),
            ]
        ),
        metadata=app.server,
    )
    r = response.results
    assert [x.user.first_name for x in r] == ["B", "", "", "A", "A"]
    assert item_failure(r[1].error).code == grpc.StatusCode.NOT_FOUND
    bad = item_failure(r[2].error)
    assert (bad.code, bad.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["refs[2].user_id"])


async def test_list_users_pages_oldest_first(
    identity_stub: IdentityServiceStub, app: AppKeys
) -> None:
    created = []
    for i in range(5):
        created.append((await _upsert(identity_stub, app, ext(new_id()), first_name=f"U{i}")).user)
    seen: list[str] = []
    token = ""
    while True:
        page = await identity_stub.ListUsers(
            pb.ListUsersRequest(page_size=2, page_token=token), metadata=app.server
        )
        assert len(page.users) <= 2
        seen.extend(u.user_id for u in page.users)
        token = page.next_page_token
        if not token:
            break
    assert seen == [u.user_id for u in created]
    bad = await failure(
        identity_stub.ListUsers(pb.ListUsersRequest(page_token="nope"), metadata=app.server)
    )
    assert (bad.code, bad.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["page_token"])
    negative = await failure(
        identity_stub.ListUsers(pb.ListUsersRequest(page_size=-1), metadata=app.server)
    )
    assert negative.fields == ["page_size"]


async def test_list_users_ids_view_carries_only_ids_and_pages_like_the_full_view(
    identity_stub: IdentityServiceStub, app: AppKeys
) -> None:
    created = [
        (
            await _upsert(identity_stub, app, ext(new_id()), first_name=f"U{i}", email=f"u{i}@x.io")
        ).user
        for i in range(5)
    ]
    by_alias = user_ref_pb2.UserRef(alias=user_ref_pb2.UserRef.Alias(label="crm", value=new_id()))
    anonymous = (await _upsert(identity_stub, app, by_alias, country="ES")).user
    ids = pb.ListUsersRequest.VIEW_IDS
    listed: list[user_pb2.User] = []
    token, views = "", 0
    while True:
        # Alternate the views: a token of one view continues the walk in the other.
        view = ids if views % 2 == 0 else pb.ListUsersRequest.VIEW_FULL
        page = await identity_stub.ListUsers(
            pb.ListUsersRequest(page_size=2, page_token=token, view=view), metadata=app.server
        )
        if view == ids:
            listed.extend(page.users)
        views += 1
        token = page.next_page_token
        if not token:
            break
    walk = await identity_stub.ListUsers(
        pb.ListUsersRequest(page_size=1000, view=ids), metadata=app.server
    )
    expected = {u.user_id: u for u in [*created, anonymous]}
    assert [u.user_id for u in walk.users] == list(expected)
    for user in walk.users:
        full = expected[user.user_id]
        # Only the ids and the creation time: no attribute, alias or subscription.
        assert user == user_pb2.User(
            user_id=full.user_id, external_id=full.external_id, create_time=full.create_time
        )
    assert walk.users[-1].external_id == ""
    # Pages of two: ids, full, ids — the ids pages hold the 1st, 2nd, 5th and 6th user.
    assert [u.user_id for u in listed] == [walk.users[i].user_id for i in (0, 1, 4, 5)]
    unknown = await failure(
        identity_stub.ListUsers(pb.ListUsersRequest(view=7), metadata=app.server)  # type: ignore[arg-type]
    )
    assert (unknown.code, unknown.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["view"])


async def test_apps_never_see_each_others_users(
    identity_stub: IdentityServiceStub, app: AppKeys, other_app: AppKeys
) -> None:
    cid = new_id()
    mine = (await _upsert(identity_stub, app, ext(cid), first_name="Mine")).user
    for call in (
        identity_stub.GetUser(
            pb.GetUserRequest(ref=by_id(mine.user_id)), metadata=other_app.server
        ),
        identity_stub.UpsertUser(
            pb.UpsertUserRequest(ref=by_id(mine.user_id), user=user_pb2.User(first_name="X")),
            metadata=other_app.server,
        ),
        identity_stub.DeleteUser(
            pb.DeleteUserRequest(ref=by_id(mine.user_id)), metadata=other_app.server
        ),
        identity_stub.ExportUser(
            pb.ExportUserRequest(ref=by_id(mine.user_id)), metadata=other_app.server
        ),
        identity_stub.AddAlias(
            pb.AddAliasRequest(
                ref=by_id(mine.user_id), alias=user_pb2.Alias(label="crm_id", value="v")
            ),
            metadata=other_app.server,
        ),
    ):
        assert (await failure(call)).code == grpc.StatusCode.NOT_FOUND
    batch = await identity_stub.BatchGetUsers(
        pb.BatchGetUsersRequest(refs=[by_id(mine.user_id)]), metadata=other_app.server
    )
    assert item_failure(batch.results[0].error).code == grpc.StatusCode.NOT_FOUND
    # The same external id in another app is another person.
    theirs = await _upsert(identity_stub, other_app, ext(cid), first_name="Theirs")
    assert theirs.created
    assert theirs.user.user_id != mine.user_id
    assert (await _get(identity_stub, app, ext(cid))).first_name == "Mine"
    listed = await identity_stub.ListUsers(pb.ListUsersRequest(), metadata=other_app.server)
    assert [u.user_id for u in listed.users] == [theirs.user.user_id]


async def test_user_methods_need_a_server_key(
    identity_stub: IdentityServiceStub, app: AppKeys
) -> None:
    calls = {
        "UpsertUser": pb.UpsertUserRequest(ref=ext("c1")),
        "BatchUpsertUsers": pb.BatchUpsertUsersRequest(),
        "GetUser": pb.GetUserRequest(ref=ext("c1")),
        "BatchGetUsers": pb.BatchGetUsersRequest(),
        "ListUsers": pb.ListUsersRequest(),
        "DeleteUser": pb.DeleteUserRequest(ref=ext("c1")),
        "ExportUser": pb.ExportUserRequest(ref=ext("c1")),
        "AddAlias": pb.AddAliasRequest(ref=ext("c1")),
        "RemoveAlias": pb.RemoveAliasRequest(ref=ext("c1")),
        "CreateCustomerField": pb.CreateCustomerFieldRequest(),
        "ListCustomerFields": pb.ListCustomerFieldsRequest(),
    }
    for method, request in calls.items():
        rpc = getattr(identity_stub, method)
        client = await failure(rpc(request, metadata=app.client))
        assert client.code == grpc.StatusCode.PERMISSION_DENIED, method
        nobody = await failure(rpc(request))
        assert nobody.code == grpc.StatusCode.UNAUTHENTICATED, method
        wrong = await failure(rpc(request, metadata=(("authorization", "Bearer nope"),)))
        assert wrong.code == grpc.StatusCode.UNAUTHENTICATED, method


async def test_changes_are_published_with_what_changed(
    identity_stub: IdentityServiceStub, app: AppKeys
) -> None:
    async with ChangeFeed(app.app_id) as feed:
        cid = new_id()
        created = (
            await _upsert(identity_stub, app, ext(cid), first_name="Ana", attributes={"p": s("x")})
        ).user
        await _upsert(identity_stub, app, ext(cid), first_name="Ana")  # no change: no fact
        await _upsert(identity_stub, app, ext(cid), last_name="Ruiz", attributes={"p": NULL})
        batch = await identity_stub.BatchUpsertUsers(
            pb.BatchUpsertUsersRequest(
                requests=[pb.UpsertUserRequest(ref=ext(new_id())) for _ in range(3)]
            ),
            metadata=app.server,
        )
        batch_ids = [r.user.user_id for r in batch.results]
        facts = await feed.about([created.user_id, *batch_ids], 5)
    mine = [f for f in facts if f.user_id == created.user_id]
    assert [f.kind for f in mine] == [
        IdentityChange.KIND_USER_CREATED,
        IdentityChange.KIND_USER_UPDATED,
    ]
    assert mine[0].external_id == cid
    assert mine[0].app_id == app.app_id
    assert list(mine[0].changed_fields) == ["attributes.p", "external_id", "first_name"]
    assert list(mine[1].changed_fields) == ["attributes.p", "last_name"]
    assert sorted(f.user_id for f in facts if f.user_id in batch_ids) == sorted(batch_ids)
    assert len({f.event_id for f in facts}) == len(facts)
