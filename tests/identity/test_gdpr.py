"""GDPR: ExportUser (everything held about a user) and DeleteUser (erasure).

Through the real server: a user with attributes, an alias, subscriptions, a merged anonymous
profile and stored events is exported, then erased; every way of naming it stops working, the
change feed says so, and the same external id upserted again is a new, empty profile. One level
lower, against a migrated scratch database, erasure leaves no row of the user in any table.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import asyncpg
import grpc
import pytest
from tidings.events.v1.identity_change_pb2 import IdentityChange
from tidings.identity.v1 import identity_service_pb2 as pb
from tidings.identity.v1 import subscription_pb2 as spb
from tidings.identity.v1 import user_pb2, user_ref_pb2

from services.identity import events_store, users
from services.identity.events_store import NewEvent
from services.identity.refs import ByExternalId
from services.identity.server import MIGRATIONS_DIR
from services.runtime.db import DBConnection, create_pool
from services.runtime.errors import NotFound
from services.runtime.migrations import migrate, sources_for
from tests.identity.conftest import TestApp as AppKeys
from tests.identity.support import ChangeFeed, by_alias, by_id, ext, failure, new_id, s
from tests.polling import eventually

if TYPE_CHECKING:
    from tidings.identity.v1.identity_service_pb2_grpc import (
        IdentityServiceAsyncStub as IdentityServiceStub,
    )

#: How long stored events may take to appear (TrackEvents answers once they are on Kafka).
STORE_DEADLINE_S = 20.0


async def _subscribe(
    stub: IdentityServiceStub, app: AppKeys, user: user_ref_pb2.UserRef | None
) -> spb.Subscription:
    subscription: spb.Subscription = await stub.CreateSubscription(
        pb.CreateSubscriptionRequest(
            subscription=spb.Subscription(
                type=spb.SUBSCRIPTION_TYPE_IOS_PUSH, token=uuid.uuid4().hex * 2
            ),
            user=user,
        ),
        metadata=app.server,
    )
    return subscription


async def _track(
    stub: IdentityServiceStub,
    app: AppKeys,
    ref: user_ref_pb2.UserRef,
    count: int,
    items: list[pb.TrackedEventInput] | None = None,
) -> list[str]:
    """Track ``items``, or ``count`` plain purchases of ``ref``; their event ids."""
    events = items or [pb.TrackedEventInput(user=ref, name="purchase") for _ in range(count)]
    response = await stub.TrackEvents(pb.TrackEventsRequest(events=events), metadata=app.server)
    assert not any(r.HasField("error") for r in response.results)
    return [r.event_id for r in response.results]


async def _wait_stored(
    stub: IdentityServiceStub, app: AppKeys, ref: user_ref_pb2.UserRef, event_ids: set[str]
) -> None:
    async def stored() -> set[str]:
        listed = await stub.ListEvents(
            pb.ListEventsRequest(user=ref, page_size=1000), metadata=app.server
        )
        return {e.event_id for e in listed.events}

    await eventually(
        stored, lambda found: event_ids <= found, within=STORE_DEADLINE_S, what="events stored"
    )


async def test_export_then_erase(identity_stub: IdentityServiceStub, app: AppKeys) -> None:
    cid, crm = new_id(), new_id("crm")
    created = await identity_stub.UpsertUser(
        pb.UpsertUserRequest(
            ref=ext(cid),
            user=user_pb2.User(first_name="Ana", email="ana@example.com", attributes={"p": s("x")}),
        ),
        metadata=app.server,
    )
    user_id = created.user.user_id
    await identity_stub.AddAlias(
        pb.AddAliasRequest(ref=ext(cid), alias=user_pb2.Alias(label="crm_id", value=crm)),
        metadata=app.server,
    )
    held = await _subscribe(identity_stub, app, ext(cid))
    # An anonymous device with its own events, then logged in: merged into the known user.
    device = await _subscribe(identity_stub, app, None)
    device_ref = user_ref_pb2.UserRef(subscription_id=device.subscription_id)
    early = await _track(identity_stub, app, device_ref, 1)
    await _wait_stored(identity_stub, app, device_ref, set(early))
    login = await identity_stub.Login(
        pb.LoginRequest(subscription_id=device.subscription_id, external_id=cid),
        metadata=app.server,
    )
    assert login.user.user_id == user_id
    assert login.merged_user_id == device.user_id
    later = await _track(identity_stub, app, ext(cid), 2)
    await _wait_stored(identity_stub, app, ext(cid), set(early + later))

    export = await identity_stub.ExportUser(pb.ExportUserRequest(ref=ext(cid)), metadata=app.server)
    assert export.user.user_id == user_id
    assert export.user.email == "ana@example.com"
    assert [(a.label, a.value) for a in export.user.aliases] == [("crm_id", crm)]
    assert {x.subscription_id for x in export.user.subscriptions} == {
        held.subscription_id,
        device.subscription_id,
    }
    assert (export.user.counts.subscriptions, export.user.counts.events) == (2, 3)
    assert {e.event_id for e in export.events} == set(early + later)
    times = [e.occurred_at.ToDatetime() for e in export.events]
    assert times == sorted(times)
    assert [(m.from_user_id, m.into_user_id, m.subscription_id) for m in export.merges] == [
        (device.user_id, user_id, device.subscription_id)
    ]

    async with ChangeFeed(app.app_id) as feed:
        await identity_stub.DeleteUser(
            pb.DeleteUserRequest(ref=by_alias("crm_id", crm)), metadata=app.server
        )
        (fact,) = await feed.about([user_id], 1)
    assert (fact.kind, fact.external_id, fact.app_id) == (
        IdentityChange.KIND_USER_DELETED,
        cid,
        app.app_id,
    )

    for ref in (
        ext(cid),
        by_id(user_id),
        by_alias("crm_id", crm),
        user_ref_pb2.UserRef(subscription_id=held.subscription_id),
    ):
        gone = await failure(identity_stub.GetUser(pb.GetUserRequest(ref=ref), metadata=app.server))
        assert (gone.code, gone.reason) == (grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND")
    for subscription in (held, device):
        missing = await failure(
            identity_stub.GetSubscription(
                pb.GetSubscriptionRequest(subscription_id=subscription.subscription_id),
                metadata=app.server,
            )
        )
        assert missing.code == grpc.StatusCode.NOT_FOUND
    again = await failure(
        identity_stub.DeleteUser(pb.DeleteUserRequest(ref=by_id(user_id)), metadata=app.server)
    )
    assert again.code == grpc.StatusCode.NOT_FOUND

    # The same customer coming back is a new person as far as Tidings knows.
    reborn = await identity_stub.UpsertUser(pb.UpsertUserRequest(ref=ext(cid)), metadata=app.server)
    assert reborn.created
    assert reborn.user.user_id != user_id
    fresh = await identity_stub.ExportUser(pb.ExportUserRequest(ref=ext(cid)), metadata=app.server)
    assert (fresh.user.first_name, len(fresh.user.attributes), len(fresh.user.aliases)) == (
        "",
        0,
        0,
    )
    assert (len(fresh.user.subscriptions), len(fresh.events), len(fresh.merges)) == (0, 0, 0)
    # Its alias and push tokens are free again.
    await identity_stub.AddAlias(
        pb.AddAliasRequest(ref=ext(cid), alias=user_pb2.Alias(label="crm_id", value=crm)),
        metadata=app.server,
    )


async def test_export_and_erase_need_an_existing_user(
    identity_stub: IdentityServiceStub, app: AppKeys
) -> None:
    for call in (
        identity_stub.ExportUser(pb.ExportUserRequest(ref=ext(new_id())), metadata=app.server),
        identity_stub.DeleteUser(pb.DeleteUserRequest(ref=ext(new_id())), metadata=app.server),
    ):
        assert (await failure(call)).code == grpc.StatusCode.NOT_FOUND
    malformed = await failure(
        identity_stub.DeleteUser(pb.DeleteUserRequest(ref=ext("undefined")), metadata=app.server)
    )
    assert (malformed.code, malformed.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        ["ref.external_id"],
    )


#: What a gRPC client accepts by default; the test stubs use a channel with default options.
DEFAULT_CLIENT_LIMIT = 4 * 1024 * 1024


async def _track_big(
    stub: IdentityServiceStub, app: AppKeys, ref: user_ref_pb2.UserRef, count: int
) -> list[str]:
    """``count`` events of ~60 KB each, a second apart (two share an instant), oldest first."""
    start = datetime.now(UTC) - timedelta(days=1)
    items = []
    for index in range(count):
        item = pb.TrackedEventInput(
            user=ref, name="page_view", event_id=f"big-{index:03d}-{uuid.uuid4().hex[:6]}"
        )
        item.properties.update({"blob": "x" * 60_000, "index": index})
        item.occurred_at.FromDatetime(start + timedelta(seconds=min(index, count - 2)))
        items.append(item)
    ids = []
    for first in range(0, count, 12):  # ~720 KB per call
        ids += await _track(stub, app, ref, 0, items[first : first + 12])
    return ids


async def _export_pages(
    stub: IdentityServiceStub, app: AppKeys, ref: user_ref_pb2.UserRef
) -> list[pb.ExportUserResponse]:
    pages = [await stub.ExportUser(pb.ExportUserRequest(ref=ref), metadata=app.server)]
    while pages[-1].next_events_page_token:
        request = pb.ExportUserRequest(ref=ref, events_page_token=pages[-1].next_events_page_token)
        pages.append(await stub.ExportUser(request, metadata=app.server))
    return pages


async def test_a_big_history_is_exported_in_pages_a_default_client_accepts(
    identity_stub: IdentityServiceStub, app: AppKeys
) -> None:
    cid = new_id()
    await identity_stub.UpsertUser(pb.UpsertUserRequest(ref=ext(cid)), metadata=app.server)
    big = await _track_big(identity_stub, app, ext(cid), 84)  # ~5 MB of events
    # One user's events share a partition: once this one is stored, all before it are.
    sentinel = await _track(identity_stub, app, ext(cid), 1)
    await _wait_stored(identity_stub, app, ext(cid), set(sentinel))

    pages = await _export_pages(identity_stub, app, ext(cid))
    assert len(pages) >= 2
    assert all(page.ByteSize() < DEFAULT_CLIENT_LIMIT for page in pages)
    assert pages[0].user.external_id == cid
    assert all(not page.HasField("user") and not page.merges for page in pages[1:])
    exported = [e.event_id for page in pages for e in page.events]
    assert exported == [*big, *sentinel]  # each once, oldest first (ties by event id)

    # ListEvents pages are bounded by bytes the same way, whatever page_size asks for.
    listed = []
    request = pb.ListEventsRequest(user=ext(cid), page_size=1000)
    while True:
        page = await identity_stub.ListEvents(request, metadata=app.server)
        assert page.ByteSize() < DEFAULT_CLIENT_LIMIT
        listed += [e.event_id for e in page.events]
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    assert listed == list(reversed(exported))

    # A token continues only the export it came from.
    other = new_id()
    await identity_stub.UpsertUser(pb.UpsertUserRequest(ref=ext(other)), metadata=app.server)
    foreign = await failure(
        identity_stub.ExportUser(
            pb.ExportUserRequest(ref=ext(other), events_page_token=pages[0].next_events_page_token),
            metadata=app.server,
        )
    )
    assert (foreign.code, foreign.reason, foreign.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
        ["events_page_token"],
    )


# -- one level lower: no row of an erased user is left -------------------------------------------

NOW = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)
_TABLES = ("users", "user_aliases", "subscriptions", "user_merges", "events")


@pytest.fixture
async def pool(scratch_db: str) -> AsyncIterator[asyncpg.Pool]:
    await migrate(scratch_db, sources_for("identity", MIGRATIONS_DIR))
    pool = await create_pool(scratch_db, min_size=1, max_size=2)
    try:
        yield pool
    finally:
        await pool.close()


async def _rows_of(conn: DBConnection, user_id: uuid.UUID) -> dict[str, int]:
    counts = {}
    for table in _TABLES:
        column = "into_user_id" if table == "user_merges" else "user_id"
        counts[table] = await conn.fetchval(
            f"SELECT count(*) FROM {table} WHERE {column} = $1", user_id
        )
    return counts


async def test_erasure_leaves_no_row_behind(pool: asyncpg.Pool) -> None:
    app_id = "app_gdpr"
    async with pool.acquire() as conn:
        await conn.execute("INSERT INTO apps (app_id, display_name) VALUES ($1, $1)", app_id)
        (keep,) = await conn.fetch(
            """
            INSERT INTO users (app_id, user_id, external_id) VALUES ($1, $2, 'keep')
            RETURNING user_id
            """,
            app_id,
            uuid.uuid4(),
        )
        user_id = uuid.uuid4()
        await conn.execute(
            "INSERT INTO users (app_id, user_id, external_id) VALUES ($1, $2, 'gone')",
            app_id,
            user_id,
        )
        await conn.execute(
            "INSERT INTO user_aliases (app_id, label, value, user_id) VALUES ($1, 'crm', 'x', $2)",
            app_id,
            user_id,
        )
        await conn.execute(
            """
            INSERT INTO subscriptions (app_id, subscription_id, user_id, type, token)
            VALUES ($1, $2, $3, 'email', 'ana@example.com')
            """,
            app_id,
            uuid.uuid4(),
            user_id,
        )
        await conn.execute(
            """
            INSERT INTO user_merges (app_id, into_user_id, from_user_id, key_id)
            VALUES ($1, $2, $3, 'k')
            """,
            app_id,
            user_id,
            uuid.uuid4(),
        )
        await events_store.ensure_month_partitions(conn, [events_store.month_of(NOW)])
        events = [
            NewEvent(
                app_id=app_id,
                user_id=who,
                event_id=str(uuid.uuid4()),
                name="purchase",
                properties_json=json.dumps({}),
                occurred_at=NOW,
                receive_time=NOW,
            )
            for who in (user_id, user_id, keep["user_id"])
        ]
        await events_store.insert_events(conn, events)
        before = await _rows_of(conn, user_id)
        assert all(before.values()), before
        assert await conn.fetchval("SELECT count(*) FROM event_ids") == 3

        await users.delete_user(conn, app_id, ByExternalId("gone"), at=NOW)

        assert await _rows_of(conn, user_id) == dict.fromkeys(_TABLES, 0)
        # Nobody else's data went with it; the fact is in the outbox.
        assert (await _rows_of(conn, keep["user_id"]))["events"] == 1
        assert await conn.fetchval("SELECT count(*) FROM event_ids") == 1
        assert await conn.fetchval("SELECT count(*) FROM outbox") == 1
        with pytest.raises(NotFound):
            await users.delete_user(conn, app_id, ByExternalId("gone"), at=NOW)
