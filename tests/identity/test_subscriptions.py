"""Subscriptions through the real identity process: registration, validation, the one-profile-per-
token rule, the cap of 20 with push eviction, updates, assignment, tenancy and change facts."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import grpc.aio
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from tidings.identity.v1 import identity_service_pb2 as pb
from tidings.identity.v1 import identity_service_pb2_grpc
from tidings.identity.v1 import subscription_pb2 as spb
from tidings.identity.v1.user_ref_pb2 import UserRef

from services.identity.subscriptions import (
    DISABLED_BY_API,
    NewSubscription,
    SubscriptionPatch,
    choose_evictions,
    normalize_token,
    patched,
)
from services.identity.subscriptions_store import OptIn, SubscriptionType
from services.runtime.errors import FieldViolations, ResourceExhausted
from tests.db_locks import wait_blocked_by
from tests.identity.conftest import TestApp
from tests.identity.support import (
    ANDROID,
    EMAIL,
    IOS,
    SMS,
    TELEGRAM,
    WEB,
    WHATSAPP,
    ChangeFeed,
    Kind,
    address,
    by_id,
    create,
    email,
    endpoint,
    failure,
    ios_token,
    push,
    record,
    web_push_keys,
)
from tests.polling import eventually

if TYPE_CHECKING:  # the async stub type exists only in the generated type stubs
    Stub = identity_service_pb2_grpc.IdentityServiceAsyncStub
MAX = 20


# --- the pure rules -----------------------------------------------------------------------------

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def test_eviction_takes_the_least_recently_active_push_subscriptions() -> None:
    addresses = [record(SubscriptionType.EMAIL, active_minutes_ago=100 + i) for i in range(10)]
    pushes = [record(SubscriptionType.WEB_PUSH, active_minutes_ago=i) for i in range(10)]
    held = [*pushes, *addresses]
    assert choose_evictions(held[:19]) == []
    assert choose_evictions(held) == [pushes[9]]
    assert choose_evictions(held, adding=3) == [pushes[9], pushes[8], pushes[7]]


def test_a_user_full_of_addresses_evicts_nothing() -> None:
    held = [record(SubscriptionType.SMS) for _ in range(19)] + [record()]
    assert choose_evictions(held) == [held[-1]]
    with pytest.raises(ResourceExhausted) as raised:
        choose_evictions(held, adding=2)
    assert raised.value.reason == "SUBSCRIPTION_LIMIT_REACHED"


def test_patches_of_consent_enabled_and_token() -> None:
    current = record()
    values = NewSubscription(type=None, token="", opt_in=OptIn.UNSUBSCRIBED, opt_in_reason="why")
    out = patched(current, SubscriptionPatch(frozenset({"opt_in"}), values), NOW, by_client=True)
    assert (out.opt_in, out.opt_in_reason, out.opt_in_change_time) == (OptIn.UNSUBSCRIBED, "", NOW)
    assert (out.update_time, out.last_active_time) == (NOW, NOW)
    with_reason = patched(
        current,
        SubscriptionPatch(frozenset({"opt_in", "opt_in_reason"}), values),
        NOW,
        by_client=False,
    )
    assert with_reason.opt_in_reason == "why"
    assert with_reason.last_active_time == current.last_active_time

    off = patched(
        current,
        SubscriptionPatch(frozenset({"enabled"}), values, enabled=False),
        NOW,
        by_client=False,
    )
    assert (off.enabled, off.disabled_reason) == (False, DISABLED_BY_API)
    new_token = NewSubscription(type=None, token="ab" * 32)
    rotated_dead = patched(
        record(enabled=False, disabled_reason="apns:Unregistered"),
        SubscriptionPatch(frozenset({"token"}), new_token),
        NOW,
        by_client=True,
    )
    assert (rotated_dead.enabled, rotated_dead.token_time) == (True, NOW)
    rotated_off = patched(
        off, SubscriptionPatch(frozenset({"token"}), new_token), NOW, by_client=True
    )
    assert not rotated_off.enabled

    unchanged = patched(
        current, SubscriptionPatch(frozenset({"device"}), values), NOW, by_client=False
    )
    assert unchanged == current


def test_tokens_are_normalised_per_type() -> None:
    cases = [
        (SubscriptionType.IOS_PUSH, "AB" * 32, "ab" * 32),
        (SubscriptionType.EMAIL, "Ana@Example.com", "ana@example.com"),
        (SubscriptionType.SMS, "+34 600-11-22-33", "+34600112233"),
        (SubscriptionType.TELEGRAM, "-42", "-42"),
        (SubscriptionType.WEB_PUSH, "https://push.example/abc", "https://push.example/abc"),
    ]
    for type_, token, expected in cases:
        violations = FieldViolations()
        assert normalize_token(type_, token, "token", violations) == expected
        assert not violations
    for type_, token in [
        (SubscriptionType.IOS_PUSH, "ab" * 31 + "a"),
        (SubscriptionType.TELEGRAM, str(2**63)),
        (SubscriptionType.WEB_PUSH, "https://user:pw@push.example/abc"),
        (SubscriptionType.WEB_PUSH, "https:///nohost"),
        (SubscriptionType.ANDROID_PUSH, "undefined"),
    ]:
        violations = FieldViolations()
        assert normalize_token(type_, token, "token", violations) is None
        assert [v.field for v in violations] == ["token"]


# --- through the server ---------------------------------------------------------------------------


async def get(identity_stub: Stub, app: TestApp, subscription_id: str) -> spb.Subscription:
    return await identity_stub.GetSubscription(
        pb.GetSubscriptionRequest(subscription_id=subscription_id), metadata=app.server
    )


# --- registration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "token", "stored"),
    [
        (IOS, "AB" * 32, "ab" * 32),
        (ANDROID, "dGVzdA:APA91bHunk_of-token.123", "dGVzdA:APA91bHunk_of-token.123"),
        (EMAIL, "Ana.Garcia@Example.COM", "ana.garcia@example.com"),
        (SMS, "+34 600 11 22 33", "+34600112233"),
        (WHATSAPP, "+1 (415) 555-2671", "+14155552671"),
        (TELEGRAM, "-1001234567890", "-1001234567890"),
    ],
)
async def test_a_client_key_registers_each_type_on_a_fresh_anonymous_profile(
    identity_stub: Stub,
    app: TestApp,
    feed: ChangeFeed,
    kind: spb.SubscriptionType.ValueType,
    token: str,
    stored: str,
) -> None:
    device = spb.DeviceInfo(model="iPhone15,2", os="iOS 18.1", app_version="3.2", sdk="tidings-ios")
    created = await identity_stub.CreateSubscription(
        create(spb.Subscription(type=kind, token=token, device=device, opt_in_reason="first run")),
        metadata=app.client,
    )
    assert created.subscription_id
    assert created.user_id
    assert created.type == kind
    assert created.token == stored
    assert created.enabled
    assert created.opt_in == spb.OPT_IN_STATE_SUBSCRIBED
    assert created.opt_in_reason == "first run"
    assert created.device == device
    assert created.create_time.seconds > 0
    assert created.last_active_time == created.create_time
    assert await get(identity_stub, app, created.subscription_id) == created

    facts = await feed.wait_for(Kind.KIND_SUBSCRIPTION_CREATED, created.subscription_id)
    assert facts[0].user_id == created.user_id
    assert facts[0].subscription_reachable
    assert (
        facts[0].subscription_type
        == spb.SubscriptionType.Name(kind).removeprefix("SUBSCRIPTION_TYPE_").lower()
    )
    users = await feed.wait_for(Kind.KIND_USER_CREATED)
    assert created.user_id in {c.user_id for c in users}


async def test_web_push_keeps_its_endpoint_and_keys(identity_stub: Stub, app: TestApp) -> None:
    keys = web_push_keys()
    url = endpoint()
    created = await identity_stub.CreateSubscription(
        create(spb.Subscription(type=WEB, token=url, web_push_keys=keys)), metadata=app.client
    )
    assert (created.token, created.web_push_keys) == (url, keys)


async def test_a_subscription_registered_unsubscribed_is_not_reachable(
    identity_stub: Stub, app: TestApp, feed: ChangeFeed
) -> None:
    registration = address(EMAIL)
    registration.opt_in = spb.OPT_IN_STATE_UNSUBSCRIBED
    created = await identity_stub.CreateSubscription(create(registration), metadata=app.server)
    assert created.opt_in == spb.OPT_IN_STATE_UNSUBSCRIBED
    [fact] = await feed.wait_for(Kind.KIND_SUBSCRIPTION_CREATED, created.subscription_id)
    assert not fact.subscription_reachable


LONG = "x" * 201


@pytest.mark.parametrize(
    ("subscription", "fields"),
    [
        (spb.Subscription(token=ios_token()), {"subscription.type"}),
        (spb.Subscription(type=IOS), {"subscription.token"}),
        (spb.Subscription(type=IOS, token="null"), {"subscription.token"}),
        (spb.Subscription(type=IOS, token="abc123"), {"subscription.token"}),
        (spb.Subscription(type=IOS, token="zz" * 32), {"subscription.token"}),
        (spb.Subscription(type=ANDROID, token="short"), {"subscription.token"}),
        (
            spb.Subscription(type=ANDROID, token="has spaces in it, not a token"),
            {"subscription.token"},
        ),
        (
            spb.Subscription(
                type=WEB, token="http://push.example/x", web_push_keys=web_push_keys()
            ),
            {"subscription.token"},
        ),
        (spb.Subscription(type=WEB, token=endpoint()), {"subscription.web_push_keys"}),
        (
            spb.Subscription(
                type=WEB, token=endpoint(), web_push_keys=spb.WebPushKeys(p256dh="abc", auth="")
            ),
            {"subscription.web_push_keys.p256dh", "subscription.web_push_keys.auth"},
        ),
        (spb.Subscription(type=EMAIL, token="not-an-address"), {"subscription.token"}),
        (
            spb.Subscription(type=EMAIL, token=email(), web_push_keys=web_push_keys()),
            {"subscription.web_push_keys"},
        ),
        (spb.Subscription(type=SMS, token="600112233"), {"subscription.token"}),
        (spb.Subscription(type=WHATSAPP, token="+999 123"), {"subscription.token"}),
        (spb.Subscription(type=TELEGRAM, token="@channel"), {"subscription.token"}),
        (spb.Subscription(type=TELEGRAM, token="0"), {"subscription.token"}),
        (
            spb.Subscription(type=IOS, token=ios_token(), opt_in_reason=LONG),
            {"subscription.opt_in_reason"},
        ),
        (
            spb.Subscription(
                type=IOS, token=ios_token(), device=spb.DeviceInfo(model=LONG, os="iOS\x00")
            ),
            {"subscription.device.model", "subscription.device.os"},
        ),
        (
            spb.Subscription(type=spb.SubscriptionType.ValueType(99), token=ios_token()),
            {"subscription.type"},
        ),
    ],
)
async def test_bad_registrations_name_each_bad_field(
    identity_stub: Stub, app: TestApp, subscription: spb.Subscription, fields: set[str]
) -> None:
    error = await failure(
        identity_stub.CreateSubscription(create(subscription), metadata=app.client)
    )
    assert (error.code, set(error.fields)) == (grpc.StatusCode.INVALID_ARGUMENT, fields)


async def test_a_client_key_may_not_choose_the_user(identity_stub: Stub, app: TestApp) -> None:
    held = await identity_stub.CreateSubscription(create(push()), metadata=app.client)
    for user in (by_id(held.user_id), UserRef(user_id="not-a-uuid"), UserRef()):
        error = await failure(
            identity_stub.CreateSubscription(create(push(), user), metadata=app.client)
        )
        assert error.code == grpc.StatusCode.PERMISSION_DENIED
        assert error.reason == "USER_REQUIRES_SERVER_KEY"


async def test_a_server_key_registers_for_a_named_user(identity_stub: Stub, app: TestApp) -> None:
    first = await identity_stub.CreateSubscription(create(push()), metadata=app.client)
    second = await identity_stub.CreateSubscription(
        create(address(EMAIL), by_id(first.user_id)), metadata=app.server
    )
    assert second.user_id == first.user_id
    by_subscription = await identity_stub.CreateSubscription(
        create(address(SMS), UserRef(subscription_id=first.subscription_id)),
        metadata=app.server,
    )
    assert by_subscription.user_id == first.user_id


async def test_naming_a_missing_or_malformed_user(identity_stub: Stub, app: TestApp) -> None:
    missing = await failure(
        identity_stub.CreateSubscription(
            create(push(), by_id("00000000-0000-4000-8000-000000000000")),
            metadata=app.server,
        )
    )
    assert missing.code == grpc.StatusCode.NOT_FOUND
    assert missing.reason == "USER_NOT_FOUND"
    malformed = await failure(
        identity_stub.CreateSubscription(
            create(push(), UserRef(user_id="nope")), metadata=app.server
        )
    )
    assert (malformed.code, set(malformed.fields)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        {"user.user_id"},
    )


# --- one profile per token ----------------------------------------------------------------------


async def test_registering_a_push_token_again_returns_it_refreshed(
    identity_stub: Stub, app: TestApp, feed: ChangeFeed
) -> None:
    registration = push(ANDROID)
    first = await identity_stub.CreateSubscription(create(registration), metadata=app.client)
    registration.device.CopyFrom(spb.DeviceInfo(app_version="2.0"))
    again = await identity_stub.CreateSubscription(create(registration), metadata=app.client)
    assert again.subscription_id == first.subscription_id
    assert again.user_id == first.user_id
    assert again.device.app_version == "2.0"
    assert again.last_active_time.ToDatetime() >= first.last_active_time.ToDatetime()
    [changed] = await feed.wait_for(Kind.KIND_SUBSCRIPTION_CHANGED, first.subscription_id)
    assert list(changed.changed_fields) == ["device"]
    assert len(feed.of(Kind.KIND_SUBSCRIPTION_CREATED, first.subscription_id)) == 1


async def test_a_push_token_registered_for_another_user_moves_there(
    identity_stub: Stub, app: TestApp, feed: ChangeFeed
) -> None:
    registration = push(IOS)
    on_a = await identity_stub.CreateSubscription(create(registration), metadata=app.client)
    user_b = (await identity_stub.CreateSubscription(create(push()), metadata=app.client)).user_id
    on_b = await identity_stub.CreateSubscription(
        create(registration, by_id(user_b)), metadata=app.server
    )
    assert on_b.subscription_id == on_a.subscription_id
    assert on_b.user_id == user_b
    assert (await get(identity_stub, app, on_a.subscription_id)).user_id == user_b
    [removed] = await feed.wait_for(Kind.KIND_SUBSCRIPTION_REMOVED, on_a.subscription_id)
    assert removed.user_id == on_a.user_id
    [changed] = await feed.wait_for(Kind.KIND_SUBSCRIPTION_CHANGED, on_a.subscription_id)
    assert changed.user_id == user_b
    assert "user_id" in changed.changed_fields
    # Registered again without a user (by the device, say): it stays with user B.
    again = await identity_stub.CreateSubscription(create(registration), metadata=app.client)
    assert again.user_id == user_b


async def test_racing_registrations_of_one_token_make_one_subscription(
    identity_stub: Stub, app: TestApp
) -> None:
    registration = push(IOS)
    results = await asyncio.gather(
        *(
            identity_stub.CreateSubscription(create(registration), metadata=app.client)
            for _ in range(8)
        )
    )
    assert len({r.subscription_id for r in results}) == 1
    assert len({r.user_id for r in results}) == 1


async def test_an_address_registered_again_by_a_client_key_is_refused(
    identity_stub: Stub, app: TestApp
) -> None:
    registration = address(EMAIL)
    first = await identity_stub.CreateSubscription(create(registration), metadata=app.server)
    error = await failure(
        identity_stub.CreateSubscription(create(registration), metadata=app.client)
    )
    assert error.code == grpc.StatusCode.ALREADY_EXISTS
    assert error.reason == "SUBSCRIPTION_ALREADY_EXISTS"
    assert error.fields == ["subscription.token"]
    assert first.subscription_id not in error.message
    # Case does not make it another address; a server key gets the existing one back.
    registration.token = registration.token.upper()
    again = await identity_stub.CreateSubscription(create(registration), metadata=app.server)
    assert again.subscription_id == first.subscription_id


async def test_the_same_token_in_two_apps_is_two_subscriptions(
    identity_stub: Stub, app: TestApp, other_app: TestApp
) -> None:
    registration = push()
    mine = await identity_stub.CreateSubscription(create(registration), metadata=app.client)
    theirs = await identity_stub.CreateSubscription(create(registration), metadata=other_app.client)
    assert mine.subscription_id != theirs.subscription_id


# --- the cap of 20 ------------------------------------------------------------------------------


async def _user_with(
    identity_stub: Stub, app: TestApp, registrations: list[spb.Subscription]
) -> list[spb.Subscription]:
    """A user holding ``registrations``, registered in order (so least recently active first)."""
    first = await identity_stub.CreateSubscription(create(registrations[0]), metadata=app.client)
    held = [first]
    for registration in registrations[1:]:
        held.append(
            await identity_stub.CreateSubscription(
                create(registration, by_id(first.user_id)), metadata=app.server
            )
        )
    return held


async def test_beyond_20_the_least_recently_active_push_subscription_is_evicted(
    identity_stub: Stub, app: TestApp, feed: ChangeFeed
) -> None:
    held = await _user_with(
        identity_stub,
        app,
        [
            push(IOS),
            push(ANDROID),
            *(address(EMAIL) for _ in range(3)),
            *(push(WEB) for _ in range(MAX - 5)),
        ],
    )
    user = by_id(held[0].user_id)
    # The iOS device comes back to life: now the Android one is the least recently active push.
    ios_again = spb.Subscription(type=IOS, token=held[0].token)
    await identity_stub.CreateSubscription(create(ios_again), metadata=app.client)

    extra = await identity_stub.CreateSubscription(create(push(), user), metadata=app.server)
    assert extra.user_id == held[0].user_id
    gone = await failure(get(identity_stub, app, held[1].subscription_id))
    assert gone.code == grpc.StatusCode.NOT_FOUND
    assert (await get(identity_stub, app, held[0].subscription_id)).user_id == held[0].user_id
    [evicted] = await feed.wait_for(Kind.KIND_SUBSCRIPTION_REMOVED, held[1].subscription_id)
    assert evicted.user_id == held[0].user_id

    # An address beyond the cap evicts a push subscription too (the oldest web one now).
    await identity_stub.CreateSubscription(create(address(SMS), user), metadata=app.server)
    assert (
        await failure(get(identity_stub, app, held[5].subscription_id))
    ).code == grpc.StatusCode.NOT_FOUND
    for kept in held[2:5]:
        await get(identity_stub, app, kept.subscription_id)


async def _age(database: str, ages: dict[str, timedelta]) -> None:
    """Make subscriptions last active ``ages`` ago, as only hours of real time would."""
    conn = await asyncpg.connect(database)
    try:
        for subscription_id, age in ages.items():
            await conn.execute(
                "UPDATE subscriptions SET last_active_time = now() - $2::interval "
                "WHERE subscription_id = $1",
                uuid.UUID(subscription_id),
                age,
            )
    finally:
        await conn.close()


async def _active_since(
    identity_stub: Stub, app: TestApp, subscription_id: str, since: datetime
) -> spb.Subscription:
    """Poll until the subscription's last_active_time is at or after ``since``."""
    return await eventually(
        lambda: get(identity_stub, app, subscription_id),
        lambda current: current.last_active_time.ToDatetime(UTC) >= since,
        within=20,
        what="the subscription's activity recorded",
    )


async def test_events_tracked_by_a_device_keep_it_from_eviction(
    identity_stub: Stub, app: TestApp, identity_database: str
) -> None:
    held = await _user_with(
        identity_stub, app, [push(IOS), push(ANDROID), *(address(EMAIL) for _ in range(MAX - 2))]
    )
    a, b = held[0], held[1]
    # Registered hours ago, A before B: without activity A would be the one to go.
    await _age(
        identity_database,
        {a.subscription_id: timedelta(hours=3), b.subscription_id: timedelta(hours=2)},
    )
    before = datetime.now(UTC) - timedelta(seconds=1)

    def app_open(at: datetime | None = None) -> pb.TrackEventsRequest:
        item = pb.TrackedEventInput(
            user=UserRef(subscription_id=a.subscription_id), name="app_open"
        )
        if at is not None:
            item.occurred_at.FromDatetime(at)
        return pb.TrackEventsRequest(events=[item])

    await identity_stub.TrackEvents(app_open(), metadata=app.client)
    active = await _active_since(identity_stub, app, a.subscription_id, before)
    # Within the hour, more events do not write again (nor does a back-filled one go back).
    await identity_stub.TrackEvents(app_open(), metadata=app.client)
    await identity_stub.TrackEvents(
        app_open(datetime.now(UTC) - timedelta(days=2)), metadata=app.client
    )
    sentinel = await identity_stub.TrackEvents(app_open(), metadata=app.client)
    await _until_listed(identity_stub, app, a.subscription_id, sentinel.results[0].event_id)
    assert (
        await get(identity_stub, app, a.subscription_id)
    ).last_active_time == active.last_active_time

    await identity_stub.CreateSubscription(create(push(), by_id(a.user_id)), metadata=app.server)
    gone = await failure(get(identity_stub, app, b.subscription_id))
    assert gone.code == grpc.StatusCode.NOT_FOUND
    assert (await get(identity_stub, app, a.subscription_id)).user_id == a.user_id


async def _until_listed(
    identity_stub: Stub, app: TestApp, subscription_id: str, event_id: str
) -> None:
    request = pb.ListEventsRequest(user=UserRef(subscription_id=subscription_id))

    async def listed() -> set[str]:
        found = await identity_stub.ListEvents(request, metadata=app.server)
        return {e.event_id for e in found.events}

    await eventually(
        listed, lambda found: event_id in found, within=20, what="the tracked event stored"
    )


async def test_login_counts_as_activity(
    identity_stub: Stub, app: TestApp, identity_database: str
) -> None:
    device = await identity_stub.CreateSubscription(create(push()), metadata=app.client)
    await _age(identity_database, {device.subscription_id: timedelta(hours=5)})
    before = datetime.now(UTC) - timedelta(seconds=1)
    await identity_stub.Login(
        pb.LoginRequest(
            subscription_id=device.subscription_id, external_id=f"crm-{uuid.uuid4().hex[:8]}"
        ),
        metadata=app.server,
    )
    current = await get(identity_stub, app, device.subscription_id)
    assert current.last_active_time.ToDatetime(UTC) >= before


# --- retrying a registration (request_id, AIP-155) ----------------------------------------------


async def test_a_registration_retried_with_its_request_id_returns_the_same_subscription(
    identity_stub: Stub, app: TestApp
) -> None:
    registration = address(EMAIL)
    request_id = str(uuid.uuid4())
    request = pb.CreateSubscriptionRequest(subscription=registration, request_id=request_id)
    first = await identity_stub.CreateSubscription(request, metadata=app.client)
    again = await identity_stub.CreateSubscription(request, metadata=app.client)
    assert again.subscription_id == first.subscription_id
    holder = await identity_stub.GetUser(
        pb.GetUserRequest(ref=by_id(first.user_id)), metadata=app.server
    )
    assert [s.subscription_id for s in holder.subscriptions] == [first.subscription_id]
    # Without the id (or with another one) it is the address registered twice: refused.
    for other in ("", str(uuid.uuid4())):
        request.request_id = other
        error = await failure(identity_stub.CreateSubscription(request, metadata=app.client))
        assert (error.code, error.reason) == (
            grpc.StatusCode.ALREADY_EXISTS,
            "SUBSCRIPTION_ALREADY_EXISTS",
        )
    # Concurrent twins of a new registration make one subscription, and all learn its id.
    twin = pb.CreateSubscriptionRequest(subscription=address(SMS), request_id=str(uuid.uuid4()))
    results = await asyncio.gather(
        *(identity_stub.CreateSubscription(twin, metadata=app.client) for _ in range(4))
    )
    assert len({r.subscription_id for r in results}) == 1


async def test_a_request_id_is_a_uuid_for_one_registration_only(
    identity_stub: Stub, app: TestApp
) -> None:
    request_id = str(uuid.uuid4())
    await identity_stub.CreateSubscription(
        pb.CreateSubscriptionRequest(subscription=address(EMAIL), request_id=request_id),
        metadata=app.client,
    )
    for bad in (request_id, "retry-1"):
        error = await failure(
            identity_stub.CreateSubscription(
                pb.CreateSubscriptionRequest(subscription=address(EMAIL), request_id=bad),
                metadata=app.client,
            )
        )
        assert (error.code, error.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["request_id"])


async def test_a_user_with_20_addresses_is_full(identity_stub: Stub, app: TestApp) -> None:
    held = await _user_with(identity_stub, app, [address(EMAIL) for _ in range(MAX)])
    user = by_id(held[0].user_id)
    for registration in (push(), address(TELEGRAM)):
        error = await failure(
            identity_stub.CreateSubscription(create(registration, user), metadata=app.server)
        )
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.reason == "SUBSCRIPTION_LIMIT_REACHED"
        assert error.fields == ["user"]
    # Moving one in is refused the same way, and the subscription stays where it was.
    elsewhere = await identity_stub.CreateSubscription(create(push()), metadata=app.client)
    error = await failure(
        identity_stub.AssignSubscription(
            pb.AssignSubscriptionRequest(subscription_id=elsewhere.subscription_id, user=user),
            metadata=app.server,
        )
    )
    assert (error.code, error.fields) == (grpc.StatusCode.RESOURCE_EXHAUSTED, ["user"])
    assert (await get(identity_stub, app, elsewhere.subscription_id)).user_id == elsewhere.user_id


# --- updates ------------------------------------------------------------------------------------


def update(subscription: spb.Subscription, *paths: str) -> pb.UpdateSubscriptionRequest:
    return pb.UpdateSubscriptionRequest(
        subscription=subscription, update_mask=FieldMask(paths=list(paths))
    )


async def test_a_client_opts_out_and_in_again(
    identity_stub: Stub, app: TestApp, feed: ChangeFeed
) -> None:
    created = await identity_stub.CreateSubscription(create(push()), metadata=app.client)
    out = await identity_stub.UpdateSubscription(
        update(
            spb.Subscription(
                subscription_id=created.subscription_id,
                opt_in=spb.OPT_IN_STATE_UNSUBSCRIBED,
                opt_in_reason="user_request",
            ),
            "opt_in",
            "opt_in_reason",
        ),
        metadata=app.client,
    )
    assert out.opt_in == spb.OPT_IN_STATE_UNSUBSCRIBED
    assert out.opt_in_reason == "user_request"
    assert out.opt_in_change_time.ToDatetime() >= created.opt_in_change_time.ToDatetime()
    assert out.enabled
    [fact] = await feed.wait_for(Kind.KIND_SUBSCRIPTION_CHANGED, created.subscription_id)
    assert set(fact.changed_fields) == {"opt_in", "opt_in_reason"}
    assert not fact.subscription_reachable

    back = await identity_stub.UpdateSubscription(
        update(
            spb.Subscription(
                subscription_id=created.subscription_id, opt_in=spb.OPT_IN_STATE_SUBSCRIBED
            ),
            "opt_in",
        ),
        metadata=app.client,
    )
    assert back.opt_in == spb.OPT_IN_STATE_SUBSCRIBED
    assert back.opt_in_reason == ""
    facts = await feed.wait_for(Kind.KIND_SUBSCRIPTION_CHANGED, created.subscription_id, count=2)
    assert facts[1].subscription_reachable


async def test_device_fields_update_one_by_one(identity_stub: Stub, app: TestApp) -> None:
    registration = push()
    registration.device.CopyFrom(spb.DeviceInfo(model="Pixel 8", os="Android 14", sdk="sdk 1"))
    created = await identity_stub.CreateSubscription(create(registration), metadata=app.client)
    updated = await identity_stub.UpdateSubscription(
        update(
            spb.Subscription(
                subscription_id=created.subscription_id,
                device=spb.DeviceInfo(os="Android 15", model="ignored"),
            ),
            "device.os",
        ),
        metadata=app.client,
    )
    assert updated.device == spb.DeviceInfo(model="Pixel 8", os="Android 15", sdk="sdk 1")
    assert updated.last_active_time.ToDatetime() >= created.last_active_time.ToDatetime()


async def test_a_server_key_disables_and_enables(
    identity_stub: Stub, app: TestApp, feed: ChangeFeed
) -> None:
    created = await identity_stub.CreateSubscription(create(push()), metadata=app.client)
    off = await identity_stub.UpdateSubscription(
        update(spb.Subscription(subscription_id=created.subscription_id, enabled=False), "enabled"),
        metadata=app.server,
    )
    assert (off.enabled, off.disabled_reason) == (False, "disabled_by_api")
    [fact] = await feed.wait_for(Kind.KIND_SUBSCRIPTION_DEACTIVATED, created.subscription_id)
    assert not fact.subscription_reachable
    # The device registering its token again does not override the operator.
    again = await identity_stub.CreateSubscription(
        create(spb.Subscription(type=created.type, token=created.token)), metadata=app.client
    )
    assert not again.enabled
    on = await identity_stub.UpdateSubscription(
        update(spb.Subscription(subscription_id=created.subscription_id, enabled=True), "enabled"),
        metadata=app.server,
    )
    assert (on.enabled, on.disabled_reason) == (True, "")


async def test_a_client_key_may_not_change_enabled(identity_stub: Stub, app: TestApp) -> None:
    created = await identity_stub.CreateSubscription(create(push()), metadata=app.client)
    error = await failure(
        identity_stub.UpdateSubscription(
            update(spb.Subscription(subscription_id=created.subscription_id), "enabled"),
            metadata=app.client,
        )
    )
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    assert error.reason == "FIELD_REQUIRES_SERVER_KEY"


async def test_a_token_rotates(identity_stub: Stub, app: TestApp, feed: ChangeFeed) -> None:
    created = await identity_stub.CreateSubscription(create(push(IOS)), metadata=app.client)
    new_token = ios_token()
    rotated = await identity_stub.UpdateSubscription(
        update(spb.Subscription(subscription_id=created.subscription_id, token=new_token), "token"),
        metadata=app.client,
    )
    assert rotated.token == new_token
    [fact] = await feed.wait_for(Kind.KIND_SUBSCRIPTION_CHANGED, created.subscription_id)
    assert list(fact.changed_fields) == ["token"]
    # The old token is free again; the new one is taken.
    other = await identity_stub.CreateSubscription(create(push(IOS)), metadata=app.client)
    taken = await failure(
        identity_stub.UpdateSubscription(
            update(
                spb.Subscription(subscription_id=other.subscription_id, token=new_token), "token"
            ),
            metadata=app.client,
        )
    )
    assert taken.code == grpc.StatusCode.ALREADY_EXISTS
    assert taken.reason == "SUBSCRIPTION_TOKEN_TAKEN"
    assert taken.fields == ["subscription.token"]


async def test_a_web_push_endpoint_changes_with_its_keys(identity_stub: Stub, app: TestApp) -> None:
    created = await identity_stub.CreateSubscription(create(push(WEB)), metadata=app.client)
    alone = await failure(
        identity_stub.UpdateSubscription(
            update(
                spb.Subscription(subscription_id=created.subscription_id, token=endpoint()), "token"
            ),
            metadata=app.client,
        )
    )
    assert (alone.code, set(alone.fields)) == (grpc.StatusCode.INVALID_ARGUMENT, {"update_mask"})
    keys, url = web_push_keys(), endpoint()
    changed = await identity_stub.UpdateSubscription(
        update(
            spb.Subscription(
                subscription_id=created.subscription_id, token=url, web_push_keys=keys
            ),
            "token",
            "web_push_keys",
        ),
        metadata=app.client,
    )
    assert (changed.token, changed.web_push_keys) == (url, keys)


@pytest.mark.parametrize(
    ("subscription", "paths", "fields"),
    [
        (spb.Subscription(), [], {"update_mask"}),
        (spb.Subscription(), ["type"], {"update_mask"}),
        (spb.Subscription(), ["user_id"], {"update_mask"}),
        (spb.Subscription(token="not hex"), ["token"], {"subscription.token"}),
        (spb.Subscription(), ["opt_in"], {"subscription.opt_in"}),
        (spb.Subscription(opt_in_reason=LONG), ["opt_in_reason"], {"subscription.opt_in_reason"}),
        (
            spb.Subscription(web_push_keys=web_push_keys()),
            ["web_push_keys"],
            {"subscription.web_push_keys"},
        ),
    ],
)
async def test_bad_updates_name_each_bad_field(
    identity_stub: Stub,
    app: TestApp,
    subscription: spb.Subscription,
    paths: list[str],
    fields: set[str],
) -> None:
    created = await identity_stub.CreateSubscription(create(push(IOS)), metadata=app.client)
    subscription.subscription_id = created.subscription_id
    error = await failure(
        identity_stub.UpdateSubscription(update(subscription, *paths), metadata=app.server)
    )
    assert (error.code, set(error.fields)) == (grpc.StatusCode.INVALID_ARGUMENT, fields)


@pytest.mark.parametrize(("value", "reason"), [("", "REQUIRED"), ("nope", "INVALID_ID")])
async def test_malformed_subscription_ids(
    identity_stub: Stub, app: TestApp, value: str, reason: str
) -> None:
    calls = [
        identity_stub.GetSubscription(
            pb.GetSubscriptionRequest(subscription_id=value), metadata=app.server
        ),
        identity_stub.DeleteSubscription(
            pb.DeleteSubscriptionRequest(subscription_id=value), metadata=app.server
        ),
        identity_stub.UnassignSubscription(
            pb.UnassignSubscriptionRequest(subscription_id=value), metadata=app.server
        ),
    ]
    for call in calls:
        error = await failure(call)
        assert (error.code, set(error.fields)) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            {"subscription_id"},
        )
    error = await failure(
        identity_stub.UpdateSubscription(
            update(spb.Subscription(subscription_id=value), "opt_in"), metadata=app.client
        )
    )
    assert (error.code, set(error.fields)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        {"subscription.subscription_id"},
    )


# --- delete, assign, unassign -------------------------------------------------------------------


async def test_delete(identity_stub: Stub, app: TestApp, feed: ChangeFeed) -> None:
    created = await identity_stub.CreateSubscription(create(address(EMAIL)), metadata=app.server)
    await identity_stub.DeleteSubscription(
        pb.DeleteSubscriptionRequest(subscription_id=created.subscription_id), metadata=app.server
    )
    assert (
        await failure(get(identity_stub, app, created.subscription_id))
    ).code == grpc.StatusCode.NOT_FOUND
    again = await failure(
        identity_stub.DeleteSubscription(
            pb.DeleteSubscriptionRequest(subscription_id=created.subscription_id),
            metadata=app.server,
        )
    )
    assert (again.code, again.reason) == (grpc.StatusCode.NOT_FOUND, "SUBSCRIPTION_NOT_FOUND")
    [fact] = await feed.wait_for(Kind.KIND_SUBSCRIPTION_REMOVED, created.subscription_id)
    assert fact.user_id == created.user_id
    # Its address is free: registering it again makes a new subscription.
    fresh = await identity_stub.CreateSubscription(
        create(spb.Subscription(type=EMAIL, token=created.token)), metadata=app.client
    )
    assert fresh.subscription_id != created.subscription_id


async def test_assign_and_unassign(identity_stub: Stub, app: TestApp, feed: ChangeFeed) -> None:
    device = await identity_stub.CreateSubscription(create(push()), metadata=app.client)
    owner = (
        await identity_stub.CreateSubscription(create(address(EMAIL)), metadata=app.server)
    ).user_id
    assigned = await identity_stub.AssignSubscription(
        pb.AssignSubscriptionRequest(subscription_id=device.subscription_id, user=by_id(owner)),
        metadata=app.server,
    )
    assert assigned.user_id == owner
    same = await identity_stub.AssignSubscription(
        pb.AssignSubscriptionRequest(subscription_id=device.subscription_id, user=by_id(owner)),
        metadata=app.server,
    )
    assert same == assigned
    # Unassigning from an anonymous profile changes nothing (no pile of empty profiles).
    kept = await identity_stub.UnassignSubscription(
        pb.UnassignSubscriptionRequest(subscription_id=device.subscription_id),
        metadata=app.server,
    )
    assert kept.user_id == owner
    await feed.wait_for(Kind.KIND_SUBSCRIPTION_CHANGED, device.subscription_id)
    assert len(feed.of(Kind.KIND_SUBSCRIPTION_CHANGED, device.subscription_id)) == 1


async def test_client_keys_cannot_get_delete_assign_or_unassign(
    identity_stub: Stub, app: TestApp
) -> None:
    created = await identity_stub.CreateSubscription(create(push()), metadata=app.client)
    sid = created.subscription_id
    calls = [
        identity_stub.GetSubscription(
            pb.GetSubscriptionRequest(subscription_id=sid), metadata=app.client
        ),
        identity_stub.DeleteSubscription(
            pb.DeleteSubscriptionRequest(subscription_id=sid), metadata=app.client
        ),
        identity_stub.AssignSubscription(
            pb.AssignSubscriptionRequest(subscription_id=sid, user=by_id(created.user_id)),
            metadata=app.client,
        ),
        identity_stub.UnassignSubscription(
            pb.UnassignSubscriptionRequest(subscription_id=sid), metadata=app.client
        ),
    ]
    for call in calls:
        assert (await failure(call)).code == grpc.StatusCode.PERMISSION_DENIED


async def test_another_apps_keys_do_not_find_this_apps_subscriptions(
    identity_stub: Stub, app: TestApp, other_app: TestApp
) -> None:
    created = await identity_stub.CreateSubscription(create(push()), metadata=app.client)
    sid = created.subscription_id
    theirs = await identity_stub.CreateSubscription(create(push()), metadata=other_app.client)
    calls = [
        identity_stub.GetSubscription(
            pb.GetSubscriptionRequest(subscription_id=sid), metadata=other_app.server
        ),
        identity_stub.UpdateSubscription(
            update(
                spb.Subscription(subscription_id=sid, opt_in=spb.OPT_IN_STATE_UNSUBSCRIBED),
                "opt_in",
            ),
            metadata=other_app.client,
        ),
        identity_stub.UpdateSubscription(
            update(spb.Subscription(subscription_id=sid, enabled=False), "enabled"),
            metadata=other_app.server,
        ),
        identity_stub.DeleteSubscription(
            pb.DeleteSubscriptionRequest(subscription_id=sid), metadata=other_app.server
        ),
        identity_stub.AssignSubscription(
            pb.AssignSubscriptionRequest(subscription_id=sid, user=by_id(theirs.user_id)),
            metadata=other_app.server,
        ),
        identity_stub.UnassignSubscription(
            pb.UnassignSubscriptionRequest(subscription_id=sid), metadata=other_app.server
        ),
        identity_stub.Login(
            pb.LoginRequest(subscription_id=sid, external_id="crm-1"), metadata=other_app.server
        ),
        identity_stub.Logout(pb.LogoutRequest(subscription_id=sid), metadata=other_app.server),
        # Their subscription onto our user: our user is not found in their app.
        identity_stub.AssignSubscription(
            pb.AssignSubscriptionRequest(
                subscription_id=theirs.subscription_id, user=by_id(created.user_id)
            ),
            metadata=other_app.server,
        ),
        identity_stub.CreateSubscription(
            create(push(), by_id(created.user_id)), metadata=other_app.server
        ),
    ]
    for call in calls:
        assert (await failure(call)).code == grpc.StatusCode.NOT_FOUND
    assert await get(identity_stub, app, sid) == created


async def _held_back_while(
    database: str, change: str, args: tuple[object, ...], register: Any
) -> Any:
    """Run ``register`` while another transaction has made ``change`` to the subscription's row
    and not committed yet; commit it once the registration waits for the row's lock."""
    conn = await asyncpg.connect(database)
    watcher = await asyncpg.connect(database)
    try:
        async with conn.transaction():
            await conn.execute(change, *args)
            registering = asyncio.ensure_future(register())
            await wait_blocked_by(watcher, conn, "the registration waiting for the row")
        return await registering
    finally:
        await watcher.close()
        await conn.close()


async def test_registering_a_token_whose_row_is_changing_token_registers_that_token(
    identity_stub: Stub, app: TestApp, identity_database: str
) -> None:
    registration = push(IOS)
    first = await identity_stub.CreateSubscription(create(registration), metadata=app.server)
    # UpdateSubscription moves the row to another token while the token is registered again:
    # the registration must not answer with (and remember) the row of the other token.
    registered = await _held_back_while(
        identity_database,
        "UPDATE subscriptions SET token = $3 WHERE app_id = $1 AND subscription_id = $2::uuid",
        (app.app_id, first.subscription_id, ios_token()),
        lambda: identity_stub.CreateSubscription(create(registration), metadata=app.server),
    )
    assert registered.token == registration.token
    assert registered.subscription_id != first.subscription_id


async def test_registering_a_token_whose_row_is_being_deleted_creates_it_anew(
    identity_stub: Stub, app: TestApp, identity_database: str
) -> None:
    registration = push(IOS)
    first = await identity_stub.CreateSubscription(create(registration), metadata=app.server)
    # The caller named no subscription: a deletion racing it is no reason for NOT_FOUND.
    registered = await _held_back_while(
        identity_database,
        "DELETE FROM subscriptions WHERE app_id = $1 AND subscription_id = $2::uuid",
        (app.app_id, first.subscription_id),
        lambda: identity_stub.CreateSubscription(create(registration), metadata=app.server),
    )
    assert registered.token == registration.token
    assert registered.subscription_id != first.subscription_id
