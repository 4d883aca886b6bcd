"""Values of PII customer fields are sealed at rest (issue 7 item 8; docs/identity.md).

A real identity process of this module's own, on its own scratch database, with a known
``TIDINGS_IDENTITY_SECRET_KEY`` (so the database can be dumped and a value opened by hand), and
restarted with ``new,old`` to rotate it.
"""

from __future__ import annotations

import asyncio
import glob
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import grpc.aio
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from tidings.identity.v1 import (
    apps_service_pb2_grpc,
    customer_field_pb2,
    identity_service_pb2_grpc,
    user_pb2,
    user_ref_pb2,
)
from tidings.identity.v1 import identity_service_pb2 as pb
from tidings.identity.v1 import segment_pb2 as sp
from tidings.identity.v1 import subscription_pb2 as spb

from services.identity.pii import SEALED_KEY, PiiBox, context
from tests.conftest import temporary_database
from tests.e2e.processes import ServiceProcess, running_service
from tests.identity.conftest import TestApp, create_test_app
from tests.identity.import_support import NUMBER, STRING, attribute, csv_bytes, options, upload
from tests.identity.support import email, ext, failure, s
from tests.identity.test_segments_support import Op, attr, count, create_segment, upsert
from tests.polling import eventually

OLD_KEY = "pii-test-key-old"
NEW_KEY = "pii-test-key-new"
FIELD = customer_field_pb2.CustomerField
STRING_TYPE = customer_field_pb2.FIELD_TYPE_STRING
NUMBER_TYPE = customer_field_pb2.FIELD_TYPE_NUMBER
BOOL_TYPE = customer_field_pb2.FIELD_TYPE_BOOL
TIME_TYPE = customer_field_pb2.FIELD_TYPE_TIMESTAMP


def canary(kind: str) -> str:
    return f"canary-{kind}-{uuid.uuid4().hex[:12]}"


@dataclass
class Identity:
    dsn: str
    tmp: Path
    process: ServiceProcess
    stub: Any
    apps: Any
    channel: grpc.aio.Channel


@pytest.fixture(scope="module")
async def identity(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Identity]:
    tmp = tmp_path_factory.mktemp("pii")
    async with (
        temporary_database() as dsn,
        running_service(
            "identity",
            database_url=dsn,
            log_dir=tmp,
            env={"TIDINGS_IDENTITY_SECRET_KEY": OLD_KEY},
        ) as process,
    ):
        await process.wait_serving()
        async with grpc.aio.insecure_channel(process.grpc_target) as channel:
            yield Identity(
                dsn,
                tmp,
                process,
                identity_service_pb2_grpc.IdentityServiceStub(channel),
                apps_service_pb2_grpc.AppsServiceStub(channel),
                channel,
            )


@pytest.fixture
async def app(identity: Identity) -> TestApp:
    return await create_test_app(identity.apps)


async def define(identity: Identity, app: TestApp, name: str, kind: Any, *, pii: bool) -> None:
    await identity.stub.CreateCustomerField(
        pb.CreateCustomerFieldRequest(field=FIELD(name=name, type=kind, pii=pii)),
        metadata=app.server,
    )


async def flip(identity: Identity, app: TestApp, name: str, *, pii: bool) -> Any:
    return await identity.stub.UpdateCustomerField(
        pb.UpdateCustomerFieldRequest(
            field=FIELD(name=name, pii=pii), update_mask=field_mask_pb2.FieldMask(paths=["pii"])
        ),
        metadata=app.server,
    )


async def stored(dsn: str, app: TestApp, external_id: str) -> dict[str, Any]:
    """The ``attributes`` column as the database holds it."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.set_type_codec("jsonb", encoder=str, decoder=_loads, schema="pg_catalog")
        row = await conn.fetchrow(
            "SELECT user_id, attributes FROM users WHERE app_id = $1 AND external_id = $2",
            app.app_id,
            external_id,
        )
    finally:
        await conn.close()
    assert row is not None
    return {"user_id": row["user_id"], **row["attributes"]}


def _loads(text: str) -> Any:
    return json.loads(text)


async def pg_dump(dsn: str) -> bytes:
    """A plain-SQL dump of the database (schema and data)."""
    binary = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_dump"))[-1:] or ["pg_dump"]
    process = await asyncio.create_subprocess_exec(
        binary[0],
        "--no-owner",
        f"--dbname={dsn}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()
    return out


async def get_attributes(identity: Identity, app: TestApp, external_id: str) -> dict[str, Any]:
    user = await identity.stub.GetUser(pb.GetUserRequest(ref=ext(external_id)), metadata=app.server)
    return {name: _plain(v) for name, v in user.attributes.items()}


def _plain(v: Any) -> Any:
    kind = v.WhichOneof("kind")
    if kind == "timestamp_value":
        return v.timestamp_value.ToDatetime(tzinfo=UTC)
    return getattr(v, kind)


def violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    """The field violations of a failed call: path → description."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    found = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found.update({v.field: v.description for v in bad.field_violations})
    return found


def is_sealed(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {SEALED_KEY}


async def test_upserted_pii_values_are_sealed_at_rest_and_read_back_typed(
    identity: Identity, app: TestApp
) -> None:
    await define(identity, app, "secret", STRING_TYPE, pii=True)
    await define(identity, app, "score", NUMBER_TYPE, pii=True)
    await define(identity, app, "vip", BOOL_TYPE, pii=True)
    await define(identity, app, "seen", TIME_TYPE, pii=True)
    await define(identity, app, "plan", STRING_TYPE, pii=False)
    secret, plain = canary("upsert-pii"), canary("upsert-plain")
    seen = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
    user_id = await upsert(
        identity.stub,
        app,
        "u1",
        {"secret": secret, "score": 41.5, "vip": True, "seen": seen, "plan": plain},
    )
    # Increment works on a PII number: the value is opened, added to and sealed again.
    await identity.stub.UpsertUser(
        pb.UpsertUserRequest(ref=ext("u1"), increment_attributes={"score": 1.0}),
        metadata=app.server,
    )
    want = {"secret": secret, "score": 42.5, "vip": True, "seen": seen, "plan": plain}
    assert await get_attributes(identity, app, "u1") == want

    batch = await identity.stub.BatchGetUsers(
        pb.BatchGetUsersRequest(refs=[ext("u1")]), metadata=app.server
    )
    assert batch.results[0].user.attributes["secret"].string_value == secret
    listed = await identity.stub.ListUsers(pb.ListUsersRequest(), metadata=app.server)
    assert [u.attributes["secret"].string_value for u in listed.users] == [secret]
    exported = await identity.stub.ExportUser(
        pb.ExportUserRequest(ref=ext("u1")), metadata=app.server
    )
    assert exported.user.attributes["score"].number_value == 42.5

    row = await stored(identity.dsn, app, "u1")
    assert all(is_sealed(row[name]) for name in ("secret", "score", "vip", "seen"))
    assert row["plan"] == plain
    # Bound to app, user and field: the value opens there and nowhere else.
    box = PiiBox(OLD_KEY)
    assert box.open_value(row["secret"], context(app.app_id, user_id, "secret")) == secret
    with pytest.raises(Exception, match="cannot be opened"):
        box.open_value(row["secret"], context(app.app_id, str(uuid.uuid4()), "secret"))
    with pytest.raises(Exception, match="cannot be opened"):
        box.open_value(row["secret"], context(app.app_id, user_id, "plan"))

    dump = await pg_dump(identity.dsn)
    assert plain.encode() in dump  # the dump would show a plaintext canary
    assert secret.encode() not in dump


async def test_imported_pii_cells_are_sealed_before_staging(
    identity: Identity, app: TestApp
) -> None:
    await define(identity, app, "secret", STRING_TYPE, pii=True)
    await define(identity, app, "score", NUMBER_TYPE, pii=True)
    await upsert(identity.stub, app, "old", {"secret": "before"})
    secrets = {key: canary(f"import-{key}") for key in ("old", "new1", "new2")}
    plain = canary("import-plain")
    rows = [["id", "secret", "score", "note"]]
    rows += [[key, value, "7", plain] for key, value in secrets.items()]
    rows.append(["bad", canary("rejected"), "not-a-number", plain])
    opts = options(
        attribute("secret", STRING), attribute("score", NUMBER), attribute("note", STRING)
    )
    job = await upload(identity.stub, app, opts, csv_bytes(rows), chunk=4096)
    assert (job.rows, job.created, job.updated, job.rejected) == (4, 2, 1, 1)
    for key, value in secrets.items():
        got = await get_attributes(identity, app, key)
        assert got == {"secret": value, "score": 7.0, "note": plain}
        row = await stored(identity.dsn, app, key)
        assert is_sealed(row["secret"])
        assert is_sealed(row["score"])
        assert row["note"] == plain

    # The same file again: sealed values compare equal, so the rows are unchanged.
    again = await upload(identity.stub, app, opts, csv_bytes(rows), chunk=4096)
    assert (again.created, again.updated, again.unchanged, again.rejected) == (0, 0, 3, 1)

    dump = await pg_dump(identity.dsn)
    assert plain.encode() in dump
    assert not any(value.encode() in dump for value in secrets.values())
    assert b"not-a-number" not in dump  # a PII cell's rejection does not quote it


async def test_segments_allow_only_exists_on_pii_fields(identity: Identity, app: TestApp) -> None:
    await define(identity, app, "secret", STRING_TYPE, pii=True)
    await upsert(identity.stub, app, "a", {"secret": "x"})
    await upsert(identity.stub, app, "b", {})
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await identity.stub.CreateSegment(
            sp.CreateSegmentRequest(
                segment=sp.Segment(
                    display_name="by secret",
                    condition=attr("attributes.secret", Op.OPERATOR_EQUALS, "x"),
                )
            ),
            metadata=app.server,
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    described = violations(raised.value)
    problem = described["segment.condition.attribute.operator"]
    assert "attributes.secret" in problem
    assert "PII" in problem
    assert "EXISTS" in problem
    assert await count(identity.stub, app, attr("attributes.secret", Op.OPERATOR_EXISTS)) == 1
    assert await count(identity.stub, app, attr("attributes.secret", Op.OPERATOR_NOT_EXISTS)) == 1


async def test_flipping_pii_seals_and_opens_stored_values(identity: Identity, app: TestApp) -> None:
    await define(identity, app, "nick", STRING_TYPE, pii=False)
    values = {f"f{i}": canary(f"flip{i}") for i in range(5)}
    for key, value in values.items():
        await upsert(identity.stub, app, key, {"nick": value})
    comparing = await create_segment(
        identity.stub, app, attr("attributes.nick", Op.OPERATOR_STARTS_WITH, "canary")
    )
    blocked = await failure(flip(identity, app, "nick", pii=True))
    assert (blocked.code, blocked.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "PII_FIELD_IN_SEGMENT",
    )
    assert comparing.segment_id in blocked.message
    assert not is_sealed((await stored(identity.dsn, app, "f0"))["nick"])
    await identity.stub.DeleteSegment(
        sp.DeleteSegmentRequest(segment_id=comparing.segment_id), metadata=app.server
    )
    await create_segment(identity.stub, app, attr("attributes.nick", Op.OPERATOR_EXISTS))

    field = await flip(identity, app, "nick", pii=True)
    assert field.pii
    for key, value in values.items():
        assert is_sealed((await stored(identity.dsn, app, key))["nick"])
        assert (await get_attributes(identity, app, key))["nick"] == value
    dump = await pg_dump(identity.dsn)
    assert not any(value.encode() in dump for value in values.values())

    field = await flip(identity, app, "nick", pii=False)
    assert not field.pii
    for key, value in values.items():
        assert (await stored(identity.dsn, app, key))["nick"] == value
        assert (await get_attributes(identity, app, key))["nick"] == value


async def test_update_customer_field_validates_and_changes_only_what_the_mask_names(
    identity: Identity, app: TestApp
) -> None:
    await define(identity, app, "nick", STRING_TYPE, pii=True)
    described = await identity.stub.UpdateCustomerField(
        pb.UpdateCustomerFieldRequest(
            field=FIELD(name="nick", description="what friends call them", pii=False),
            update_mask=field_mask_pb2.FieldMask(paths=["description"]),
        ),
        metadata=app.server,
    )
    assert (described.description, described.pii) == ("what friends call them", True)
    assert described.type == STRING_TYPE
    unknown = await failure(flip(identity, app, "never_defined", pii=True))
    assert (unknown.code, unknown.reason) == (grpc.StatusCode.NOT_FOUND, "CUSTOMER_FIELD_NOT_FOUND")
    bad = await failure(
        identity.stub.UpdateCustomerField(
            pb.UpdateCustomerFieldRequest(
                field=FIELD(name="Not A Name"),
                update_mask=field_mask_pb2.FieldMask(paths=["type"]),
            ),
            metadata=app.server,
        )
    )
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(bad.fields) == {"field.name", "update_mask.paths[0]"}
    client = await failure(
        identity.stub.UpdateCustomerField(
            pb.UpdateCustomerFieldRequest(field=FIELD(name="nick")), metadata=app.client
        )
    )
    assert client.code == grpc.StatusCode.PERMISSION_DENIED


async def test_adopting_an_auto_defined_field_as_pii_seals_its_values(
    identity: Identity, app: TestApp
) -> None:
    value = canary("adopted")
    await upsert(identity.stub, app, "a1", {"handle": value})  # auto-defined, not PII
    assert (await stored(identity.dsn, app, "a1"))["handle"] == value
    await define(identity, app, "handle", STRING_TYPE, pii=True)
    assert is_sealed((await stored(identity.dsn, app, "a1"))["handle"])
    assert (await get_attributes(identity, app, "a1"))["handle"] == value


async def test_login_merge_reseals_moved_pii_values_for_their_new_user(
    identity: Identity, app: TestApp
) -> None:
    await define(identity, app, "secret", STRING_TYPE, pii=True)
    secret = canary("merge")
    await upsert(identity.stub, app, "known", {})
    device = await identity.stub.CreateSubscription(
        pb.CreateSubscriptionRequest(
            subscription=spb.Subscription(type=spb.SUBSCRIPTION_TYPE_EMAIL, token=email())
        ),
        metadata=app.server,
    )
    await identity.stub.UpsertUser(
        pb.UpsertUserRequest(
            ref=user_ref_pb2.UserRef(subscription_id=device.subscription_id),
            user=user_pb2.User(attributes={"secret": s(secret)}),
        ),
        metadata=app.server,
    )
    await identity.stub.Login(
        pb.LoginRequest(subscription_id=device.subscription_id, external_id="known"),
        metadata=app.server,
    )
    assert (await get_attributes(identity, app, "known"))["secret"] == secret


async def test_unfinished_flip_is_finished_and_keys_rotate_at_start_up(
    identity: Identity, app: TestApp
) -> None:
    await define(identity, app, "secret", STRING_TYPE, pii=True)
    await define(identity, app, "later", STRING_TYPE, pii=False)
    secret, later = canary("rotate"), canary("crashed-flip")
    await upsert(identity.stub, app, "r1", {"secret": secret, "later": later})
    # A flip whose flag committed but whose conversion never ran (the process died).
    conn = await asyncpg.connect(identity.dsn)
    try:
        await conn.execute(
            "UPDATE customer_fields SET pii = true, pii_settled = false"
            " WHERE app_id = $1 AND name = 'later'",
            app.app_id,
        )
    finally:
        await conn.close()
    # Readers take both forms meanwhile.
    assert (await get_attributes(identity, app, "r1"))["later"] == later
    before = await stored(identity.dsn, app, "r1")
    assert before["later"] == later

    await identity.process.stop()
    async with running_service(
        "identity",
        database_url=identity.dsn,
        log_dir=identity.tmp,
        env={"TIDINGS_IDENTITY_SECRET_KEY": f"{NEW_KEY},{OLD_KEY}"},
    ) as rotating:
        await rotating.wait_serving()
        where = context(app.app_id, before["user_id"], "secret")
        newest = PiiBox(NEW_KEY)

        def resealed(now: dict[str, Any]) -> bool:
            try:
                newest.open_value(now["secret"], where)
                return is_sealed(now["later"])
            except Exception:
                return False

        await eventually(
            lambda: stored(identity.dsn, app, "r1"),
            resealed,
            within=30,
            interval=0.2,
            what="the attributes re-sealed with the new key",
        )
        async with grpc.aio.insecure_channel(rotating.grpc_target) as channel:
            stub = identity_service_pb2_grpc.IdentityServiceStub(channel)
            user = await stub.GetUser(pb.GetUserRequest(ref=ext("r1")), metadata=app.server)
            assert user.attributes["secret"].string_value == secret
            assert user.attributes["later"].string_value == later
        await rotating.stop()

    # The old key dropped: everything still opens.
    async with running_service(
        "identity",
        database_url=identity.dsn,
        log_dir=identity.tmp,
        env={"TIDINGS_IDENTITY_SECRET_KEY": NEW_KEY},
    ) as renewed:
        await renewed.wait_serving()
        async with grpc.aio.insecure_channel(renewed.grpc_target) as channel:
            stub = identity_service_pb2_grpc.IdentityServiceStub(channel)
            user = await stub.GetUser(pb.GetUserRequest(ref=ext("r1")), metadata=app.server)
            assert user.attributes["secret"].string_value == secret
            assert user.attributes["later"].string_value == later
    dump = await pg_dump(identity.dsn)
    assert secret.encode() not in dump
    assert later.encode() not in dump
