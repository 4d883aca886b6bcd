"""CSV imports through gRPC against a real identity process: options, rules, counts, rejections.

Files are uploaded in small chunks (7 bytes unless said otherwise), so records, quoted fields and
multi-byte characters are split between messages, as they are in a real upload.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
from google.protobuf import field_mask_pb2
from tidings.identity.v1 import app_pb2, customer_field_pb2, import_pb2, segment_pb2, user_pb2
from tidings.identity.v1 import identity_service_pb2 as pb
from tidings.identity.v1 import subscription_pb2 as spb

from tests.identity.conftest import TestApp, create_test_app
from tests.identity.import_support import (
    ALIAS,
    BOOL,
    DATE,
    NUMBER,
    STRING,
    TIMESTAMP,
    USER_ID,
    Job,
    Options,
    assert_counts_add_up,
    attribute,
    csv_bytes,
    options,
    rejections_by_line,
    standard,
    subscription,
    upload,
    user,
)
from tests.identity.support import (
    ANDROID,
    EMAIL,
    SMS,
    ChangeFeed,
    Kind,
    android_token,
    by_alias,
    email,
    ext,
    failure,
    new_id,
    phone,
    s,
)
from tests.identity.test_segments_support import (
    Op,
    attr,
    create_segment,
    member_external_ids,
)
from tests.polling import eventually

if TYPE_CHECKING:
    from tidings.identity.v1.apps_service_pb2_grpc import AppsServiceAsyncStub
    from tidings.identity.v1.identity_service_pb2_grpc import IdentityServiceAsyncStub


async def _ok(stub: IdentityServiceAsyncStub, app: TestApp, opts: Options, data: bytes) -> Job:
    job = await upload(stub, app, opts, data)
    assert job.state == Job.STATE_SUCCEEDED, job.error
    assert_counts_add_up(job)
    return job


# -- rows, counts and rejections -----------------------------------------------------------------


async def test_a_messy_file_counts_every_row_once_and_lands_the_good_ones(
    identity_stub: IdentityServiceAsyncStub, app: TestApp
) -> None:
    good = [new_id() for _ in range(3)]
    dup = new_id()
    lines = [
        "id,email,phone,plan,score,vip,since,tz,lang,country",  # 1
        f"{good[0]},Ana@Example.com,+34600111222,gold,3.5,yes,2024-01-31,Europe/Madrid,es,es",  # 2
        f"{dup},dup@example.com,,,,,,,,",  # 3
        f"{dup},dup2@example.com,,,,,,,,",  # 4: DUPLICATE_ID
        "null,x@example.com,,,,,,,,",  # 5: INVALID_ID
        f"{new_id()},not-an-email,,,,,,,,",  # 6: INVALID_EMAIL
        f"{new_id()},,12345,,,,,,,",  # 7: INVALID_PHONE
        f"{new_id()},,,,many,,,,,",  # 8: INVALID_NUMBER
        f"{new_id()},,,,,maybe,,,,",  # 9: INVALID_BOOL
        f"{new_id()},,,,,,31/01/2024,,,",  # 10: INVALID_DATE
        f"{new_id()},,,,,,,Mars/Olympus,,",  # 11: INVALID_TIMEZONE
        f"{new_id()},,,,,,,,xx,",  # 12: INVALID_LANGUAGE
        f"{new_id()},,,,,,,,,ZZ",  # 13: INVALID_COUNTRY
        f"{new_id()},,,,,,,,,,extra",  # 14: TOO_MANY_COLUMNS
        f"{new_id()},a@example.com",  # 15: TOO_FEW_COLUMNS
        "",  # 16: blank, not a row
        f'{good[1]},"b@example.com",,"quoted, with comma",,,,,,',  # 17
        f'{new_id()},"bad"quote,,,,,,,,',  # 18: INVALID_CSV
        f'{good[2]},,,"two\nlines",,,,,,',  # 19-20
        "-1,,,,,,,,,",  # 21: INVALID_ID
    ]
    data = ("\r\n".join(lines) + "\r\n").encode()
    opts = options(
        standard("email"),
        standard("phone"),
        attribute("plan", STRING),
        attribute("score", NUMBER),
        attribute("vip", BOOL),
        attribute("since", DATE),
        standard("tz", "timezone"),
        standard("lang", "language"),
        standard("country"),
    )
    job = await _ok(identity_stub, app, opts, data)
    assert job.rows == 18
    assert (job.created, job.updated, job.unchanged) == (4, 0, 0)
    assert job.rejected == 14
    assert rejections_by_line(job) == {
        4: ("DUPLICATE_ID", ""),
        5: ("INVALID_ID", "id"),
        6: ("INVALID_EMAIL", "email"),
        7: ("INVALID_PHONE", "phone"),
        8: ("INVALID_NUMBER", "score"),
        9: ("INVALID_BOOL", "vip"),
        10: ("INVALID_DATE", "since"),
        11: ("INVALID_TIMEZONE", "tz"),
        12: ("INVALID_LANGUAGE", "lang"),
        13: ("INVALID_COUNTRY", "country"),
        14: ("TOO_MANY_COLUMNS", ""),
        15: ("TOO_FEW_COLUMNS", ""),
        18: ("INVALID_CSV", ""),
        21: ("INVALID_ID", "id"),
    }
    [duplicate] = [r for r in job.rejections if r.line == 4]
    assert "line 3" in duplicate.message
    ana = await user(identity_stub, app, good[0])
    assert (ana.email, ana.phone, ana.timezone, ana.language, ana.country) == (
        "Ana@example.com",
        "+34600111222",
        "Europe/Madrid",
        "es",
        "ES",
    )
    assert ana.attributes["plan"].string_value == "gold"
    assert ana.attributes["score"].number_value == 3.5
    assert ana.attributes["vip"].bool_value is True
    assert ana.attributes["since"].string_value == "2024-01-31"  # a date field
    assert (await user(identity_stub, app, good[1])).attributes["plan"].string_value == (
        "quoted, with comma"
    )
    assert (await user(identity_stub, app, good[2])).attributes["plan"].string_value == "two\nlines"
    # The first row of a duplicated id is the one that lands.
    assert (await user(identity_stub, app, dup)).email == "dup@example.com"


async def test_rejected_rows_are_reported_even_when_the_first_of_an_id_was_refused(
    identity_stub: IdentityServiceAsyncStub, app: TestApp
) -> None:
    key = new_id()
    data = csv_bytes([["id", "email"], [key, "nope"], [key, "fine@example.com"]])
    job = await _ok(identity_stub, app, options(standard("email")), data)
    assert rejections_by_line(job) == {2: ("INVALID_EMAIL", "email"), 3: ("DUPLICATE_ID", "")}
    assert job.created == 0


async def test_bytes_that_are_not_utf8_refuse_their_row_only(
    identity_stub: IdentityServiceAsyncStub, app: TestApp
) -> None:
    good, bad = new_id(), new_id()
    data = f"id,first_name\n{good},Zoë\n{bad},".encode() + b"Jos\xe9\n"
    job = await _ok(identity_stub, app, options(standard("first_name")), data)
    assert rejections_by_line(job) == {3: ("INVALID_ENCODING", "first_name")}
    assert (await user(identity_stub, app, good)).first_name == "Zoë"


async def test_an_unclosed_quote_at_the_end_is_one_refused_row(
    identity_stub: IdentityServiceAsyncStub, app: TestApp
) -> None:
    good = new_id()
    data = f'id,first_name\n{good},Ana\n{new_id()},"Bo\n'.encode()
    job = await _ok(identity_stub, app, options(standard("first_name")), data)
    assert (job.rows, job.created) == (2, 1)
    assert rejections_by_line(job) == {3: ("INVALID_CSV", "")}


# -- updates, modes, empty cells -----------------------------------------------------------------


async def test_updates_count_changed_and_unchanged_rows_and_publish_what_changed(
    identity_stub: IdentityServiceAsyncStub, app: TestApp, feed: ChangeFeed
) -> None:
    same, changed, new = new_id(), new_id(), new_id()
    opts = options(standard("first_name"), attribute("plan", STRING))
    await _ok(
        identity_stub, app, opts, csv_bytes([["id", "first_name", "plan"], [same, "Ana", "gold"]])
    )
    await identity_stub.UpsertUser(
        pb.UpsertUserRequest(ref=ext(changed), user=user_pb2.User(first_name="Bo")),
        metadata=app.server,
    )
    job = await _ok(
        identity_stub,
        app,
        opts,
        csv_bytes(
            [
                ["id", "first_name", "plan"],
                [same, "Ana", "gold"],
                [changed, "Bo", "silver"],
                [new, "Cy", ""],
            ]
        ),
    )
    assert (job.rows, job.created, job.updated, job.unchanged, job.rejected) == (3, 1, 1, 1, 0)
    changed_id = (await user(identity_stub, app, changed)).user_id
    new_user = await user(identity_stub, app, new)
    facts = await feed.about([changed_id, new_user.user_id], 3)
    updated = [f for f in facts if f.kind == Kind.KIND_USER_UPDATED and f.user_id == changed_id]
    assert [list(f.changed_fields) for f in updated][-1] == ["attributes.plan"]
    [created] = [
        f for f in facts if f.kind == Kind.KIND_USER_CREATED and f.user_id == new_user.user_id
    ]
    assert created.external_id == new
    assert list(created.changed_fields) == ["external_id", "first_name"]
    assert created.app_id == app.app_id
    assert created.event_id


async def test_create_only_and_update_only_modes(
    identity_stub: IdentityServiceAsyncStub, app: TestApp
) -> None:
    old, new = new_id(), new_id()
    await identity_stub.UpsertUser(pb.UpsertUserRequest(ref=ext(old)), metadata=app.server)
    rows = csv_bytes([["id", "first_name"], [old, "Old"], [new, "New"]])
    created = await _ok(
        identity_stub, app, options(standard("first_name"), mode=Options.MODE_CREATE_ONLY), rows
    )
    assert (created.created, created.updated) == (1, 0)
    assert rejections_by_line(created) == {2: ("USER_EXISTS", "")}
    assert (await user(identity_stub, app, old)).first_name == ""

    other = new_id()
    rows = csv_bytes([["id", "first_name"], [old, "Old"], [other, "Other"]])
    updated = await _ok(
        identity_stub, app, options(standard("first_name"), mode=Options.MODE_UPDATE_ONLY), rows
    )
    assert (updated.created, updated.updated) == (0, 1)
    assert rejections_by_line(updated) == {3: ("USER_NOT_FOUND", "")}
    assert (await user(identity_stub, app, old)).first_name == "Old"
    assert (await failure(user(identity_stub, app, other))).code == grpc.StatusCode.NOT_FOUND


async def test_empty_cells_are_ignored_or_clear_as_asked(
    identity_stub: IdentityServiceAsyncStub, app: TestApp
) -> None:
    key = new_id()
    opts = options(standard("first_name"), standard("birthdate"), attribute("plan", STRING))
    header = ["id", "first_name", "birthdate", "plan"]
    await _ok(identity_stub, app, opts, csv_bytes([header, [key, "Ana", "--02-29", "gold"]]))
    kept = await _ok(identity_stub, app, opts, csv_bytes([header, [key, "", "", ""]]))
    assert kept.unchanged == 1
    ana = await user(identity_stub, app, key)
    assert (ana.first_name, ana.birthdate.month, ana.birthdate.day, ana.birthdate.year) == (
        "Ana",
        2,
        29,
        0,
    )
    assert "plan" in ana.attributes
    opts.empty_cells_clear = True
    cleared = await _ok(identity_stub, app, opts, csv_bytes([header, [key, "", "", ""]]))
    assert cleared.updated == 1
    ana = await user(identity_stub, app, key)
    assert ana.first_name == ""
    assert not ana.HasField("birthdate")
    assert "plan" not in ana.attributes


# -- identifiers -----------------------------------------------------------------------------------


async def test_alias_identifiers_create_then_update_by_alias(
    identity_stub: IdentityServiceAsyncStub, app: TestApp
) -> None:
    code = new_id("crm")
    opts = options(
        standard("first_name"), id_column="code", identifier_kind=ALIAS, alias_label="crm_id"
    )
    first = await _ok(identity_stub, app, opts, csv_bytes([["code", "first_name"], [code, "Ana"]]))
    again = await _ok(identity_stub, app, opts, csv_bytes([["code", "first_name"], [code, "Anna"]]))
    assert (first.created, again.updated) == (1, 1)
    found = await identity_stub.GetUser(
        pb.GetUserRequest(ref=by_alias("crm_id", code)), metadata=app.server
    )
    assert found.first_name == "Anna"
    assert found.external_id == ""


async def test_user_id_identifiers_never_create(
    identity_stub: IdentityServiceAsyncStub, app: TestApp
) -> None:
    key = new_id()
    created = await identity_stub.UpsertUser(
        pb.UpsertUserRequest(ref=ext(key)), metadata=app.server
    )
    unknown = "0190c0de-0000-7000-8000-000000000001"
    opts = options(standard("first_name"), id_column="uid", identifier_kind=USER_ID)
    rows = [
        ["uid", "first_name"],
        [created.user.user_id.upper(), "Ana"],
        [unknown, "X"],
        ["nope", "Y"],
    ]
    job = await _ok(identity_stub, app, opts, csv_bytes(rows))
    assert (job.created, job.updated) == (0, 1)
    assert rejections_by_line(job) == {3: ("USER_NOT_FOUND", ""), 4: ("INVALID_ID", "uid")}
    assert (await user(identity_stub, app, key)).first_name == "Ana"


# -- custom attributes against customer fields --------------------------------------------------


async def test_attribute_types_follow_the_apps_customer_fields(
    identity_stub: IdentityServiceAsyncStub, app: TestApp
) -> None:
    await identity_stub.CreateCustomerField(
        pb.CreateCustomerFieldRequest(
            field=customer_field_pb2.CustomerField(
                name="tier", type=customer_field_pb2.FIELD_TYPE_NUMBER
            )
        ),
        metadata=app.server,
    )
    ok, wrong = new_id(), new_id()
    opts = options(
        attribute("tier", STRING),
        attribute("seen", TIMESTAMP, fmt="%d/%m/%Y %H:%M"),
        attribute("born", DATE, fmt="%d.%m.%Y"),
    )
    rows = [
        ["id", "tier", "seen", "born"],
        [ok, "", "31/01/2024 09:30", "29.02.2000"],
        [wrong, "gold", "", ""],
    ]
    job = await _ok(identity_stub, app, opts, csv_bytes(rows))
    assert rejections_by_line(job) == {3: ("FIELD_TYPE_MISMATCH", "tier")}
    got = await user(identity_stub, app, ok)
    assert got.attributes["seen"].timestamp_value.ToJsonString() == "2024-01-31T09:30:00Z"
    assert got.attributes["born"].string_value == "2000-02-29"
    fields = await identity_stub.ListCustomerFields(
        pb.ListCustomerFieldsRequest(), metadata=app.server
    )
    types = {f.name: f.type for f in fields.fields}
    assert types["seen"] == customer_field_pb2.FIELD_TYPE_TIMESTAMP
    assert types["born"] == customer_field_pb2.FIELD_TYPE_DATE


async def test_a_date_column_into_a_timestamp_field_fills_it_at_midnight_utc(
    identity_stub: IdentityServiceAsyncStub, app: TestApp
) -> None:
    # Apps that imported dates before date fields existed hold them as timestamps.
    await identity_stub.CreateCustomerField(
        pb.CreateCustomerFieldRequest(
            field=customer_field_pb2.CustomerField(
                name="renewed", type=customer_field_pb2.FIELD_TYPE_TIMESTAMP
            )
        ),
        metadata=app.server,
    )
    someone = new_id()
    job = await _ok(
        identity_stub,
        app,
        options(attribute("renewed", DATE, fmt="%d.%m.%Y")),
        csv_bytes([["id", "renewed"], [someone, "29.02.2000"]]),
    )
    assert (job.created, job.rejected) == (1, 0)
    got = await user(identity_stub, app, someone)
    assert got.attributes["renewed"].timestamp_value.ToJsonString() == "2000-02-29T00:00:00Z"


async def test_an_app_that_refuses_undefined_fields_refuses_their_cells(
    identity_stub: IdentityServiceAsyncStub, apps_stub: AppsServiceAsyncStub
) -> None:
    strict = await create_test_app(
        apps_stub,
        app_pb2.AppSettings(undefined_fields=app_pb2.UNDEFINED_FIELD_POLICY_REJECT),
    )
    with_value, without = new_id(), new_id()
    rows = [["id", "plan"], [with_value, "gold"], [without, ""]]
    job = await _ok(identity_stub, strict, options(attribute("plan", STRING)), csv_bytes(rows))
    assert rejections_by_line(job) == {2: ("UNDEFINED_FIELD", "plan")}
    assert job.created == 1


# -- file format -----------------------------------------------------------------------------------


async def test_delimiter_quote_bom_and_latin1(
    identity_stub: IdentityServiceAsyncStub, app: TestApp
) -> None:
    a, b = new_id(), new_id()
    utf8 = f"\ufeffid;first_name\r\n{a};'Zoë; the ''first'''\r\n".encode()
    opts = options(standard("first_name"), delimiter=";", quote="'")
    await _ok(identity_stub, app, opts, utf8)
    assert (await user(identity_stub, app, a)).first_name == "Zoë; the 'first'"
    latin1 = f"id,first_name\n{b},José Müller\n".encode("latin-1")
    opts = options(standard("first_name"), encoding=Options.ENCODING_LATIN1)
    await _ok(identity_stub, app, opts, latin1)
    assert (await user(identity_stub, app, b)).first_name == "José Müller"


async def test_latin1_is_read_as_excel_writes_it_windows_1252(
    identity_stub: IdentityServiceAsyncStub, app: TestApp
) -> None:
    key = new_id()
    data = f"id,last_name\r\n{key},".encode() + b"O\x92Brien \x80\r\n"
    opts = options(standard("last_name"), encoding=Options.ENCODING_LATIN1)
    job = await _ok(identity_stub, app, opts, data)
    assert (job.created, job.rejected) == (1, 0)
    assert (await user(identity_stub, app, key)).last_name == "O\u2019Brien \u20ac"


async def test_rows_of_delimiters_only_are_not_rows(
    identity_stub: IdentityServiceAsyncStub, app: TestApp
) -> None:
    key = new_id()
    data = f"id,first_name,email\r\n{key},Ana,\r\n,,\r\n,,\r\n , ,\r\n".encode()
    job = await _ok(identity_stub, app, options(standard("first_name"), standard("email")), data)
    assert (job.rows, job.created, job.rejected) == (1, 1, 0)


# -- subscriptions -------------------------------------------------------------------------------


async def test_subscription_columns_create_subscriptions_and_never_resubscribe(
    identity_stub: IdentityServiceAsyncStub, app: TestApp, feed: ChangeFeed
) -> None:
    opted_out, fresh = new_id(), new_id()
    address = email()
    await identity_stub.UpsertUser(pb.UpsertUserRequest(ref=ext(opted_out)), metadata=app.server)
    created = await identity_stub.CreateSubscription(
        pb.CreateSubscriptionRequest(
            subscription=spb.Subscription(type=EMAIL, token=address), user=ext(opted_out)
        ),
        metadata=app.server,
    )
    await identity_stub.UpdateSubscription(
        pb.UpdateSubscriptionRequest(
            subscription=spb.Subscription(
                subscription_id=created.subscription_id, opt_in=spb.OPT_IN_STATE_UNSUBSCRIBED
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["opt_in"]),
        ),
        metadata=app.server,
    )
    number = phone()
    opts = options(subscription("mail", EMAIL), subscription("mobile", SMS))
    rows = [["id", "mail", "mobile"], [opted_out, address.upper(), ""], [fresh, email(), number]]
    job = await _ok(identity_stub, app, opts, csv_bytes(rows))
    assert (job.created, job.unchanged, job.rejected) == (1, 1, 0)
    kept = await user(identity_stub, app, opted_out)
    [subscription_] = kept.subscriptions
    assert subscription_.opt_in == spb.OPT_IN_STATE_UNSUBSCRIBED
    new_user = await user(identity_stub, app, fresh)
    assert {(x.type, x.opt_in) for x in new_user.subscriptions} == {
        (EMAIL, spb.OPT_IN_STATE_SUBSCRIBED),
        (SMS, spb.OPT_IN_STATE_SUBSCRIBED),
    }
    facts = await feed.about([new_user.user_id], 3)
    made = [f for f in facts if f.kind == Kind.KIND_SUBSCRIPTION_CREATED]
    assert {f.subscription_id for f in made} == {x.subscription_id for x in new_user.subscriptions}
    assert all(f.subscription_reachable for f in made)


async def test_a_push_token_held_by_someone_else_moves_to_the_imported_user(
    identity_stub: IdentityServiceAsyncStub, app: TestApp, feed: ChangeFeed
) -> None:
    holder, importer = new_id(), new_id()
    token = android_token()
    await identity_stub.UpsertUser(pb.UpsertUserRequest(ref=ext(holder)), metadata=app.server)
    sub = await identity_stub.CreateSubscription(
        pb.CreateSubscriptionRequest(
            subscription=spb.Subscription(type=ANDROID, token=token), user=ext(holder)
        ),
        metadata=app.server,
    )
    job = await _ok(
        identity_stub,
        app,
        options(subscription("device", ANDROID)),
        csv_bytes([["id", "device"], [importer, token]]),
    )
    assert job.created == 1
    moved = await user(identity_stub, app, importer)
    assert [x.subscription_id for x in moved.subscriptions] == [sub.subscription_id]
    assert list((await user(identity_stub, app, holder)).subscriptions) == []
    facts = await feed.wait_for(Kind.KIND_SUBSCRIPTION_CHANGED, sub.subscription_id)
    assert facts[-1].user_id == moved.user_id
    assert list(facts[-1].changed_fields) == ["user_id"]
    [removed] = await feed.wait_for(Kind.KIND_SUBSCRIPTION_REMOVED, sub.subscription_id)
    assert removed.user_id == sub.user_id


async def test_a_token_two_rows_name_goes_to_the_first_and_the_second_row_still_lands(
    identity_stub: IdentityServiceAsyncStub, app: TestApp
) -> None:
    first, second = new_id(), new_id()
    shared = email()
    opts = options(standard("email"), subscription("email", EMAIL))
    rows = [["id", "email"], [first, shared], [second, shared]]
    job = await _ok(identity_stub, app, opts, csv_bytes(rows))
    # Documented: the later row is counted as what its profile part did, with no rejection.
    assert (job.rows, job.created, job.rejected, list(job.rejections)) == (2, 2, 0, [])
    assert [x.token for x in (await user(identity_stub, app, first)).subscriptions] == [shared]
    later = await user(identity_stub, app, second)
    assert (later.email, list(later.subscriptions)) == (shared, [])


# -- erasure ---------------------------------------------------------------------------------------


async def test_an_erased_profile_comes_back_only_as_a_new_profile(
    identity_stub: IdentityServiceAsyncStub, app: TestApp
) -> None:
    key = new_id()
    before = await identity_stub.UpsertUser(
        pb.UpsertUserRequest(
            ref=ext(key), user=user_pb2.User(first_name="Ana", attributes={"plan": s("gold")})
        ),
        metadata=app.server,
    )
    await identity_stub.DeleteUser(pb.DeleteUserRequest(ref=ext(key)), metadata=app.server)
    job = await _ok(
        identity_stub,
        app,
        options(standard("last_name")),
        csv_bytes([["id", "last_name"], [key, "Ruiz"]]),
    )
    assert job.created == 1
    after = await user(identity_stub, app, key)
    assert after.user_id != before.user.user_id
    assert (after.first_name, after.last_name, dict(after.attributes)) == ("", "Ruiz", {})


# -- formulas and the rejection export -----------------------------------------------------------


async def _export(stub: IdentityServiceAsyncStub, app: TestApp, import_id: str) -> str:
    chunks = stub.ExportImportRejections(
        import_pb2.ExportImportRejectionsRequest(import_id=import_id), metadata=app.server
    )
    return b"".join([chunk.data async for chunk in chunks]).decode()


async def test_formula_cells_are_stored_as_given_counted_and_defused_in_exports(
    identity_stub: IdentityServiceAsyncStub, app: TestApp
) -> None:
    key = new_id()
    formula = '=HYPERLINK("http://evil.example","x")'
    rows = [
        ["id", "first_name", "email", "score"],
        [key, f'"{formula.replace(chr(34), chr(34) * 2)}"', "", "-5"],
        ["=1+1", "", "", ""],
        [new_id(), "@SUM(A1)", "bad", ""],
    ]
    opts = options(standard("first_name"), standard("email"), attribute("score", NUMBER))
    job = await _ok(identity_stub, app, opts, csv_bytes(rows))
    # Rows 2 and 4 hold a formula-like text; "-5" is a number, not text. Row 3's id is one.
    assert job.flagged_cells == 3
    assert (await user(identity_stub, app, key)).first_name == formula
    exported = await _export(identity_stub, app, job.import_id)
    assert exported.splitlines()[0] == "line,column,reason,message"
    assert "'=" not in exported or exported.count("\n'=") == 0
    for line in exported.splitlines()[1:]:
        assert not line.startswith(("=", "+", "-", "@"))
        for cell in line.split(","):
            assert not cell.startswith(("=", "+", "-", "@", '"=', '"+', '"-', '"@'))


async def test_the_export_lists_every_rejection_past_the_first_thousand(
    identity_stub: IdentityServiceAsyncStub, app: TestApp
) -> None:
    rows = [["id", "email"], *([new_id(), f"bad-{n}"] for n in range(1_500))]
    job = await upload(
        identity_stub, app, options(standard("email")), csv_bytes(rows), chunk=64 * 1024
    )
    assert job.rejected == 1_500
    assert len(job.rejections) == 1_000
    fetched = await identity_stub.GetImportJob(
        import_pb2.GetImportJobRequest(import_id=job.import_id), metadata=app.server
    )
    assert [r.line for r in fetched.rejections] == list(range(2, 1_002))
    exported = (await _export(identity_stub, app, job.import_id)).splitlines()
    assert len(exported) == 1_501
    assert exported[-1].startswith("1501,email,INVALID_EMAIL,")


# -- jobs ------------------------------------------------------------------------------------------


async def test_jobs_are_listed_newest_first_and_scoped_by_app(
    identity_stub: IdentityServiceAsyncStub, app: TestApp, other_app: TestApp
) -> None:
    ids = [f"job-{new_id()}" for _ in range(3)]
    for import_id in ids:
        await _ok(
            identity_stub,
            app,
            options(standard("first_name"), import_id=import_id),
            csv_bytes([["id", "first_name"], [new_id(), "A"]]),
        )
    first = await identity_stub.ListImportJobs(
        import_pb2.ListImportJobsRequest(page_size=2), metadata=app.server
    )
    second = await identity_stub.ListImportJobs(
        import_pb2.ListImportJobsRequest(page_size=2, page_token=first.next_page_token),
        metadata=app.server,
    )
    listed = [j.import_id for j in [*first.import_jobs, *second.import_jobs]]
    assert listed == ids[::-1]
    assert not second.next_page_token
    assert first.import_jobs[0].options.import_id == ids[-1]
    stranger = await failure(
        identity_stub.GetImportJob(
            import_pb2.GetImportJobRequest(import_id=ids[0]), metadata=other_app.server
        )
    )
    assert (stranger.code, stranger.reason) == (grpc.StatusCode.NOT_FOUND, "IMPORT_NOT_FOUND")
    export = await failure(_export(identity_stub, other_app, ids[0]))
    assert export.code == grpc.StatusCode.NOT_FOUND
    empty = await identity_stub.ListImportJobs(
        import_pb2.ListImportJobsRequest(), metadata=other_app.server
    )
    assert list(empty.import_jobs) == []
    reused = await failure(
        upload(
            identity_stub,
            app,
            options(standard("first_name"), import_id=ids[0]),
            csv_bytes([["id", "first_name"]]),
        )
    )
    assert (reused.code, reused.reason) == (grpc.StatusCode.ALREADY_EXISTS, "IMPORT_EXISTS")


async def test_progress_is_visible_while_the_file_streams(
    identity_stub: IdentityServiceAsyncStub, app: TestApp
) -> None:
    import_id = f"slow-{new_id()}"
    header = b"id,first_name\n"
    part = b"".join(f"{new_id()},Ana\n".encode() for _ in range(2_000))
    rest = b"".join(f"{new_id()},Bo\n".encode() for _ in range(2_000))
    resume = asyncio.Event()

    async def requests() -> AsyncIterator[import_pb2.ImportUsersRequest]:
        yield import_pb2.ImportUsersRequest(
            options=options(standard("first_name"), import_id=import_id)
        )
        yield import_pb2.ImportUsersRequest(chunk=header + part)
        await resume.wait()
        yield import_pb2.ImportUsersRequest(chunk=rest)

    call = identity_stub.ImportUsers(requests(), metadata=app.server)
    seen: import_pb2.ImportJob | None = None
    for _ in range(200):
        try:
            seen = await identity_stub.GetImportJob(
                import_pb2.GetImportJobRequest(import_id=import_id), metadata=app.server
            )
        except grpc.aio.AioRpcError:
            seen = None
        if seen is not None and seen.rows == 2_000:
            break
        await asyncio.sleep(0.05)
    assert seen is not None
    assert seen.state == Job.STATE_RECEIVING
    assert seen.rows == 2_000
    assert seen.bytes_received == len(header + part)
    resume.set()
    job = await call
    assert (job.state, job.rows, job.created) == (Job.STATE_SUCCEEDED, 4_000, 4_000)


async def test_a_client_that_goes_away_leaves_a_failed_job_and_nothing_written(
    identity_stub: IdentityServiceAsyncStub, app: TestApp
) -> None:
    import_id = f"gone-{new_id()}"
    key = new_id()
    first = f"id,first_name\n{key},Ana\n".encode()

    async def requests() -> AsyncIterator[import_pb2.ImportUsersRequest]:
        yield import_pb2.ImportUsersRequest(
            options=options(
                standard("first_name"), import_id=import_id, size_bytes=len(first) + 100
            )
        )
        yield import_pb2.ImportUsersRequest(chunk=first)
        await asyncio.sleep(3600)

    call = identity_stub.ImportUsers(requests(), metadata=app.server)
    for _ in range(100):
        listed = await identity_stub.ListImportJobs(
            import_pb2.ListImportJobsRequest(), metadata=app.server
        )
        if listed.import_jobs and listed.import_jobs[0].rows == 1:
            break
        await asyncio.sleep(0.05)
    call.cancel()
    for _ in range(100):
        job = await identity_stub.GetImportJob(
            import_pb2.GetImportJobRequest(import_id=import_id), metadata=app.server
        )
        if job.state == Job.STATE_FAILED:
            break
        await asyncio.sleep(0.05)
    assert job.state == Job.STATE_FAILED
    assert "upload the file again" in job.error
    assert (await failure(user(identity_stub, app, key))).code == grpc.StatusCode.NOT_FOUND


# -- list segments ---------------------------------------------------------------------------------


async def test_list_name_makes_a_list_segment_of_every_user_the_import_wrote(
    identity_stub: IdentityServiceAsyncStub, app: TestApp
) -> None:
    existing, new, refused = new_id(), new_id(), new_id()
    await identity_stub.UpsertUser(pb.UpsertUserRequest(ref=ext(existing)), metadata=app.server)
    name = f"Imported {new_id()}"
    rows = [["id", "email"], [existing, ""], [new, "a@example.com"], [refused, "bad"]]
    job = await _ok(identity_stub, app, options(standard("email"), list_name=name), csv_bytes(rows))
    segment = await identity_stub.GetSegment(
        segment_pb2.GetSegmentRequest(segment_id=job.segment_id), metadata=app.server
    )
    assert (segment.kind, segment.display_name, segment.import_id) == (
        segment_pb2.Segment.KIND_LIST,
        name,
        job.import_id,
    )
    members = identity_stub.ListSegmentMembers(
        segment_pb2.ListSegmentMembersRequest(segment_id=job.segment_id), metadata=app.server
    )
    assert {m.external_id async for m in members} == {existing, new}
    taken = await failure(
        upload(
            identity_stub,
            app,
            options(standard("email"), list_name=name),
            csv_bytes([["id", "email"], [new_id(), ""]]),
        )
    )
    assert (taken.code, taken.reason) == (grpc.StatusCode.ALREADY_EXISTS, "SEGMENT_NAME_TAKEN")
    assert taken.fields == ["options.list_name"]


async def test_a_dry_run_counts_and_rejects_like_the_import_and_writes_nothing(
    identity_stub: IdentityServiceAsyncStub, app: TestApp
) -> None:
    changed, new, bad = new_id(), new_id(), new_id()
    await identity_stub.UpsertUser(
        pb.UpsertUserRequest(ref=ext(changed), user=user_pb2.User(first_name="Bo")),
        metadata=app.server,
    )
    name = f"Preview {new_id()}"
    columns = (standard("first_name"), attribute("plan", STRING), subscription("mail", EMAIL))
    rows = [
        ["id", "first_name", "plan", "mail"],
        [changed, "Bob", "silver", email()],
        [new, "Cy", "", email()],
        [bad, "Di", "", "not-an-email"],  # refused while the file is read
        [new, "Cy again", "", ""],  # a duplicate id: refused by the merge's plan
    ]
    preview = await _ok(
        identity_stub, app, options(*columns, list_name=name, dry_run=True), csv_bytes(rows)
    )
    assert preview.options.dry_run
    counts = (preview.rows, preview.created, preview.updated, preview.unchanged, preview.rejected)
    assert counts == (4, 1, 1, 0, 2)
    assert set(rejections_by_line(preview)) == {4, 5}
    assert preview.segment_id == ""
    # Nothing written: no new user, the existing one as it was, no subscription, no list.
    missing = await failure(
        identity_stub.GetUser(pb.GetUserRequest(ref=ext(new)), metadata=app.server)
    )
    assert missing.code == grpc.StatusCode.NOT_FOUND
    kept = await user(identity_stub, app, changed)
    assert (kept.first_name, "plan" in kept.attributes, list(kept.subscriptions)) == (
        "Bo",
        False,
        [],
    )

    applied = await _ok(identity_stub, app, options(*columns, list_name=name), csv_bytes(rows))
    assert not applied.options.dry_run
    assert (
        applied.rows,
        applied.created,
        applied.updated,
        applied.unchanged,
        applied.rejected,
    ) == counts
    assert rejections_by_line(applied) == rejections_by_line(preview)
    assert applied.segment_id  # the name the preview did not take
    now = await user(identity_stub, app, changed)
    assert (now.first_name, now.attributes["plan"].string_value, len(now.subscriptions)) == (
        "Bob",
        "silver",
        1,
    )
    assert (await user(identity_stub, app, new)).first_name == "Cy"


async def test_a_dry_run_defines_no_customer_field(
    identity_stub: IdentityServiceAsyncStub, app: TestApp
) -> None:
    name, key = "tier", new_id()
    preview = await _ok(
        identity_stub,
        app,
        options(attribute("tier", NUMBER, name=name), dry_run=True),
        csv_bytes([["id", "tier"], [key, "3"]]),
    )
    assert (preview.created, preview.rejected) == (1, 0)
    fields = await identity_stub.ListCustomerFields(
        pb.ListCustomerFieldsRequest(), metadata=app.server
    )
    assert name not in {f.name for f in fields.fields}
    # The preview's guess at the type binds nothing: the real import defines the field.
    applied = await _ok(
        identity_stub,
        app,
        options(attribute("tier", STRING, name=name)),
        csv_bytes([["id", "tier"], [key, "gold"]]),
    )
    assert (applied.created, applied.rejected) == (1, 0)
    assert (await user(identity_stub, app, key)).attributes[name].string_value == "gold"
    fields = await identity_stub.ListCustomerFields(
        pb.ListCustomerFieldsRequest(), metadata=app.server
    )
    types = {f.name: f.type for f in fields.fields}
    assert types[name] == customer_field_pb2.FIELD_TYPE_STRING


# -- bad requests ----------------------------------------------------------------------------------


async def test_bad_options_are_invalid_argument_naming_each_field(
    identity_stub: IdentityServiceAsyncStub, app: TestApp
) -> None:
    bad = Options(
        import_id="Not Valid!",
        identifier_kind=ALIAS,
        alias_label="Bad Label",
        delimiter=";;",
        columns=[
            standard("a", "shoe_size"),
            attribute("b", BOOL, name="Plan"),
            import_pb2.ImportColumn(column=""),
            attribute("d", STRING, fmt="%d"),
            subscription("e", spb.SUBSCRIPTION_TYPE_WEB_PUSH),
            standard("a", "first_name"),
        ],
    )
    error = await failure(upload(identity_stub, app, bad, b"id\n"))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(error.fields) >= {
        "options.import_id",
        "options.identifier_column",
        "options.alias_label",
        "options.delimiter",
        "options.columns[0].standard_field",
        "options.columns[1].attribute.name",
        "options.columns[2].column",
        "options.columns[2].target",
        "options.columns[3].date_format",
        "options.columns[4].subscription.type",
        "options.columns[5].column",
    }


async def test_a_header_without_the_named_columns_fails_the_job(
    identity_stub: IdentityServiceAsyncStub, app: TestApp
) -> None:
    import_id = f"hdr-{new_id()}"
    opts = options(standard("email"), standard("first_name", "first_name"), import_id=import_id)
    error = await failure(upload(identity_stub, app, opts, b"id,email,email\n1,a,b\n"))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.fields == ["options.columns[0].column", "options.columns[1].column"]
    job = await identity_stub.GetImportJob(
        import_pb2.GetImportJobRequest(import_id=import_id), metadata=app.server
    )
    assert job.state == Job.STATE_FAILED
    assert job.error
    empty = await failure(upload(identity_stub, app, options(standard("email")), b""))
    assert (empty.code, empty.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "EMPTY_FILE")


async def test_the_first_message_must_be_the_options(
    identity_stub: IdentityServiceAsyncStub, app: TestApp
) -> None:
    async def chunk_first() -> AsyncIterator[import_pb2.ImportUsersRequest]:
        yield import_pb2.ImportUsersRequest(chunk=b"id\n")

    error = await failure(identity_stub.ImportUsers(chunk_first(), metadata=app.server))
    assert (error.code, error.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["options"])

    async def twice() -> AsyncIterator[import_pb2.ImportUsersRequest]:
        yield import_pb2.ImportUsersRequest(options=options(standard("email")))
        yield import_pb2.ImportUsersRequest(options=options(standard("email")))

    error = await failure(identity_stub.ImportUsers(twice(), metadata=app.server))
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "OPTIONS_SENT_TWICE")


async def test_client_keys_cannot_import(
    identity_stub: IdentityServiceAsyncStub, app: TestApp
) -> None:
    async def requests() -> AsyncIterator[import_pb2.ImportUsersRequest]:
        yield import_pb2.ImportUsersRequest(options=options(standard("email")))

    error = await failure(identity_stub.ImportUsers(requests(), metadata=app.client))
    assert error.code == grpc.StatusCode.PERMISSION_DENIED


async def test_imported_changes_move_users_into_dynamic_segments(
    identity_stub: IdentityServiceAsyncStub, app: TestApp, feed: ChangeFeed
) -> None:
    await identity_stub.CreateCustomerField(
        pb.CreateCustomerFieldRequest(
            field=customer_field_pb2.CustomerField(
                name="plan", type=customer_field_pb2.FIELD_TYPE_STRING
            )
        ),
        metadata=app.server,
    )
    segment = await create_segment(
        identity_stub, app, attr("attributes.plan", Op.OPERATOR_EQUALS, "gold")
    )
    gold, silver = new_id(), new_id()
    rows = [["id", "plan"], [gold, "gold"], [silver, "silver"]]
    await _ok(identity_stub, app, options(attribute("plan", STRING)), csv_bytes(rows))

    async def members_now() -> set[str]:
        return await member_external_ids(identity_stub, app, segment.segment_id)

    assert await eventually(members_now, lambda found: found == {gold}) == {gold}
    [entered] = await feed.wait_for(Kind.KIND_SEGMENT_ENTERED)
    assert entered.segment_id == segment.segment_id
