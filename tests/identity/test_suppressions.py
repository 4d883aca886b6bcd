"""The suppression list: an opt-out outlives its subscription, so an import never resubscribes.

Through the real server: an address is registered, unsubscribed, and its subscription goes
(DeleteUser or DeleteSubscription); a CSV import naming it later under another profile creates
it unsubscribed. A registration through the API is consent and resubscribes. The table holds
keyed hashes only (read directly from the service's database).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import asyncpg
from google.protobuf import field_mask_pb2
from tidings.identity.v1 import identity_service_pb2 as pb
from tidings.identity.v1 import subscription_pb2 as spb

from services.identity import pii, suppressions
from services.identity.settings import DEV_SECRET_KEY
from tests.identity.conftest import TestApp
from tests.identity.import_support import Job, csv_bytes, options, subscription, upload, user
from tests.identity.support import EMAIL, create, email, ext, new_id

if TYPE_CHECKING:
    from tidings.identity.v1.identity_service_pb2_grpc import IdentityServiceAsyncStub

UNSUBSCRIBED = spb.OPT_IN_STATE_UNSUBSCRIBED
SUBSCRIBED = spb.OPT_IN_STATE_SUBSCRIBED


async def _opted_out(
    stub: IdentityServiceAsyncStub, app: TestApp, owner: str, address: str
) -> spb.Subscription:
    """``owner``'s email subscription of ``address``, registered and then unsubscribed."""
    await stub.UpsertUser(pb.UpsertUserRequest(ref=ext(owner)), metadata=app.server)
    created = await stub.CreateSubscription(
        create(spb.Subscription(type=EMAIL, token=address), ext(owner)), metadata=app.server
    )
    updated: spb.Subscription = await stub.UpdateSubscription(
        pb.UpdateSubscriptionRequest(
            subscription=spb.Subscription(
                subscription_id=created.subscription_id, opt_in=UNSUBSCRIBED
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["opt_in"]),
        ),
        metadata=app.server,
    )
    return updated


async def _import_email(
    stub: IdentityServiceAsyncStub, app: TestApp, external_id: str, address: str
) -> spb.Subscription:
    """Import ``address`` for a new profile ``external_id``; its one subscription."""
    job = await upload(
        stub,
        app,
        options(subscription("mail", EMAIL)),
        csv_bytes([["id", "mail"], [external_id, address]]),
    )
    assert job.state == Job.STATE_SUCCEEDED, job.error
    assert (job.created, job.rejected) == (1, 0)
    [imported] = (await user(stub, app, external_id)).subscriptions
    return imported


async def _stored_hashes(dsn: str, app_id: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch("SELECT * FROM suppressions WHERE app_id = $1", app_id)
    finally:
        await conn.close()


async def test_an_erased_users_opt_out_survives_an_import_under_another_profile(
    identity_stub: IdentityServiceAsyncStub, app: TestApp
) -> None:
    owner, address = new_id(), email()
    await _opted_out(identity_stub, app, owner, address)
    await identity_stub.DeleteUser(pb.DeleteUserRequest(ref=ext(owner)), metadata=app.server)
    imported = await _import_email(identity_stub, app, new_id(), address.upper())
    assert (imported.token, imported.opt_in, imported.opt_in_reason) == (
        address,
        UNSUBSCRIBED,
        "suppressed",
    )


async def test_a_deleted_opted_out_subscription_is_not_resubscribed_by_an_import(
    identity_stub: IdentityServiceAsyncStub, app: TestApp
) -> None:
    address = email()
    gone = await _opted_out(identity_stub, app, new_id(), address)
    await identity_stub.DeleteSubscription(
        pb.DeleteSubscriptionRequest(subscription_id=gone.subscription_id), metadata=app.server
    )
    imported = await _import_email(identity_stub, app, new_id(), address)
    assert imported.opt_in == UNSUBSCRIBED
    assert imported.subscription_id != gone.subscription_id


async def test_an_address_never_opted_out_imports_subscribed(
    identity_stub: IdentityServiceAsyncStub, app: TestApp, identity_database: str
) -> None:
    owner, address = new_id(), email()
    await identity_stub.UpsertUser(pb.UpsertUserRequest(ref=ext(owner)), metadata=app.server)
    await identity_stub.CreateSubscription(
        create(spb.Subscription(type=EMAIL, token=address), ext(owner)), metadata=app.server
    )
    await identity_stub.DeleteUser(pb.DeleteUserRequest(ref=ext(owner)), metadata=app.server)
    assert await _stored_hashes(identity_database, app.app_id) == []
    imported = await _import_email(identity_stub, app, new_id(), address)
    assert (imported.opt_in, imported.opt_in_reason) == (SUBSCRIBED, "")


async def test_a_registration_through_the_api_resubscribes_and_clears_the_suppression(
    identity_stub: IdentityServiceAsyncStub, app: TestApp, identity_database: str
) -> None:
    owner, address = new_id(), email()
    await _opted_out(identity_stub, app, owner, address)
    await identity_stub.DeleteUser(pb.DeleteUserRequest(ref=ext(owner)), metadata=app.server)
    assert len(await _stored_hashes(identity_database, app.app_id)) == 1
    # The person registers the address again in the app: fresh consent.
    again = await identity_stub.CreateSubscription(
        create(spb.Subscription(type=EMAIL, token=address)), metadata=app.server
    )
    assert again.opt_in == SUBSCRIBED
    assert await _stored_hashes(identity_database, app.app_id) == []
    # Deleted while subscribed, it leaves nothing behind: a later import subscribes it.
    await identity_stub.DeleteSubscription(
        pb.DeleteSubscriptionRequest(subscription_id=again.subscription_id), metadata=app.server
    )
    imported = await _import_email(identity_stub, app, new_id(), address)
    assert imported.opt_in == SUBSCRIBED


async def test_an_import_consumes_the_suppression_it_honours(
    identity_stub: IdentityServiceAsyncStub, app: TestApp, identity_database: str
) -> None:
    address = email()
    gone = await _opted_out(identity_stub, app, new_id(), address)
    await identity_stub.DeleteSubscription(
        pb.DeleteSubscriptionRequest(subscription_id=gone.subscription_id), metadata=app.server
    )
    await _import_email(identity_stub, app, new_id(), address)
    # The created subscription carries the opt-out now; the list holds only what has no row.
    assert await _stored_hashes(identity_database, app.app_id) == []


async def test_the_suppression_list_holds_no_clear_text_address(
    identity_stub: IdentityServiceAsyncStub, app: TestApp, identity_database: str
) -> None:
    owner, address = new_id(), email()
    await _opted_out(identity_stub, app, owner, address)
    await identity_stub.DeleteUser(pb.DeleteUserRequest(ref=ext(owner)), metadata=app.server)
    [row] = await _stored_hashes(identity_database, app.app_id)
    assert (row["type"], len(row["token_hash"])) == ("email", 16)
    stored = repr(dict(row)).encode() + bytes(row["token_hash"])
    assert address.encode() not in stored
    # Keyed: not a plain hash anyone could compute from a list of addresses.
    for plain in (address.encode(), f"{app.app_id}\0email\0{address}".encode()):
        for algorithm in ("sha256", "sha1", "md5"):
            assert hashlib.new(algorithm, plain).digest()[:16] != row["token_hash"]


def test_a_rotated_key_still_matches_and_new_hashes_use_the_newest() -> None:
    try:
        pii.configure("old-material")
        before = suppressions.Hasher("app_x", "email").newest("ana@example.com")
        pii.configure("new-material,old-material")
        hasher = suppressions.Hasher("app_x", "email")
        newest, older = hasher.all("ana@example.com")
        assert (older, hasher.newest("ana@example.com")) == (before, newest)
        assert newest != before
        assert suppressions.Hasher("app_y", "email").all("ana@example.com")[1] != before
    finally:
        pii.configure(DEV_SECRET_KEY)
