"""Login and Logout through the real identity process: identify, merge, refuse to merge two
identified users, detach, the client-key setting, login proofs, caps during a merge, and
concurrent logins."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import uuid
from typing import TYPE_CHECKING

import grpc
import grpc.aio
import pytest
from google.protobuf import field_mask_pb2
from google.protobuf.struct_pb2 import Struct
from tidings.identity.v1 import app_pb2, apps_service_pb2, identity_service_pb2_grpc, user_pb2
from tidings.identity.v1 import identity_service_pb2 as pb
from tidings.identity.v1.user_ref_pb2 import UserRef

from services.identity.login import plan_merge
from services.identity.subscriptions_store import SubscriptionType
from tests.identity.conftest import ADMIN, TestApp, create_test_app
from tests.identity.support import (
    EMAIL,
    IOS,
    SMS,
    WEB,
    ChangeFeed,
    Kind,
    address,
    by_id,
    create,
    ext,
    failure,
    push,
    record,
)
from tests.polling import eventually

if TYPE_CHECKING:  # the async stub types exist only in the generated type stubs
    from tidings.identity.v1.apps_service_pb2_grpc import AppsServiceAsyncStub

    Stub = identity_service_pb2_grpc.IdentityServiceAsyncStub


def crm_id() -> str:
    return f"crm-{uuid.uuid4().hex[:10]}"


async def login(
    identity_stub: Stub, app: TestApp, subscription_id: str, external_id: str
) -> pb.LoginResponse:
    return await identity_stub.Login(
        pb.LoginRequest(subscription_id=subscription_id, external_id=external_id),
        metadata=app.server,
    )


async def known_user(
    identity_stub: Stub, app: TestApp, external_id: str, first_name: str = ""
) -> user_pb2.User:
    """An identified user created by UpsertUser."""
    response = await identity_stub.UpsertUser(
        pb.UpsertUserRequest(ref=ext(external_id), user=user_pb2.User(first_name=first_name)),
        metadata=app.server,
    )
    return response.user


async def get_user(identity_stub: Stub, app: TestApp, ref: UserRef) -> user_pb2.User:
    return await identity_stub.GetUser(pb.GetUserRequest(ref=ref), metadata=app.server)


# --- the merge plan (pure) ---------------------------------------------------------------------


def test_a_merge_moves_the_device_first_and_fills_only_the_room_left() -> None:
    known = [record(SubscriptionType.EMAIL) for _ in range(18)]
    device = record(active_minutes_ago=30)
    recent, older, oldest = (record(SubscriptionType.SMS, active_minutes_ago=m) for m in (1, 2, 3))
    plan = plan_merge(device, known, [oldest, device, recent, older])
    assert plan.evict == []
    assert plan.move == [device, recent]
    assert plan.drop == [older, oldest]


def test_a_merge_evicts_for_the_device_only() -> None:
    known = [record(active_minutes_ago=m) for m in range(20)]
    device, other = record(), record(SubscriptionType.EMAIL)
    plan = plan_merge(device, known, [device, other])
    assert plan.evict == [known[-1]]
    assert (plan.move, plan.drop) == ([device], [other])


# --- identify -----------------------------------------------------------------------------------


async def test_login_identifies_an_anonymous_device(
    identity_stub: Stub, app: TestApp, feed: ChangeFeed
) -> None:
    device = await identity_stub.CreateSubscription(create(push()), metadata=app.client)
    external_id = crm_id()
    response = await login(identity_stub, app, device.subscription_id, external_id)
    assert response.user.user_id == device.user_id
    assert response.user.external_id == external_id
    assert response.merged_user_id == ""
    assert [s.subscription_id for s in response.user.subscriptions] == [device.subscription_id]
    assert (await get_user(identity_stub, app, ext(external_id))).user_id == device.user_id
    [fact] = await feed.wait_for(Kind.KIND_USER_UPDATED)
    assert (fact.user_id, fact.external_id) == (device.user_id, external_id)
    assert list(fact.changed_fields) == ["external_id"]

    again = await login(identity_stub, app, device.subscription_id, external_id)
    assert again.user.user_id == device.user_id
    assert again.merged_user_id == ""


async def test_login_merges_the_anonymous_profile_into_the_known_user(
    identity_stub: Stub, app: TestApp, apps_stub: AppsServiceAsyncStub, feed: ChangeFeed
) -> None:
    external_id = crm_id()
    known = await known_user(identity_stub, app, external_id, first_name="Ana")
    await identity_stub.UpsertUser(
        pb.UpsertUserRequest(
            ref=ext(external_id),
            user=user_pb2.User(attributes={"plan": user_pb2.AttributeValue(string_value="gold")}),
        ),
        metadata=app.server,
    )
    await identity_stub.AddAlias(
        pb.AddAliasRequest(
            ref=ext(external_id), alias=user_pb2.Alias(label="crm_id", value=crm_id())
        ),
        metadata=app.server,
    )
    mail = await identity_stub.CreateSubscription(
        create(address(EMAIL), ext(external_id)), metadata=app.server
    )

    device = await identity_stub.CreateSubscription(create(push(IOS)), metadata=app.client)
    anonymous = device.user_id
    web = await identity_stub.CreateSubscription(
        create(push(WEB), by_id(anonymous)), metadata=app.server
    )
    await identity_stub.UpsertUser(
        pb.UpsertUserRequest(
            ref=by_id(anonymous),
            user=user_pb2.User(
                first_name="Anon",
                last_name="García",
                attributes={
                    "plan": user_pb2.AttributeValue(string_value="free"),
                    "seen_onboarding": user_pb2.AttributeValue(bool_value=True),
                },
            ),
        ),
        metadata=app.server,
    )
    facebook = crm_id()
    for label, value in (("facebook_id", facebook), ("crm_id", crm_id())):
        await identity_stub.AddAlias(
            pb.AddAliasRequest(
                ref=by_id(anonymous), alias=user_pb2.Alias(label=label, value=value)
            ),
            metadata=app.server,
        )
    tracked = await identity_stub.TrackEvents(
        pb.TrackEventsRequest(
            events=[
                pb.TrackedEventInput(
                    user=UserRef(subscription_id=device.subscription_id),
                    name="app_open",
                    properties=Struct(),
                )
            ]
        ),
        metadata=app.client,
    )
    event_id = tracked.results[0].event_id
    await _until_event_stored(identity_stub, app, by_id(anonymous), event_id)

    response = await login(identity_stub, app, device.subscription_id, external_id)

    assert response.merged_user_id == anonymous
    user = response.user
    assert user.user_id == known.user_id
    assert (user.first_name, user.last_name) == ("Ana", "García")
    assert user.attributes["plan"].string_value == "gold"
    assert user.attributes["seen_onboarding"].bool_value
    assert {(a.label, a.value) for a in user.aliases} >= {("facebook_id", facebook)}
    assert {a.label for a in user.aliases} == {"crm_id", "facebook_id"}
    assert {s.subscription_id for s in user.subscriptions} == {
        mail.subscription_id,
        device.subscription_id,
        web.subscription_id,
    }
    gone = await failure(get_user(identity_stub, app, by_id(anonymous)))
    assert gone.code == grpc.StatusCode.NOT_FOUND
    events = await identity_stub.ListEvents(
        pb.ListEventsRequest(user=by_id(known.user_id)), metadata=app.server
    )
    assert event_id in {e.event_id for e in events.events}

    export = await identity_stub.ExportUser(
        pb.ExportUserRequest(ref=by_id(known.user_id)), metadata=app.server
    )
    [merge] = export.merges
    assert (merge.from_user_id, merge.into_user_id) == (anonymous, known.user_id)
    assert merge.subscription_id == device.subscription_id
    assert merge.key_id == await _server_key_id(apps_stub, app)
    assert merge.merge_time.seconds > 0

    [merged] = await feed.wait_for(Kind.KIND_USER_MERGED)
    assert (merged.user_id, merged.merged_user_id) == (known.user_id, anonymous)
    assert set(merged.changed_fields) == {
        "last_name",
        "attributes.seen_onboarding",
        "aliases.facebook_id",
    }
    for sid in (device.subscription_id, web.subscription_id):
        [moved] = await feed.wait_for(Kind.KIND_SUBSCRIPTION_CHANGED, sid)
        assert moved.user_id == known.user_id


async def _until_event_stored(
    identity_stub: Stub, app: TestApp, user: UserRef, event_id: str
) -> None:
    async def stored() -> set[str]:
        listed = await identity_stub.ListEvents(
            pb.ListEventsRequest(user=user), metadata=app.server
        )
        return {e.event_id for e in listed.events}

    await eventually(
        stored, lambda found: event_id in found, within=20, what="the tracked event stored"
    )


async def _server_key_id(apps_stub: AppsServiceAsyncStub, app: TestApp) -> str:
    keys = await apps_stub.ListApiKeys(
        apps_service_pb2.ListApiKeysRequest(app_id=app.app_id), metadata=ADMIN
    )
    [server] = [k for k in keys.api_keys if k.scope == app_pb2.API_KEY_SCOPE_SERVER]
    return server.key_id


async def test_two_identified_users_are_never_merged(identity_stub: Stub, app: TestApp) -> None:
    device = await identity_stub.CreateSubscription(create(push()), metadata=app.client)
    first = crm_id()
    await login(identity_stub, app, device.subscription_id, first)
    other = crm_id()
    await known_user(identity_stub, app, other)
    for external_id in (other, crm_id()):
        error = await failure(login(identity_stub, app, device.subscription_id, external_id))
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION
        assert error.reason == "USER_ALREADY_IDENTIFIED"
        assert error.fields == ["external_id"]
    holder = await get_user(identity_stub, app, ext(first))
    assert [s.subscription_id for s in holder.subscriptions] == [device.subscription_id]


async def test_logout_detaches_onto_a_fresh_anonymous_profile(
    identity_stub: Stub, app: TestApp, feed: ChangeFeed
) -> None:
    device = await identity_stub.CreateSubscription(create(push()), metadata=app.client)
    first = crm_id()
    identified = (await login(identity_stub, app, device.subscription_id, first)).user
    out = await identity_stub.Logout(
        pb.LogoutRequest(subscription_id=device.subscription_id), metadata=app.server
    )
    assert out.user.user_id != identified.user_id
    assert out.user.external_id == ""
    assert [s.subscription_id for s in out.user.subscriptions] == [device.subscription_id]
    assert list((await get_user(identity_stub, app, ext(first))).subscriptions) == []
    [removed] = await feed.wait_for(Kind.KIND_SUBSCRIPTION_REMOVED, device.subscription_id)
    assert removed.user_id == identified.user_id

    again = await identity_stub.Logout(
        pb.LogoutRequest(subscription_id=device.subscription_id), metadata=app.server
    )
    assert again.user.user_id == out.user.user_id

    # Someone else logs in on the shared device: the anonymous profile becomes them.
    second = crm_id()
    response = await login(identity_stub, app, device.subscription_id, second)
    assert (response.user.user_id, response.user.external_id) == (out.user.user_id, second)


# --- client keys ---------------------------------------------------------------------------------


async def test_client_keys_log_in_only_where_the_app_allows_it(
    identity_stub: Stub, app: TestApp, apps_stub: AppsServiceAsyncStub
) -> None:
    device = await identity_stub.CreateSubscription(create(push()), metadata=app.client)
    calls = [
        identity_stub.Login(
            pb.LoginRequest(subscription_id=device.subscription_id, external_id=crm_id()),
            metadata=app.client,
        ),
        identity_stub.Logout(
            pb.LogoutRequest(subscription_id=device.subscription_id), metadata=app.client
        ),
        identity_stub.Login(pb.LoginRequest(external_id="null"), metadata=app.client),
    ]
    for call in calls:
        error = await failure(call)
        assert error.code == grpc.StatusCode.PERMISSION_DENIED
        assert error.reason == "CLIENT_LOGIN_DISABLED"

    open_app = await create_test_app(apps_stub, app_pb2.AppSettings(allow_client_login=True))
    external_id = crm_id()
    await known_user(identity_stub, open_app, external_id, first_name="Ana")
    phone = await identity_stub.CreateSubscription(create(push()), metadata=open_app.client)
    response = await identity_stub.Login(
        pb.LoginRequest(subscription_id=phone.subscription_id, external_id=external_id),
        metadata=open_app.client,
    )
    # The SDK learns who it is now, never the profile.
    assert response.user.external_id == external_id
    assert response.user.first_name == ""
    assert list(response.user.subscriptions) == []
    assert response.merged_user_id == phone.user_id
    out = await identity_stub.Logout(
        pb.LogoutRequest(subscription_id=phone.subscription_id), metadata=open_app.client
    )
    assert out.user.user_id not in (phone.user_id, response.user.user_id)


# --- login proofs --------------------------------------------------------------------------------


def proof(secret: str, external_id: str) -> str:
    """What the app's backend computes (docs/identity.md), written here independently."""
    return hmac.new(secret.encode(), external_id.encode(), hashlib.sha256).hexdigest()


async def set_login_secret(apps_stub: AppsServiceAsyncStub, app: TestApp, secret: str) -> None:
    await apps_stub.UpdateApp(
        apps_service_pb2.UpdateAppRequest(
            app=app_pb2.App(app_id=app.app_id, login_secret=secret),
            update_mask=field_mask_pb2.FieldMask(paths=["login_secret"]),
        ),
        metadata=ADMIN,
    )


async def proving_app(apps_stub: AppsServiceAsyncStub) -> tuple[TestApp, str]:
    """An app that allows client login and has a login secret, and the secret."""
    app = await create_test_app(apps_stub, app_pb2.AppSettings(allow_client_login=True))
    secret = secrets.token_urlsafe(32)
    await set_login_secret(apps_stub, app, secret)
    return app, secret


async def client_login(
    identity_stub: Stub, app: TestApp, subscription_id: str, external_id: str, proof: str = ""
) -> pb.LoginResponse:
    return await identity_stub.Login(
        pb.LoginRequest(
            subscription_id=subscription_id, external_id=external_id, external_id_proof=proof
        ),
        metadata=app.client,
    )


async def test_with_a_login_secret_client_logins_must_prove_the_external_id(
    identity_stub: Stub, apps_stub: AppsServiceAsyncStub
) -> None:
    app, secret = await proving_app(apps_stub)
    victim = crm_id()
    await known_user(identity_stub, app, victim, first_name="Ana")
    phone = await identity_stub.CreateSubscription(create(push(), ext(victim)), metadata=app.server)
    attacker = await identity_stub.CreateSubscription(create(push()), metadata=app.client)
    unclaimed = crm_id()
    wrong = [
        "",
        proof(secret, unclaimed),  # a proof of another external id
        proof(secrets.token_urlsafe(32), victim),  # under another secret
        proof(secret, victim)[:-1],
        "☃" * 64,
    ]
    for external_id, bad in [(victim, p) for p in wrong] + [(unclaimed, "")]:
        error = await failure(
            client_login(identity_stub, app, attacker.subscription_id, external_id, bad)
        )
        assert error.code == grpc.StatusCode.PERMISSION_DENIED, bad
        assert (error.reason, error.fields) == ("EXTERNAL_ID_PROOF_INVALID", ["external_id_proof"])

    # Nothing changed: the attacker's device is still anonymous, the victim keeps their phone,
    # and nobody claimed the unclaimed id.
    held = await identity_stub.GetSubscription(
        pb.GetSubscriptionRequest(subscription_id=attacker.subscription_id), metadata=app.server
    )
    assert held.user_id == attacker.user_id
    known = await get_user(identity_stub, app, ext(victim))
    assert [s.subscription_id for s in known.subscriptions] == [phone.subscription_id]
    missing = await failure(get_user(identity_stub, app, ext(unclaimed)))
    assert missing.code == grpc.StatusCode.NOT_FOUND

    # The right proof (hex in either case) logs the device in.
    device = await identity_stub.CreateSubscription(create(push()), metadata=app.client)
    response = await client_login(
        identity_stub, app, device.subscription_id, victim, proof(secret, victim).upper()
    )
    assert (response.user.external_id, response.merged_user_id) == (victim, device.user_id)
    fresh = await client_login(
        identity_stub, app, attacker.subscription_id, unclaimed, proof(secret, unclaimed)
    )
    assert (fresh.user.user_id, fresh.user.external_id) == (attacker.user_id, unclaimed)


async def test_server_keys_need_no_login_proof(
    identity_stub: Stub, apps_stub: AppsServiceAsyncStub
) -> None:
    app, _ = await proving_app(apps_stub)
    device = await identity_stub.CreateSubscription(create(push()), metadata=app.client)
    external_id = crm_id()
    response = await login(identity_stub, app, device.subscription_id, external_id)
    assert (response.user.user_id, response.user.external_id) == (device.user_id, external_id)
    # Logout needs no proof either: it names no external id.
    out = await identity_stub.Logout(
        pb.LogoutRequest(subscription_id=device.subscription_id), metadata=app.client
    )
    assert out.user.user_id != device.user_id


async def test_rotating_the_login_secret_invalidates_old_proofs(
    identity_stub: Stub, apps_stub: AppsServiceAsyncStub
) -> None:
    app, old = await proving_app(apps_stub)
    external_id = crm_id()
    device = await identity_stub.CreateSubscription(create(push()), metadata=app.client)
    await client_login(
        identity_stub, app, device.subscription_id, external_id, proof(old, external_id)
    )
    await identity_stub.Logout(
        pb.LogoutRequest(subscription_id=device.subscription_id), metadata=app.client
    )

    new = secrets.token_urlsafe(32)
    await set_login_secret(apps_stub, app, new)
    error = await failure(
        client_login(
            identity_stub, app, device.subscription_id, external_id, proof(old, external_id)
        )
    )
    assert (error.code, error.reason) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "EXTERNAL_ID_PROOF_INVALID",
    )
    back = await client_login(
        identity_stub, app, device.subscription_id, external_id, proof(new, external_id)
    )
    assert back.user.external_id == external_id

    # Removing the secret (empty, named by the mask) returns to unproven client logins.
    await identity_stub.Logout(
        pb.LogoutRequest(subscription_id=device.subscription_id), metadata=app.client
    )
    await set_login_secret(apps_stub, app, "")
    again = await client_login(identity_stub, app, device.subscription_id, external_id)
    assert again.user.external_id == external_id


# --- caps during a merge -------------------------------------------------------------------------


async def test_a_merge_keeps_the_known_user_under_the_cap(
    identity_stub: Stub, app: TestApp
) -> None:
    external_id = crm_id()
    known = await known_user(identity_stub, app, external_id)
    held = [
        await identity_stub.CreateSubscription(
            create(push(), by_id(known.user_id)), metadata=app.server
        )
        for _ in range(20)
    ]
    device = await identity_stub.CreateSubscription(create(push()), metadata=app.client)
    extra = [
        await identity_stub.CreateSubscription(
            create(address(kind), by_id(device.user_id)), metadata=app.server
        )
        for kind in (EMAIL, SMS)
    ]
    response = await login(identity_stub, app, device.subscription_id, external_id)
    ids_after = {s.subscription_id for s in response.user.subscriptions}
    assert len(ids_after) == 20
    assert device.subscription_id in ids_after
    assert held[0].subscription_id not in ids_after  # the least recently active push
    for dropped in extra:  # no room for them: deleted with the anonymous profile
        error = await failure(
            identity_stub.GetSubscription(
                pb.GetSubscriptionRequest(subscription_id=dropped.subscription_id),
                metadata=app.server,
            )
        )
        assert error.code == grpc.StatusCode.NOT_FOUND


async def test_a_merge_into_a_user_full_of_addresses_is_refused(
    identity_stub: Stub, app: TestApp
) -> None:
    external_id = crm_id()
    known = await known_user(identity_stub, app, external_id)
    for _ in range(20):
        await identity_stub.CreateSubscription(
            create(address(EMAIL), by_id(known.user_id)), metadata=app.server
        )
    device = await identity_stub.CreateSubscription(create(push()), metadata=app.client)
    error = await failure(login(identity_stub, app, device.subscription_id, external_id))
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.reason == "SUBSCRIPTION_LIMIT_REACHED"
    assert error.fields == ["external_id"]
    # Nothing happened: the anonymous profile still holds the device.
    assert (await get_user(identity_stub, app, by_id(device.user_id))).external_id == ""


async def test_a_merge_moves_aliases_only_under_the_cap(identity_stub: Stub, app: TestApp) -> None:
    external_id = crm_id()
    await known_user(identity_stub, app, external_id)
    for index in range(9):
        await identity_stub.AddAlias(
            pb.AddAliasRequest(
                ref=ext(external_id),
                alias=user_pb2.Alias(label=f"k{index}", value=crm_id()),
            ),
            metadata=app.server,
        )
    device = await identity_stub.CreateSubscription(create(push()), metadata=app.client)
    for label in ("first_alias", "second_alias"):
        await identity_stub.AddAlias(
            pb.AddAliasRequest(
                ref=by_id(device.user_id), alias=user_pb2.Alias(label=label, value=crm_id())
            ),
            metadata=app.server,
        )
    response = await login(identity_stub, app, device.subscription_id, external_id)
    labels = {a.label for a in response.user.aliases}
    assert len(labels) == 10
    assert "first_alias" in labels
    assert "second_alias" not in labels


async def test_a_merge_keeps_the_known_users_attributes_under_the_cap(
    identity_stub: Stub, app: TestApp
) -> None:
    """60 + 60 distinct attributes: the known user keeps its 60 and takes the anonymous
    profile's first 40 by name; the other 20 are dropped."""
    external_id = crm_id()
    own = {f"k_{i:02d}": user_pb2.AttributeValue(number_value=i) for i in range(60)}
    await identity_stub.UpsertUser(
        pb.UpsertUserRequest(ref=ext(external_id), user=user_pb2.User(attributes=own)),
        metadata=app.server,
    )
    device = await identity_stub.CreateSubscription(create(push()), metadata=app.client)
    theirs = {f"a_{i:02d}": user_pb2.AttributeValue(number_value=i) for i in range(60)}
    await identity_stub.UpsertUser(
        pb.UpsertUserRequest(ref=by_id(device.user_id), user=user_pb2.User(attributes=theirs)),
        metadata=app.server,
    )
    response = await login(identity_stub, app, device.subscription_id, external_id)
    assert response.merged_user_id == device.user_id
    user = await get_user(identity_stub, app, ext(external_id))
    assert len(user.attributes) == 100
    assert set(own) <= set(user.attributes)
    assert set(user.attributes) - set(own) == {f"a_{i:02d}" for i in range(40)}


# --- concurrency ----------------------------------------------------------------------------------


async def test_concurrent_logins_of_one_device_merge_once(
    identity_stub: Stub, app: TestApp, feed: ChangeFeed
) -> None:
    external_id = crm_id()
    known = await known_user(identity_stub, app, external_id)
    device = await identity_stub.CreateSubscription(create(push()), metadata=app.client)
    responses = await asyncio.gather(
        *(login(identity_stub, app, device.subscription_id, external_id) for _ in range(8))
    )
    assert {r.user.user_id for r in responses} == {known.user_id}
    assert [r.merged_user_id for r in responses if r.merged_user_id] == [device.user_id]
    export = await identity_stub.ExportUser(
        pb.ExportUserRequest(ref=by_id(known.user_id)), metadata=app.server
    )
    assert len(export.merges) == 1
    await feed.wait_for(Kind.KIND_USER_MERGED)
    # A straggler would have arrived with the first (one transaction, one relay batch order).
    await feed.wait_for(Kind.KIND_SUBSCRIPTION_CHANGED, device.subscription_id)
    assert len(feed.of(Kind.KIND_USER_MERGED)) == 1


async def test_concurrent_logins_of_two_devices_to_a_new_external_id(
    identity_stub: Stub, app: TestApp
) -> None:
    external_id = crm_id()
    devices = [
        await identity_stub.CreateSubscription(create(push()), metadata=app.client)
        for _ in range(2)
    ]
    responses = await asyncio.gather(
        *(
            login(identity_stub, app, d.subscription_id, external_id)
            for d in devices
            for _ in range(4)
        )
    )
    [user_id] = {r.user.user_id for r in responses}
    assert user_id in {d.user_id for d in devices}
    merged = {r.merged_user_id for r in responses if r.merged_user_id}
    assert merged == {d.user_id for d in devices} - {user_id}
    user = await get_user(identity_stub, app, ext(external_id))
    assert {s.subscription_id for s in user.subscriptions} == {d.subscription_id for d in devices}


# --- bad input and tenancy ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subscription_id", "external_id", "fields"),
    [
        ("", "", {"subscription_id", "external_id"}),
        ("not-a-uuid", crm_id(), {"subscription_id"}),
        (str(uuid.uuid4()), "null", {"external_id"}),
        (str(uuid.uuid4()), "undefined", {"external_id"}),
        (str(uuid.uuid4()), " padded ", {"external_id"}),
        (str(uuid.uuid4()), "x" * 201, {"external_id"}),
    ],
)
async def test_bad_logins_name_each_bad_field(
    identity_stub: Stub, app: TestApp, subscription_id: str, external_id: str, fields: set[str]
) -> None:
    error = await failure(login(identity_stub, app, subscription_id, external_id))
    assert (error.code, set(error.fields)) == (grpc.StatusCode.INVALID_ARGUMENT, fields)


async def test_login_of_an_unknown_subscription(identity_stub: Stub, app: TestApp) -> None:
    error = await failure(login(identity_stub, app, str(uuid.uuid4()), crm_id()))
    assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "SUBSCRIPTION_NOT_FOUND")
    error = await failure(
        identity_stub.Logout(
            pb.LogoutRequest(subscription_id=str(uuid.uuid4())), metadata=app.server
        )
    )
    assert error.code == grpc.StatusCode.NOT_FOUND


async def test_login_never_merges_across_apps(
    identity_stub: Stub, app: TestApp, other_app: TestApp
) -> None:
    external_id = crm_id()
    theirs = await known_user(identity_stub, other_app, external_id)
    device = await identity_stub.CreateSubscription(create(push()), metadata=app.client)
    response = await login(identity_stub, app, device.subscription_id, external_id)
    assert response.user.user_id == device.user_id
    assert response.merged_user_id == ""
    assert (await get_user(identity_stub, other_app, ext(external_id))).user_id == theirs.user_id
