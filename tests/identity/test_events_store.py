"""The events store and the consumer's batch handler against a real, migrated database.

The behaviour through gRPC and Kafka is in ``test_events.py``; here are the parts that are
easier to pin down one level lower: partitions (on demand, moving rows out of the default
partition), deduplication within and across batches, users that are gone or merged, the rules
of the domain module, and the plan of the per-user count the segment engine will run.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from google.protobuf import struct_pb2, timestamp_pb2
from tidings.events.v1.tracked_event_pb2 import TrackedEvent
from tidings.identity.v1.user_ref_pb2 import UserRef

from services.identity import events, events_consumer, events_store
from services.identity.events_consumer import EventStorer
from services.identity.events_store import NewEvent
from services.identity.server import MIGRATIONS_DIR
from services.runtime.db import create_pool
from services.runtime.errors import InvalidArgument, PermissionDenied
from services.runtime.kafka import IDENTITY_EVENTS, Record
from services.runtime.metrics import Metrics
from services.runtime.migrations import migrate, sources_for
from tests.conftest import KAFKA_BOOTSTRAP
from tests.runtime.kafka_helpers import partitions_of

NOW = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)


@pytest.fixture
async def pool(scratch_db: str) -> AsyncIterator[asyncpg.Pool]:
    await migrate(scratch_db, sources_for("identity", MIGRATIONS_DIR))
    pool = await create_pool(scratch_db, min_size=1, max_size=4)
    try:
        yield pool
    finally:
        await pool.close()


async def add_app(pool: asyncpg.Pool, app_id: str) -> None:
    await pool.execute(
        "INSERT INTO apps (app_id, display_name) VALUES ($1, $1) ON CONFLICT DO NOTHING", app_id
    )


async def add_users(pool: asyncpg.Pool, app_id: str, count: int) -> list[uuid.UUID]:
    await add_app(pool, app_id)
    users = [uuid.uuid4() for _ in range(count)]
    await pool.execute(
        "INSERT INTO users (app_id, user_id) SELECT $1, unnest($2::uuid[])", app_id, users
    )
    return users


def new_event(
    app_id: str, user_id: uuid.UUID, *, at: datetime, name: str = "purchase", event_id: str = ""
) -> NewEvent:
    return NewEvent(
        app_id=app_id,
        user_id=user_id,
        event_id=event_id or str(uuid.uuid4()),
        name=name,
        properties_json=json.dumps({"sku": "A-1"}),
        occurred_at=at,
        receive_time=at,
    )


def record(
    app_id: str,
    user_id: uuid.UUID | str,
    *,
    event_id: str,
    at: datetime = NOW,
    properties: dict[str, Any] | None = None,
) -> Record[TrackedEvent]:
    occurred_at = timestamp_pb2.Timestamp()
    occurred_at.FromDatetime(at)
    value = TrackedEvent(
        event_id=event_id,
        app_id=app_id,
        user_id=str(user_id),
        name="purchase",
        occurred_at=occurred_at,
    )
    if properties:
        value.properties.update(properties)
    return Record(
        topic="identity.events",
        partition=0,
        offset=0,
        key=str(user_id),
        value=value,
        timestamp_ms=int(at.timestamp() * 1000),
    )


async def stored_ids(pool: asyncpg.Pool, app_id: str) -> list[str]:
    rows = await pool.fetch(
        "SELECT event_id FROM events WHERE app_id = $1 ORDER BY event_id", app_id
    )
    return [row["event_id"] for row in rows]


# --- partitions ---------------------------------------------------------------------------


async def test_partitions_are_created_on_demand_and_rows_move_out_of_default(
    pool: asyncpg.Pool,
) -> None:
    [user] = await add_users(pool, "app", 1)
    march = datetime(2026, 3, 10, tzinfo=UTC)
    async with pool.acquire() as conn:
        # No partition for March yet: the row lands in the default partition.
        await events_store.insert_events(conn, [new_event("app", user, at=march, event_id="e1")])
        assert await conn.fetchval("SELECT count(*) FROM events_default") == 1
        created = await events_store.ensure_month_partitions(conn, [date(2026, 3, 1)])
        assert created == [date(2026, 3, 1)]
        # Creating it again is a no-op.
        assert await events_store.ensure_month_partitions(conn, [date(2026, 3, 1)]) == []
        assert await conn.fetchval("SELECT count(*) FROM events_default") == 0
        assert await conn.fetchval("SELECT count(*) FROM events_y2026m03") == 1
        assert date(2026, 3, 1) in await events_store.month_partitions(conn)
        await events_store.insert_events(conn, [new_event("app", user, at=march, event_id="e2")])
        assert await conn.fetchval("SELECT count(*) FROM events_y2026m03") == 2


async def test_storer_creates_the_months_it_needs_and_leaves_far_past_in_default(
    pool: asyncpg.Pool,
) -> None:
    [user] = await add_users(pool, "app", 1)
    storer = EventStorer(pool, clock=lambda: NOW)
    await storer.prepare()
    async with pool.acquire() as conn:
        months = await events_store.month_partitions(conn)
    assert months == {date(2026, 2, 1), date(2026, 3, 1), date(2026, 4, 1)}

    back_filled = NOW - timedelta(days=200)  # inside the window: gets its month
    ancient = datetime(2001, 1, 1, tzinfo=UTC)  # outside: default partition
    await storer.handle(
        [
            record("app", user, event_id="recent", at=back_filled),
            record("app", user, event_id="ancient", at=ancient),
        ]
    )
    async with pool.acquire() as conn:
        months = await events_store.month_partitions(conn)
        assert events_store.month_of(back_filled) in months
        assert date(2001, 1, 1) not in months
        assert await conn.fetchval("SELECT event_id FROM events_default") == "ancient"
    assert await stored_ids(pool, "app") == ["ancient", "recent"]


# --- the consumer's handler ---------------------------------------------------------------


async def test_a_redelivered_batch_and_a_repeated_id_are_stored_once(pool: asyncpg.Pool) -> None:
    users = await add_users(pool, "app", 2)
    storer = EventStorer(pool, clock=lambda: NOW)
    await storer.prepare()
    batch = [
        record("app", users[0], event_id="a"),
        record("app", users[1], event_id="b"),
        record("app", users[0], event_id="a"),  # the same id twice in one batch
    ]
    await storer.handle(batch)
    await storer.handle(batch)  # redelivered after a crash before the offset commit
    assert await stored_ids(pool, "app") == ["a", "b"]
    # The same id in another app is another event.
    [other] = await add_users(pool, "other", 1)
    await storer.handle([record("other", other, event_id="a")])
    assert await stored_ids(pool, "other") == ["a"]


async def test_events_of_unknown_apps_and_users_are_skipped(pool: asyncpg.Pool) -> None:
    [user] = await add_users(pool, "app", 1)
    storer = EventStorer(pool, clock=lambda: NOW)
    await storer.prepare()
    await storer.handle(
        [
            record("app", user, event_id="kept"),
            record("another-database-app", user, event_id="foreign"),
            record("app", uuid.uuid4(), event_id="no-such-user"),
            record("app", "not-a-uuid", event_id="malformed"),
        ]
    )
    assert await pool.fetchval("SELECT count(*) FROM events") == 1
    assert await stored_ids(pool, "app") == ["kept"]


async def test_events_of_a_merged_away_profile_follow_it(pool: asyncpg.Pool) -> None:
    anonymous, known = uuid.uuid4(), uuid.uuid4()
    await add_app(pool, "app")
    await pool.execute("INSERT INTO users (app_id, user_id) VALUES ('app', $1)", known)
    # The anonymous profile was merged into the known one and no longer exists.
    await pool.execute(
        "INSERT INTO user_merges (app_id, into_user_id, from_user_id, key_id) "
        "VALUES ('app', $1, $2, 'k')",
        known,
        anonymous,
    )
    storer = EventStorer(pool, clock=lambda: NOW)
    await storer.prepare()
    await storer.handle([record("app", anonymous, event_id="late")])
    assert await pool.fetchval("SELECT user_id FROM events WHERE event_id = 'late'") == known


async def test_unstorable_property_values_are_sanitised(pool: asyncpg.Pool) -> None:
    [user] = await add_users(pool, "app", 1)
    storer = EventStorer(pool, clock=lambda: NOW)
    await storer.prepare()
    await storer.handle(
        [record("app", user, event_id="x", properties={"n": math.nan, "s": "a\x00b", "ok": 1})]
    )
    stored = await pool.fetchval("SELECT properties FROM events WHERE event_id = 'x'")
    assert stored == {"n": None, "s": "a\ufffdb", "ok": 1}


async def test_gdpr_helpers_list_and_delete_a_users_events(pool: asyncpg.Pool) -> None:
    users = await add_users(pool, "app", 2)
    async with pool.acquire() as conn:
        await events_store.ensure_month_partitions(conn, [date(2026, 3, 1)])
        await events_store.insert_events(
            conn,
            [
                new_event("app", users[0], at=NOW, event_id="late"),
                new_event("app", users[0], at=NOW - timedelta(days=1), event_id="early"),
                new_event("app", users[1], at=NOW, event_id="other"),
            ],
        )
        listed = await events_store.list_all_for_user(conn, "app", users[0])
        assert [e.event_id for e in listed] == ["early", "late"]  # oldest first
        assert listed[0].properties == {"sku": "A-1"}
        async with conn.transaction():
            assert await events_store.delete_for_user(conn, "app", users[0]) == 2
        assert await events_store.list_all_for_user(conn, "app", users[0]) == []
        remaining = await conn.fetch("SELECT event_id FROM event_ids ORDER BY event_id")
        assert [row["event_id"] for row in remaining] == ["other"]
        assert [
            e.event_id for e in await events_store.list_all_for_user(conn, "app", users[1])
        ] == ["other"]


async def test_move_to_user_reattributes_events(pool: asyncpg.Pool) -> None:
    source, target = await add_users(pool, "app", 2)
    async with pool.acquire() as conn:
        await events_store.insert_events(conn, [new_event("app", source, at=NOW, event_id="m")])
        assert await events_store.move_to_user(conn, "app", source, target) == 1
        [moved] = await events_store.list_all_for_user(conn, "app", target)
        assert moved.event_id == "m"


# --- the domain rules ---------------------------------------------------------------------


def event_input(**overrides: object) -> events.EventInput:
    values: dict[str, object] = {
        "ref": UserRef(external_id="crm-1"),
        "name": "purchase",
        "properties": struct_pb2.Struct(),
        "occurred_at": None,
        "event_id": "",
    }
    values.update(overrides)
    return events.EventInput(**values)  # type: ignore[arg-type]


def timestamp(at: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(at)
    return stamp


def violated_fields(error: object) -> list[str]:
    assert isinstance(error, InvalidArgument), error
    return [v.field for v in error.field_violations]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"name": ""}, "events[3].name"),
        ({"name": "has space"}, "events[3].name"),
        ({"name": "x" * 129}, "events[3].name"),
        ({"event_id": "x" * 129}, "events[3].event_id"),
        ({"event_id": "a\x00b"}, "events[3].event_id"),
        ({"occurred_at": timestamp(NOW + timedelta(minutes=6))}, "events[3].occurred_at"),
        ({"ref": UserRef()}, "events[3].user"),
        ({"ref": UserRef(user_id="nope")}, "events[3].user.user_id"),
    ],
)
def test_check_event_names_the_bad_field(overrides: dict[str, object], field: str) -> None:
    error = events.check_event(3, event_input(**overrides), now=NOW, client=False)
    assert violated_fields(error) == [field]


def test_check_event_accepts_edge_values() -> None:
    good = event_input(
        name="a" * 128,
        event_id="e" * 128,
        occurred_at=timestamp(NOW + timedelta(minutes=4)),
    )
    assert not isinstance(events.check_event(0, good, now=NOW, client=False), Exception)
    past = event_input(
        name="app.opened-v2_x", occurred_at=timestamp(datetime(1999, 1, 1, tzinfo=UTC))
    )
    assert not isinstance(events.check_event(0, past, now=NOW, client=False), Exception)


def test_properties_limits() -> None:
    big = struct_pb2.Struct()
    big.update({"blob": "x" * (64 * 1024)})
    assert violated_fields(
        events.check_event(0, event_input(properties=big), now=NOW, client=False)
    ) == ["events[0].properties"]
    nan = struct_pb2.Struct()
    nan.update({"deep": {"list": [1, math.inf]}})
    assert violated_fields(
        events.check_event(0, event_input(properties=nan), now=NOW, client=False)
    ) == ["events[0].properties"]


def test_client_keys_may_only_name_a_subscription() -> None:
    for ref in (UserRef(external_id="crm-1"), UserRef(user_id=str(uuid.uuid4()))):
        error = events.check_event(0, event_input(ref=ref), now=NOW, client=True)
        assert isinstance(error, PermissionDenied)
    own = UserRef(subscription_id=str(uuid.uuid4()))
    assert not isinstance(
        events.check_event(0, event_input(ref=own), now=NOW, client=True), Exception
    )


def test_page_tokens_round_trip_and_are_bound_to_their_query() -> None:
    stored = events_store.Event(
        app_id="app",
        user_id=uuid.uuid4(),
        event_id="e-1",
        name="purchase",
        properties={},
        occurred_at=datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC),
        receive_time=NOW,
    )
    token = events.encode_page_token(stored, "fp")
    assert events.decode_page_token(token, "fp") == (stored.occurred_at, "e-1")
    for bad in (token, "garbage", "e30"):
        with pytest.raises(InvalidArgument) as raised:
            events.decode_page_token(bad, "other-query")
        assert [v.field for v in raised.value.field_violations] == ["page_token"]


def test_properties_json_matches_the_struct() -> None:
    properties = struct_pb2.Struct()
    properties.update({"a": 1.5, "b": [True, None, "x"], "c": {"d": "e"}})
    assert json.loads(events.properties_json(properties)) == {
        "a": 1.5,
        "b": [True, None, "x"],
        "c": {"d": "e"},
    }
    assert events.properties_json(struct_pb2.Struct()) == "{}"


# --- where a new consumer group starts ------------------------------------------------------


async def committed_offsets(group: str) -> dict[int, int | None]:
    consumer = AIOKafkaConsumer(bootstrap_servers=KAFKA_BOOTSTRAP, group_id=group)
    await consumer.start()
    try:
        partitions = await partitions_of(KAFKA_BOOTSTRAP, IDENTITY_EVENTS.name)
        return {
            p: await consumer.committed(TopicPartition(IDENTITY_EVENTS.name, p)) for p in partitions
        }
    finally:
        await consumer.stop()


async def end_offsets() -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=KAFKA_BOOTSTRAP)
    await consumer.start()
    try:
        partitions = await partitions_of(KAFKA_BOOTSTRAP, IDENTITY_EVENTS.name)
        ends = await consumer.end_offsets(
            [TopicPartition(IDENTITY_EVENTS.name, p) for p in partitions]
        )
        return {tp.partition: offset for tp, offset in ends.items()}
    finally:
        await consumer.stop()


async def test_a_new_group_starts_where_records_for_this_database_can_begin(
    pool: asyncpg.Pool,
) -> None:
    # Records for this database's apps cannot predate its oldest app (nor, without an app, now);
    # a margin covers clock skew. runtime's start_new_group_at turns that time into offsets.
    now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    margin = events_consumer._START_MARGIN
    assert await events_consumer.start_time(pool, now) == now - margin
    await add_app(pool, "app")
    created = await pool.fetchval("SELECT create_time FROM apps WHERE app_id = 'app'")
    assert await events_consumer.start_time(pool, now) == created - margin


def test_a_restarted_consumer_reuses_its_metrics() -> None:
    # The runtime restarts a failed background task in the same process; registering the
    # counters again would raise "duplicated timeseries".
    metrics = Metrics()
    assert events_consumer._counters(metrics) == events_consumer._counters(metrics)
