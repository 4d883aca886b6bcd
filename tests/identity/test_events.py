"""TrackEvents and ListEvents through the real gRPC server, Kafka and Postgres.

Read-your-writes lag: TrackEvents answers once the events are on ``identity.events``; they are
listed once identity's consumer stored them, typically tens of milliseconds later. Tests
therefore poll ListEvents with a deadline (:func:`wait_listed`) instead of sleeping. To show that
something was *not* stored (a duplicate), a test tracks a sentinel event for the same user
afterwards: records of one user share a partition, so once the sentinel is listed everything
before it has been through the consumer.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar, cast

import grpc
import grpc.aio
import pytest
from google.protobuf import struct_pb2, timestamp_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from tidings.events.v1.tracked_event_pb2 import TrackedEvent
from tidings.identity.v1 import identity_service_pb2 as pb
from tidings.identity.v1 import subscription_pb2, user_pb2
from tidings.identity.v1.user_ref_pb2 import UserRef

from services.runtime.kafka import IDENTITY_EVENTS, Producer
from tests.conftest import KAFKA_BOOTSTRAP
from tests.polling import eventually

if TYPE_CHECKING:
    # Only for annotations: imported at run time, pytest would try to collect TestApp.
    from tidings.identity.v1.identity_service_pb2_grpc import IdentityServiceAsyncStub as Stub

    from tests.identity.conftest import TestApp
T = TypeVar("T")

#: How long a test waits for the consumer; far above the typical tens of milliseconds.
STORE_DEADLINE_S = 20.0


def ts(at: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(at)
    return stamp


def props(**values: Any) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


def event(
    ref: UserRef,
    name: str = "purchase",
    *,
    event_id: str = "",
    at: datetime | None = None,
    properties: struct_pb2.Struct | None = None,
) -> pb.TrackedEventInput:
    item = pb.TrackedEventInput(user=ref, name=name, event_id=event_id, properties=properties)
    if at is not None:
        item.occurred_at.CopyFrom(ts(at))
    return item


async def new_user(stub: Stub, app: TestApp) -> tuple[UserRef, str]:
    """A user created by external id; returns its ref and user id."""
    external_id = f"crm-{uuid.uuid4().hex[:10]}"
    ref = UserRef(external_id=external_id)
    response = await stub.UpsertUser(
        pb.UpsertUserRequest(ref=ref, user=user_pb2.User(first_name="Ada")),
        metadata=app.server,
    )
    return ref, response.user.user_id


async def track(
    stub: Stub, app: TestApp, items: Sequence[pb.TrackedEventInput], *, client: bool = False
) -> list[pb.TrackEventResult]:
    response = await stub.TrackEvents(
        pb.TrackEventsRequest(events=items), metadata=app.client if client else app.server
    )
    assert len(response.results) == len(items)
    return list(response.results)


async def poll(check: Callable[[], Awaitable[T | None]], what: str) -> T:
    """Poll ``check`` until it returns something other than None, up to the deadline."""
    result: T | None = await eventually(
        check, lambda found: found is not None, within=STORE_DEADLINE_S, interval=0.02, what=what
    )
    assert result is not None
    return result


async def list_pages(stub: Stub, app: TestApp, request: pb.ListEventsRequest) -> list[list[Any]]:
    """Every page of a ListEvents query."""
    pages: list[list[Any]] = []
    query = pb.ListEventsRequest()
    query.CopyFrom(request)
    while True:
        page = await stub.ListEvents(query, metadata=app.server)
        pages.append(list(page.events))
        if not page.next_page_token:
            return pages
        query.page_token = page.next_page_token


async def wait_listed(stub: Stub, app: TestApp, ref: UserRef, event_ids: set[str]) -> list[Any]:
    """Poll ListEvents until every id in ``event_ids`` is listed; returns all listed events."""

    async def check() -> list[Any] | None:
        found = [
            e
            for page in await list_pages(stub, app, pb.ListEventsRequest(user=ref, page_size=1000))
            for e in page
        ]
        return found if event_ids <= {e.event_id for e in found} else None

    return await poll(check, f"events {sorted(event_ids)} listed")


def error_fields(status: status_pb2.Status) -> list[str]:
    fields: list[str] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields.extend(v.field for v in bad.field_violations)
    return fields


def error_reason(status: status_pb2.Status) -> str:
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return ""


async def rpc_error(call: Awaitable[Any]) -> tuple[grpc.StatusCode, status_pb2.Status]:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    # grpc-stubs types from_call for sync calls only; an AioRpcError has the same API.
    status = rpc_status.from_call(cast(Any, raised.value))
    assert status is not None
    return raised.value.code(), status


# --- tracking and listing -------------------------------------------------------------------


async def test_tracked_events_are_listed_newest_first(identity_stub: Stub, app: TestApp) -> None:
    ref, user_id = await new_user(identity_stub, app)
    now = datetime.now(UTC)
    results = await track(
        identity_stub,
        app,
        [
            event(
                ref, "purchase", at=now - timedelta(minutes=3), properties=props(sku="A", price=9.5)
            ),
            event(ref, "app_open", at=now - timedelta(minutes=1)),
            event(ref, "purchase", event_id="caller-id-1", at=now - timedelta(minutes=2)),
        ],
    )
    assert all(not r.HasField("error") for r in results)
    assert {r.user_id for r in results} == {user_id}
    assert results[2].event_id == "caller-id-1"
    assert all(r.event_id for r in results)  # ids assigned where the caller gave none

    listed = await wait_listed(identity_stub, app, ref, {r.event_id for r in results})
    assert [e.event_id for e in listed] == [results[1].event_id, "caller-id-1", results[0].event_id]
    first = listed[2]
    assert first.name == "purchase"
    assert first.user_id == user_id
    assert dict(first.properties) == {"sku": "A", "price": 9.5}
    assert first.receive_time.ToDatetime(UTC) >= first.occurred_at.ToDatetime(UTC)


async def test_unset_occurred_at_means_now(identity_stub: Stub, app: TestApp) -> None:
    ref, _ = await new_user(identity_stub, app)
    before = datetime.now(UTC) - timedelta(seconds=5)
    [result] = await track(identity_stub, app, [event(ref, "login")])
    [listed] = await wait_listed(identity_stub, app, ref, {result.event_id})
    assert before <= listed.occurred_at.ToDatetime(UTC) <= datetime.now(UTC) + timedelta(seconds=5)


async def test_back_filled_events_are_stored_and_listed(identity_stub: Stub, app: TestApp) -> None:
    ref, _ = await new_user(identity_stub, app)
    ages = [timedelta(days=3), timedelta(days=95), timedelta(days=400), timedelta(days=9000)]
    now = datetime.now(UTC)
    results = await track(
        identity_stub, app, [event(ref, "old_order", at=now - age) for age in ages]
    )
    listed = await wait_listed(identity_stub, app, ref, {r.event_id for r in results})
    assert [e.event_id for e in listed] == [r.event_id for r in results]  # newest first
    assert abs(listed[-1].occurred_at.ToDatetime(UTC) - (now - ages[-1])) < timedelta(seconds=1)


# --- validation -------------------------------------------------------------------------------


async def test_bad_items_are_refused_one_by_one(identity_stub: Stub, app: TestApp) -> None:
    ref, user_id = await new_user(identity_stub, app)
    now = datetime.now(UTC)
    nan = struct_pb2.Struct()
    nan.fields["x"].number_value = float("nan")
    items = [
        event(ref, "fine"),
        event(ref, "has space"),
        event(ref, "x" * 129),
        event(ref, "future", at=now + timedelta(minutes=10)),
        event(ref, "ok", event_id="e" * 129),
        event(ref, "ok", properties=props(blob="x" * 70_000)),
        event(ref, "ok", properties=nan),
        event(UserRef(), "no_user"),
        event(ref, "near_future", at=now + timedelta(minutes=2)),  # within the allowed skew
    ]
    results = await track(identity_stub, app, items)
    expected = {
        1: "events[1].name",
        2: "events[2].name",
        3: "events[3].occurred_at",
        4: "events[4].event_id",
        5: "events[5].properties",
        6: "events[6].properties",
        7: "events[7].user",
    }
    for index, result in enumerate(results):
        if index in expected:
            assert result.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], index
            assert error_fields(result.error) == [expected[index]], index
            assert not result.event_id
        else:
            assert not result.HasField("error"), (index, result.error)
            assert result.user_id == user_id
    await wait_listed(identity_stub, app, ref, {results[0].event_id, results[8].event_id})


async def test_more_than_a_thousand_events_is_refused(identity_stub: Stub, app: TestApp) -> None:
    ref, _ = await new_user(identity_stub, app)
    code, status = await rpc_error(
        identity_stub.TrackEvents(
            pb.TrackEventsRequest(events=[event(ref) for _ in range(1001)]), metadata=app.server
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert error_fields(status) == ["events"]


async def test_unknown_users_are_not_found_per_item(identity_stub: Stub, app: TestApp) -> None:
    ref, _ = await new_user(identity_stub, app)
    results = await track(
        identity_stub,
        app,
        [event(ref), event(UserRef(user_id=str(uuid.uuid4()))), event(ref)],
    )
    assert results[1].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert error_reason(results[1].error) == "USER_NOT_FOUND"
    assert not results[0].HasField("error")
    assert not results[2].HasField("error")


# --- deduplication ----------------------------------------------------------------------------


async def test_a_retried_batch_is_stored_once(identity_stub: Stub, app: TestApp) -> None:
    ref, _ = await new_user(identity_stub, app)
    now = datetime.now(UTC)
    batch = [
        event(
            ref,
            "purchase",
            event_id=f"order-{i}-{uuid.uuid4().hex[:6]}",
            at=now - timedelta(seconds=i),
        )
        for i in range(5)
    ]
    first = await track(identity_stub, app, batch)
    second = await track(identity_stub, app, batch)  # the client's retry after a timeout
    assert [r.event_id for r in first] == [r.event_id for r in second]
    [sentinel] = await track(identity_stub, app, [event(ref, "sentinel")])
    listed = await wait_listed(identity_stub, app, ref, {sentinel.event_id})
    ids = [e.event_id for e in listed if e.name == "purchase"]
    assert sorted(ids) == sorted(r.event_id for r in first)


async def test_a_record_on_the_topic_twice_is_stored_once(
    identity_stub: Stub, app: TestApp
) -> None:
    ref, user_id = await new_user(identity_stub, app)
    record = TrackedEvent(
        event_id=f"direct-{uuid.uuid4().hex}",
        app_id=app.app_id,
        user_id=user_id,
        name="redelivered",
        occurred_at=ts(datetime.now(UTC)),
    )
    async with Producer(KAFKA_BOOTSTRAP, client_id="test-events") as producer:
        await producer.send_many(IDENTITY_EVENTS, [(user_id, record), (user_id, record)])
    [sentinel] = await track(identity_stub, app, [event(ref, "sentinel")])
    listed = await wait_listed(identity_stub, app, ref, {sentinel.event_id})
    assert [e.event_id for e in listed if e.name == "redelivered"] == [record.event_id]


# --- keys and tenants -------------------------------------------------------------------------


async def test_client_keys_track_only_for_their_subscription(
    identity_stub: Stub, app: TestApp
) -> None:
    subscription = await identity_stub.CreateSubscription(
        pb.CreateSubscriptionRequest(
            subscription=subscription_pb2.Subscription(
                type=subscription_pb2.SUBSCRIPTION_TYPE_ANDROID_PUSH,
                token=f"fcm-{uuid.uuid4().hex}",
            )
        ),
        metadata=app.client,
    )
    own = UserRef(subscription_id=subscription.subscription_id)
    results = await track(
        identity_stub,
        app,
        [
            event(own, "app_open"),
            event(UserRef(user_id=subscription.user_id), "app_open"),
            event(UserRef(external_id="someone"), "app_open"),
        ],
        client=True,
    )
    assert not results[0].HasField("error")
    assert results[0].user_id == subscription.user_id
    for refused in results[1:]:
        assert refused.error.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    # Reading events is for server keys.
    code, _ = await rpc_error(
        identity_stub.ListEvents(pb.ListEventsRequest(user=own), metadata=app.client)
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED
    await wait_listed(identity_stub, app, own, {results[0].event_id})


async def test_other_apps_cannot_see_or_track_for_a_user(
    identity_stub: Stub, app: TestApp, other_app: TestApp
) -> None:
    ref, user_id = await new_user(identity_stub, app)
    by_id = UserRef(user_id=user_id)
    [result] = await track(identity_stub, other_app, [event(by_id)])
    assert result.error.code == grpc.StatusCode.NOT_FOUND.value[0]
    code, _ = await rpc_error(
        identity_stub.ListEvents(pb.ListEventsRequest(user=by_id), metadata=other_app.server)
    )
    assert code == grpc.StatusCode.NOT_FOUND
    # The same external id in the other app names (here: creates) another user.
    [other] = await track(identity_stub, other_app, [event(ref)])
    assert not other.HasField("error")
    assert other.user_id != user_id


async def test_a_new_external_id_or_alias_creates_the_user(
    identity_stub: Stub, app: TestApp
) -> None:
    by_external_id = UserRef(external_id=f"new-{uuid.uuid4().hex[:10]}")
    by_alias = UserRef(alias=UserRef.Alias(label="crm_id", value=uuid.uuid4().hex[:10]))
    results = await track(
        identity_stub,
        app,
        [event(by_external_id, "signed_up"), event(by_alias, "lead"), event(by_external_id)],
    )
    assert all(not r.HasField("error") for r in results)
    # Both events of the new external id went to one new user.
    assert results[0].user_id == results[2].user_id != results[1].user_id
    for ref, result in ((by_external_id, results[0]), (by_alias, results[1])):
        user = await identity_stub.GetUser(pb.GetUserRequest(ref=ref), metadata=app.server)
        assert user.user_id == result.user_id
    await wait_listed(
        identity_stub, app, by_external_id, {results[0].event_id, results[2].event_id}
    )


# --- ListEvents filters and paging --------------------------------------------------------


async def test_list_events_filters_and_pages(identity_stub: Stub, app: TestApp) -> None:
    ref, _ = await new_user(identity_stub, app)
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    names = ["view", "purchase", "view", "purchase", "view", "purchase", "view"]
    # Two events share an instant, so paging must break ties by event id.
    times = [base + timedelta(minutes=m) for m in (0, 1, 2, 3, 3, 5, 6)]
    results = await track(
        identity_stub,
        app,
        [
            event(ref, n, event_id=f"e{i}-{uuid.uuid4().hex[:6]}", at=t)
            for i, (n, t) in enumerate(zip(names, times, strict=True))
        ],
    )
    ids = [r.event_id for r in results]
    await wait_listed(identity_stub, app, ref, set(ids))

    everything = [
        e.event_id
        for e in (
            await identity_stub.ListEvents(pb.ListEventsRequest(user=ref), metadata=app.server)
        ).events
    ]
    newest_first = sorted(range(7), key=lambda i: (times[i], ids[i]), reverse=True)
    assert everything == [ids[i] for i in newest_first]

    pages = await list_pages(identity_stub, app, pb.ListEventsRequest(user=ref, page_size=2))
    assert [len(p) for p in pages] == [2, 2, 2, 1]
    assert [e.event_id for p in pages for e in p] == everything

    purchases = await list_pages(
        identity_stub, app, pb.ListEventsRequest(user=ref, name="purchase", page_size=2)
    )
    assert [e.event_id for p in purchases for e in p] == [ids[5], ids[3], ids[1]]

    window = await list_pages(
        identity_stub,
        app,
        pb.ListEventsRequest(user=ref, start_time=ts(times[1]), end_time=ts(times[5])),
    )
    assert {e.event_id for p in window for e in p} == {ids[1], ids[2], ids[3], ids[4]}

    first = await identity_stub.ListEvents(
        pb.ListEventsRequest(user=ref, page_size=2), metadata=app.server
    )
    # A token only continues the query it came from.
    code, status = await rpc_error(
        identity_stub.ListEvents(
            pb.ListEventsRequest(user=ref, name="view", page_token=first.next_page_token),
            metadata=app.server,
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert error_fields(status) == ["page_token"]


async def test_list_events_argument_errors(identity_stub: Stub, app: TestApp) -> None:
    ref, _ = await new_user(identity_stub, app)
    now = datetime.now(UTC)
    for request, field in [
        (pb.ListEventsRequest(user=ref, page_size=-1), "page_size"),
        (pb.ListEventsRequest(user=ref, name="bad name"), "name"),
        (pb.ListEventsRequest(user=ref, start_time=ts(now), end_time=ts(now)), "end_time"),
        (pb.ListEventsRequest(user=ref, page_token="not-a-token"), "page_token"),
        (pb.ListEventsRequest(), "user"),
    ]:
        code, status = await rpc_error(identity_stub.ListEvents(request, metadata=app.server))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, field
        assert error_fields(status) == [field], field
    # Above the maximum, the page size is coerced down (AIP-158).
    page = await identity_stub.ListEvents(
        pb.ListEventsRequest(user=ref, page_size=5000), metadata=app.server
    )
    assert not page.next_page_token
