"""Identity service benchmarks: tracked events and users end to end, through real identity
processes.

``identity.track_events`` starts ``python -m services.identity`` on a scratch database (the same
way the e2e tests do), creates an app with a server key and users (written straight into the
database: setup, not timed), then sends TrackEvents calls of 1,000 events each, a few in flight
at a time over each replica's channel, as an SDK gateway or an import would. Two figures come
out of the one run:

* ``identity.track_events_per_s``: events accepted per second, from the first call until the
  last answer; an answer means the events are on ``identity.events`` (acks=all).
* ``identity.events_stored_per_s``: events stored by identity's consumers per second, from the
  first call until the consumers have stored the last one (read from their
  ``identity_events_stored_total`` metric), i.e. the end-to-end rate; the consumers run
  concurrently with the producing side, as they do in production.

The first is divided by ``ceiling.pg_copy_events_per_s``: the same events written by one bare
``copy_records_to_table`` into a table of the same columns (no indexes, no partitions), measured
in the same run. The second by ``ceiling.pg_copy_events_indexed_per_s``: the same copy into a
table with the indexes the event store keeps (event id unique per app, the timeline and the
segment-condition indexes), i.e. what the database alone can store.

The identity benchmarks (events and users) run :data:`REPLICAS` identity processes on one
database, each client worker keeping to one replica: one Python process uses one core.

The service, Postgres, Kafka and this load generator share the machine's cores, so the figures
are what one box does, not what the service does with a core of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc.aio
from google.protobuf import struct_pb2
from tidings.identity.v1 import (
    app_pb2,
    apps_service_pb2,
    apps_service_pb2_grpc,
    customer_field_pb2,
    identity_service_pb2,
    identity_service_pb2_grpc,
    user_pb2,
)
from tidings.identity.v1.user_ref_pb2 import UserRef

from bench.ceiling.postgres import timed_copy
from bench.config import Size
from bench.context import Context
from bench.data import CustomerRow, customer_rows
from bench.figure import Figure
from bench.measure import Stopwatch, percentile
from bench.registry import benchmark
from tests.e2e.processes import ServiceProcess, start_service

if TYPE_CHECKING:
    from tidings.identity.v1.identity_service_pb2_grpc import IdentityServiceAsyncStub

#: Events per TrackEvents call: the API's maximum, as a bulk sender would use.
EVENTS_PER_CALL = 1_000
#: Calls in flight at once over each replica's channel.
CONCURRENT_CALLS = 4
#: Identity processes sharing the load: a Python process runs on one core, the box has two (a
#: deployment runs replicas the same way; they share the database and the consumer group).
REPLICAS = 2
#: Users the events are spread over (so the 12 partitions of identity.events all get work).
USERS = 10_000
ADMIN_KEY = "bench-admin-key"
STORE_TIMEOUT_S = 300.0

_NAMES = ("purchase", "app_open", "product_viewed", "add_to_cart", "checkout_started")

_EVENT_COLUMNS = (
    "app_id",
    "user_id",
    "event_id",
    "name",
    "properties",
    "occurred_at",
    "receive_time",
)
_EVENT_DDL = """
    app_id       text        NOT NULL,
    user_id      uuid        NOT NULL,
    event_id     text        NOT NULL,
    name         text        NOT NULL,
    properties   jsonb       NOT NULL,
    occurred_at  timestamptz NOT NULL,
    receive_time timestamptz NOT NULL
"""


def _properties(i: int) -> dict[str, Any]:
    return {"sku": f"SKU-{i % 500:04d}", "price": (i % 97) + 0.99, "quantity": 1 + i % 3}


def _user_ids(count: int) -> list[uuid.UUID]:
    # Deterministic, so runs are comparable.
    return [uuid.UUID(int=(0xB0B << 96) + k) for k in range(count)]


def _event_rows(app_id: str, count: int, now: datetime) -> list[tuple[Any, ...]]:
    """The benchmark's events as table rows (for the raw COPY ceiling)."""
    users = _user_ids(USERS)
    return [
        (
            app_id,
            users[i % USERS],
            f"ev-{i:09d}",
            _NAMES[i % len(_NAMES)],
            json.dumps(_properties(i)),
            now - timedelta(milliseconds=i),
            now,
        )
        for i in range(count)
    ]


def _requests(count: int, now: datetime) -> list[identity_service_pb2.TrackEventsRequest]:
    """The same events as TrackEvents calls of :data:`EVENTS_PER_CALL`, refs by user id."""
    users = [str(u) for u in _user_ids(USERS)]
    requests = []
    for start in range(0, count, EVENTS_PER_CALL):
        request = identity_service_pb2.TrackEventsRequest()
        for i in range(start, min(start + EVENTS_PER_CALL, count)):
            item = request.events.add(
                user=UserRef(user_id=users[i % USERS]),
                name=_NAMES[i % len(_NAMES)],
                event_id=f"ev-{i:09d}",
                properties=_struct(_properties(i)),
            )
            item.occurred_at.FromDatetime(now - timedelta(milliseconds=i))
        requests.append(request)
    return requests


def _struct(values: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


def _event_count(ctx: Context) -> int:
    return ctx.sized(tiny=3_000, full=300_000)


@benchmark("ceiling.pg_copy_events_per_s")
async def pg_copy_events_per_s(ctx: Context) -> Figure:
    """Events/s of one ``copy_records_to_table`` of the benchmark's events, no indexes."""
    count = _event_count(ctx)
    rows = _event_rows("bench-app", count, datetime.now(UTC))
    seconds = await timed_copy(ctx, "events", _EVENT_DDL, _EVENT_COLUMNS, rows)
    return Figure("ceiling.pg_copy_events_per_s", count / seconds, "events/s")


#: What storing an event must keep up besides the row: its id unique per app (deduplication),
#: and the two indexes segment conditions and timelines read (migration 0005).
_EVENT_INDEXES = (
    "CREATE UNIQUE INDEX ON events (app_id, event_id)",
    "CREATE INDEX ON events (app_id, user_id, occurred_at DESC) INCLUDE (name)",
    "CREATE INDEX ON events (app_id, name, occurred_at) INCLUDE (user_id)",
)


@benchmark("ceiling.pg_copy_events_indexed_per_s")
async def pg_copy_events_indexed_per_s(ctx: Context) -> Figure:
    """Events/s of the same ``copy_records_to_table`` into a table with the indexes the event
    store keeps: the most the database alone can store, before any service work."""
    count = _event_count(ctx)
    rows = _event_rows("bench-app", count, datetime.now(UTC))
    seconds = await timed_copy(ctx, "events", _EVENT_DDL, _EVENT_COLUMNS, rows, _EVENT_INDEXES)
    return Figure("ceiling.pg_copy_events_indexed_per_s", count / seconds, "events/s")


async def _create_app(channel: grpc.aio.Channel) -> tuple[str, str]:
    """A new app and a server key for it, through AppsService."""
    apps: Any = apps_service_pb2_grpc.AppsServiceStub(channel)
    admin = (("authorization", f"Bearer {ADMIN_KEY}"),)
    app = await apps.CreateApp(
        apps_service_pb2.CreateAppRequest(app=app_pb2.App(display_name="bench")), metadata=admin
    )
    key = await apps.CreateApiKey(
        apps_service_pb2.CreateApiKeyRequest(app_id=app.app_id, scope=app_pb2.API_KEY_SCOPE_SERVER),
        metadata=admin,
    )
    return str(app.app_id), str(key.secret)


async def _stored_total(services: Sequence[ServiceProcess]) -> float:
    total = 0.0
    for service in services:
        for line in (await service.metrics()).splitlines():
            if line.startswith("identity_events_stored_total "):
                total += float(line.split()[1])
    return total


async def _send_all(
    stubs: Sequence[IdentityServiceAsyncStub],
    requests: Sequence[identity_service_pb2.TrackEventsRequest],
    metadata: tuple[tuple[str, str], ...],
) -> int:
    """Send every request, :data:`CONCURRENT_CALLS` at a time per replica (each worker keeps
    to one replica's stub); returns the accepted events."""
    queue = list(reversed(requests))
    accepted = 0

    async def worker(stub: IdentityServiceAsyncStub) -> None:
        nonlocal accepted
        while queue:
            request = queue.pop()
            response = await stub.TrackEvents(request, metadata=metadata)
            refused = [r for r in response.results if r.HasField("error")]
            if refused:
                raise AssertionError(f"{len(refused)} events refused: {refused[0].error}")
            accepted += len(response.results)

    await asyncio.gather(*(worker(stub) for stub in stubs for _ in range(CONCURRENT_CALLS)))
    return accepted


@contextlib.asynccontextmanager
async def _identity_on_scratch_db(
    ctx: Context, replicas: int = 1
) -> AsyncIterator[tuple[list[ServiceProcess], str]]:
    """``replicas`` identity processes (request logs off) on one scratch database, SERVING;
    yields them and the database's DSN, and stops them afterwards."""
    async with ctx.scratch_database() as dsn:
        services: list[ServiceProcess] = []
        try:
            for _ in range(replicas):
                services.append(
                    await start_service(
                        "identity",
                        database_url=dsn,
                        kafka_bootstrap=ctx.stack.kafka_bootstrap,
                        admin_key=ADMIN_KEY,
                        env={"TIDINGS_LOG_LEVEL": "WARNING"},
                    )
                )
            for service in services:
                await service.wait_serving(within=60)
            yield services, dsn
        finally:
            for service in services:
                await service.stop()


@contextlib.asynccontextmanager
async def _stubs(
    services: Sequence[ServiceProcess],
) -> AsyncIterator[list[IdentityServiceAsyncStub]]:
    """One channel and IdentityService stub per replica (a client spreading its calls)."""
    async with contextlib.AsyncExitStack() as stack:
        channels = [
            await stack.enter_async_context(grpc.aio.insecure_channel(s.grpc_target))
            for s in services
        ]
        yield [identity_service_pb2_grpc.IdentityServiceStub(c) for c in channels]


@benchmark(
    "identity.track_events",
    needs=("ceiling.pg_copy_events_per_s", "ceiling.pg_copy_events_indexed_per_s"),
)
async def track_events(ctx: Context) -> list[Figure]:
    """TrackEvents in calls of 1,000 events: accepted/s, and stored/s by the consumer."""
    count = _event_count(ctx)
    async with _identity_on_scratch_db(ctx, REPLICAS) as (services, dsn):
        async with _stubs(services) as stubs:
            async with grpc.aio.insecure_channel(services[0].grpc_target) as channel:
                app_id, server_key = await _create_app(channel)
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute(
                    "INSERT INTO users (app_id, user_id) SELECT $1, unnest($2::uuid[])",
                    app_id,
                    _user_ids(USERS),
                )
            finally:
                await conn.close()
            metadata = (("authorization", f"Bearer {server_key}"),)
            # Warm-up (untimed): connections, prepared statements, partitions of the month.
            warm = _requests(EVENTS_PER_CALL * len(stubs), datetime.now(UTC) - timedelta(days=1))
            for request in warm:
                for item in request.events:
                    item.event_id = "warm-" + item.event_id
            await _send_all(stubs, warm, metadata)
            base = await _wait_stored(services, EVENTS_PER_CALL * len(stubs), 0.0)

            requests = _requests(count, datetime.now(UTC))
            start = time.perf_counter()
            accepted = await _send_all(stubs, requests, metadata)
            accepted_s = time.perf_counter() - start
            await _wait_stored(services, count, base)
            stored_s = time.perf_counter() - start
        conn = await asyncpg.connect(dsn)
        try:
            stored = await conn.fetchval("SELECT count(*) FROM events WHERE event_id LIKE 'ev-%'")
        finally:
            await conn.close()
    if accepted != count or stored != count:
        raise AssertionError(f"accepted {accepted}, stored {stored}, expected {count}")
    ctx.log(f"  {count:,} events accepted in {accepted_s:.2f} s, all stored after {stored_s:.2f} s")
    limit = ctx.value("ceiling.pg_copy_events_per_s")
    return [
        Figure(
            "identity.track_events_per_s",
            count / accepted_s,
            "events/s",
            limit=limit,
            target=80_000,
        ),
        # Stored events are held to what the database can store with the same indexes.
        Figure(
            "identity.events_stored_per_s",
            count / stored_s,
            "events/s",
            limit=ctx.value("ceiling.pg_copy_events_indexed_per_s"),
        ),
    ]


#: How often the consumers' counters are read. Each read renders the whole metrics page (about
#: 2 ms of the service's CPU); read every 20 ms it took a tenth of each replica's core from
#: the consumer being measured. A quarter second is under 1% of a storing run's length.
STORED_POLL_S = 0.25


async def _wait_stored(services: Sequence[ServiceProcess], count: int, base: float) -> float:
    """Poll the consumers' counters until ``count`` more events than ``base`` are stored."""
    deadline = time.monotonic() + STORE_TIMEOUT_S
    while True:
        total = await _stored_total(services)
        if total - base >= count:
            return total
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {total - base:.0f} of {count} events stored")
        await asyncio.sleep(STORED_POLL_S)


# ---------------------------------------------------------------------------------------------
# Users: BatchUpsertUsers and GetUser


#: GetUser calls per second of the latency run (the issue's target load).
GET_RATE = 2_000
#: A load the service sustains today, so a latency figure shows service time, not queueing.
GET_LIGHT_RATE = 500
#: Most GetUser calls outstanding at once.
MAX_IN_FLIGHT = 256


def _upsert_request(row: CustomerRow) -> identity_service_pb2.UpsertUserRequest:
    """One customer row of :mod:`bench.data` as an upsert by external id (the same 10 values
    the raw upsert ceiling writes: 6 standard fields, 3 typed custom attributes)."""
    external_id, email, first, last, phone, country, language, birth_year, score, signed_up = row
    user = user_pb2.User(
        first_name=first,
        last_name=last,
        email=email,
        phone=phone,
        country=country,
        language=language,
    )
    user.attributes["birth_year"].number_value = birth_year
    user.attributes["score"].number_value = score
    user.attributes["signed_up_at"].timestamp_value.FromDatetime(signed_up)
    return identity_service_pb2.UpsertUserRequest(ref=UserRef(external_id=external_id), user=user)


def _upsert_calls(
    indexes: range, generation: int
) -> list[identity_service_pb2.BatchUpsertUsersRequest]:
    rows = customer_rows(indexes, generation=generation)
    return [
        identity_service_pb2.BatchUpsertUsersRequest(
            requests=[_upsert_request(row) for row in rows[start : start + EVENTS_PER_CALL]],
            # What a bulk sync asks for: ids and errors, not 1,000 profiles echoed back.
            result_view=identity_service_pb2.BatchUpsertUsersRequest.RESULT_VIEW_IDS,
        )
        for start in range(0, len(rows), EVENTS_PER_CALL)
    ]


async def _upsert_all(
    stubs: Sequence[Any],
    calls: Sequence[identity_service_pb2.BatchUpsertUsersRequest],
    metadata: tuple[tuple[str, str], ...],
    concurrency: int,
) -> int:
    """Send every BatchUpsertUsers call, ``concurrency`` at a time per replica (each worker
    keeps to one replica's stub); returns the users written."""
    queue = list(reversed(calls))
    written = 0

    async def worker(stub: Any) -> None:
        nonlocal written
        while queue:
            response = await stub.BatchUpsertUsers(queue.pop(), metadata=metadata)
            failed = [r for r in response.results if r.HasField("error")]
            if failed:
                raise AssertionError(f"{len(failed)} upserts failed: {failed[0].error}")
            written += len(response.results)

    await asyncio.gather(*(worker(stub) for stub in stubs for _ in range(concurrency)))
    return written


async def _paced_gets(
    stubs: Sequence[Any],
    external_ids: Sequence[str],
    metadata: tuple[tuple[str, str], ...],
    seconds: float,
    rate: float = GET_RATE,
) -> tuple[list[float], float]:
    """GetUser at ``rate`` calls/s, open loop; returns latencies (ms) and the rate reached.

    Each call is due at a fixed time; its latency runs from when it was due, so a client or
    server falling behind shows up in the figure instead of quietly lowering the load. At most
    :data:`MAX_IN_FLIGHT` calls are outstanding (thousands of streams on one connection get
    cancelled by gRPC); a call that waits for a slot is late, and its wait counts. Calls take
    the replicas' stubs in turn.
    """
    loop = asyncio.get_running_loop()
    count = int(rate * seconds)
    latencies: list[float] = []
    slots = asyncio.Semaphore(MAX_IN_FLIGHT)

    async def call(due: float, external_id: str, stub: Any) -> None:
        async with slots:
            await stub.GetUser(
                identity_service_pb2.GetUserRequest(ref=UserRef(external_id=external_id)),
                metadata=metadata,
            )
        latencies.append((loop.time() - due) * 1000)

    tasks = []
    start = loop.time() + 0.05
    for i in range(count):
        due = start + i / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        external_id = external_ids[(i * 7919) % len(external_ids)]
        tasks.append(asyncio.create_task(call(due, external_id, stubs[i % len(stubs)])))
    await asyncio.gather(*tasks)
    return latencies, count / (loop.time() - start)


#: Longest wait for the upserts' follow-up work to finish before GetUser is measured.
DRAIN_TIMEOUT_S = 120.0


async def _wait_drained(dsn: str) -> None:
    """Wait until the service has published the upserts' change facts (outbox empty) and
    re-evaluated their users' segments (no dirty marks left).

    Both run in the background of the same process after BatchUpsertUsers answered; measured
    while they drain, GetUser latency would show that backlog (100,000 facts) rather than the
    cost of GetUser under its own load.
    """
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while await conn.fetchval(
            "SELECT (SELECT count(*) FROM outbox) + (SELECT count(*) FROM segment_dirty_users)"
        ):
            if time.monotonic() > deadline:
                raise TimeoutError("the upserts' change facts were not published in time")
            await asyncio.sleep(0.2)
    finally:
        await conn.close()


async def _define_fields(stub: Any, metadata: tuple[tuple[str, str], ...]) -> None:
    for name, field_type in (
        ("birth_year", customer_field_pb2.FIELD_TYPE_NUMBER),
        ("score", customer_field_pb2.FIELD_TYPE_NUMBER),
        ("signed_up_at", customer_field_pb2.FIELD_TYPE_TIMESTAMP),
    ):
        await stub.CreateCustomerField(
            identity_service_pb2.CreateCustomerFieldRequest(
                field=customer_field_pb2.CustomerField(name=name, type=field_type)
            ),
            metadata=metadata,
        )


@benchmark(
    "identity.users", needs=("ceiling.pg_upsert_rows_per_s", "ceiling.grpc_unary_calls_per_s")
)
async def users(ctx: Context) -> list[Figure]:
    """BatchUpsertUsers (1,000 per call, fresh then updating) and GetUser latency at 2,000/s."""
    count = ctx.sized(tiny=2_000, full=50_000)
    get_seconds = 1.0 if ctx.size is Size.TINY else 10.0
    fresh_calls = _upsert_calls(range(count), generation=0)
    update_calls = _upsert_calls(range(count), generation=1)
    warm_calls = _upsert_calls(range(count, count + EVENTS_PER_CALL), generation=0)
    async with (
        _identity_on_scratch_db(ctx, REPLICAS) as (services, dsn),
        _stubs(services) as stubs,
    ):
        async with grpc.aio.insecure_channel(services[0].grpc_target) as channel:
            _, server_key = await _create_app(channel)
        metadata = (("authorization", f"Bearer {server_key}"),)
        await _define_fields(stubs[0], metadata)
        await _upsert_all(stubs, warm_calls, metadata, CONCURRENT_CALLS)  # untimed
        with Stopwatch() as fresh:
            await _upsert_all(stubs, fresh_calls, metadata, CONCURRENT_CALLS)
        with Stopwatch() as update:
            await _upsert_all(stubs, update_calls, metadata, CONCURRENT_CALLS)
        external_ids = [row[0] for row in customer_rows(range(count))]
        await _wait_drained(dsn)
        await _paced_gets(stubs, external_ids, metadata, 0.5)  # warm-up
        latencies, reached = await _paced_gets(stubs, external_ids, metadata, get_seconds)
        light, _ = await _paced_gets(
            stubs, external_ids, metadata, get_seconds, rate=GET_LIGHT_RATE
        )
        conn = await asyncpg.connect(dsn)
        try:
            stored, updated = await conn.fetchrow(
                "SELECT count(*), count(*) FILTER (WHERE email LIKE '%.1@example.com') FROM users"
            ) or (0, 0)
        finally:
            await conn.close()
    if stored != count + EVENTS_PER_CALL or updated != count:
        raise AssertionError(f"{stored} users / {updated} updated, expected {count}")
    ctx.log(
        f"  {count:,} users created in {fresh.seconds:.2f} s, updated in {update.seconds:.2f} s;"
        f" {len(latencies):,} GetUser at {reached:,.0f}/s"
    )
    limit = ctx.value("ceiling.pg_upsert_rows_per_s")
    return [
        Figure(
            "identity.upsert_users_per_s",
            2 * count / (fresh.seconds + update.seconds),
            "users/s",
            limit=limit,
            target=50_000,
        ),
        Figure(
            "identity.upsert_users_fresh_per_s",
            fresh.rate(count),
            "users/s",
            limit=limit,
            target=50_000,
        ),
        Figure(
            "identity.upsert_users_update_per_s",
            update.rate(count),
            "users/s",
            limit=limit,
            target=50_000,
        ),
        Figure("identity.get_user_p50_ms", percentile(latencies, 50), "ms"),
        Figure("identity.get_user_p99_ms", percentile(latencies, 99), "ms", target=5.0),
        Figure(
            "identity.get_user_rate_per_s",
            reached,
            "req/s",
            limit=ctx.value("ceiling.grpc_unary_calls_per_s"),
            target=GET_RATE,
        ),
        Figure(f"identity.get_user_p50_ms_at_{GET_LIGHT_RATE}_rps", percentile(light, 50), "ms"),
        Figure(f"identity.get_user_p99_ms_at_{GET_LIGHT_RATE}_rps", percentile(light, 99), "ms"),
    ]
