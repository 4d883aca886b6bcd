"""Segment benchmarks over 1,000,000 users with 10 attributes and 20,000,000 events.

Setup (not timed): an identity process on a scratch database; an app created through
AppsService; users, customer fields, email subscriptions and events written straight into the
database by server-side ``INSERT ... SELECT generate_series`` (the fastest bulk load there is:
no client encoding at all), the monthly event partitions created first and the event indexes
built after the load, then ``VACUUM ANALYZE`` (what autovacuum does for a live table: planner
statistics and the visibility map that index-only scans need). Expression indexes for the two
attributes the counts filter on are created as docs/segments.md recommends for hot fields.

Figures (each with the issue's target):

* ``identity.segment_count_attr_ms``: CountSegment of an unsaved attribute-only condition
  (``plan = "gold" AND age >= 30``), median of repeated calls through gRPC.
* ``identity.segment_count_events_ms``: CountSegment of attribute + event count (``plan in
  (gold, pro) AND purchase at least 2 times in the last 30 days``), median.
* ``identity.segment_materialise_1m_s``: CreateSegment of ``age >= 49`` (about half the
  users), which materialises every member (rows, history-ready periods and one outbox fact per
  member) before it answers.
* ``identity.segment_reevaluate_p99_ms``: one user's re-evaluation against the app's five
  DYNAMIC segments after a change to the user, in one transaction with its facts (the
  maintainer's unit of work, called in-process), p99 over many users.
* ``identity.segment_fact_lag_p99_ms``: 1,000 profile changes/s (BatchUpsertUsers of 50
  users, 20 calls/s) that move users in and out of segments; from each call's start to the
  arrival of its SEGMENT_ENTERED / SEGMENT_EXITED fact on ``identity.changes``, p99 (read
  uncommitted, see :func:`_fact_lag_p99`; the read-committed figure is logged too). Runs on a
  fresh identity process (with its outbox relay) after the outbox of the setup's
  materialisations was discarded, so the figure is the steady state, not the time to publish
  a million setup facts.

The setup takes minutes at full size (20,000,000 events and their indexes); at tiny size
(10,000 users, 200,000 events) seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc.aio
from aiokafka import AIOKafkaConsumer, TopicPartition
from google.protobuf import duration_pb2
from tidings.identity.v1 import (
    app_pb2,
    apps_service_pb2,
    apps_service_pb2_grpc,
    identity_service_pb2,
    identity_service_pb2_grpc,
    subscription_pb2,
    user_pb2,
)
from tidings.identity.v1 import segment_pb2 as sp
from tidings.identity.v1.user_ref_pb2 import UserRef

from bench.context import Context
from bench.figure import Figure
from bench.measure import Stopwatch, percentile
from bench.registry import benchmark
from services.identity import events_store, segment_maintainer
from services.runtime.db import create_pool
from services.runtime.kafka import IDENTITY_CHANGES
from tests.e2e.processes import ServiceProcess, start_service
from tests.runtime.kafka_helpers import partitions_of

ADMIN_KEY = "bench-admin-key"
#: Distinct event names; "purchase" is one in ten events.
EVENT_NAMES = (
    "app_open",
    "page_view",
    "product_viewed",
    "add_to_cart",
    "purchase",
    "login",
    "search",
    "share",
    "checkout_started",
    "review",
)
#: Days of history the events cover.
HISTORY_DAYS = 365
COUNT_RUNS = 7
REEVALUATE_USERS = 300
LAG_RATE = 1_000
LAG_BATCH = 50

Op = sp.Operator


def user_uuid(i: int) -> uuid.UUID:
    """The id of the ``i``-th generated user (1-based), as the SQL below spells it."""
    return uuid.UUID(f"00000000-0000-4000-8000-{i:012x}")


_USER_ID_SQL = "('00000000-0000-4000-8000-' || lpad(to_hex({i}), 12, '0'))::uuid"

# Ten custom attributes of four types, spread deterministically; timestamps stored as the
# service stores them (RFC 3339, UTC, microseconds, Z).
_USERS_SQL = f"""
INSERT INTO users (app_id, user_id, external_id, first_name, email, country, timezone,
                   birth_year, birth_month, birth_day, attributes, create_time, update_time)
SELECT $1, {_USER_ID_SQL.format(i="i")}, 'u' || i, 'Name' || (i % 1000),
       'u' || i || '@example.com', (ARRAY['ES', 'FR', 'DE', 'US', 'MX'])[1 + i % 5],
       CASE i % 10 WHEN 0 THEN 'Europe/Madrid' WHEN 1 THEN 'America/New_York' END,
       1950 + i % 50, 1 + i % 12, 1 + i % 28,
       jsonb_build_object(
           'plan', (ARRAY['free', 'basic', 'pro', 'gold'])[1 + i % 4],
           'age', (18 + (i * 7919) % 63)::float8,
           'vip', i % 10 = 0,
           'city', 'city_' || (i * 31) % 50,
           'score', ((i * 104729) % 1000) / 10.0,
           'lifetime_value', (i % 5000) * 1.5,
           'newsletter', i % 3 = 0,
           'source', (ARRAY['ads', 'organic', 'referral', 'import'])[1 + (i / 7) % 4],
           'signup_at', to_char((($2::timestamptz - make_interval(days => (i % 1000)::int))
                                 AT TIME ZONE 'UTC'), 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
           'last_seen_at', to_char((($2::timestamptz
                                     - make_interval(mins => ((i * 13) % 86400)::int))
                                    AT TIME ZONE 'UTC'), 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
       ),
       $2::timestamptz - make_interval(days => (i % 1000)::int), $2
FROM generate_series(1, $3::bigint) AS i
"""

_FIELDS = {
    "plan": "string",
    "age": "number",
    "vip": "bool",
    "city": "string",
    "score": "number",
    "lifetime_value": "number",
    "newsletter": "bool",
    "source": "string",
    "signup_at": "timestamp",
    "last_seen_at": "timestamp",
}

_SUBSCRIPTIONS_SQL = f"""
INSERT INTO subscriptions (app_id, subscription_id, user_id, type, token, opt_in)
SELECT $1, gen_random_uuid(), {_USER_ID_SQL.format(i="i")}, 'email', 'u' || i || '@example.com',
       CASE WHEN i % 10 = 0 THEN 'unsubscribed' ELSE 'subscribed' END
FROM generate_series(1, $2::bigint, 3) AS i
"""

# Events of users spread by a multiplicative hash, over the last HISTORY_DAYS days.
_EVENTS_SQL = f"""
INSERT INTO events (app_id, user_id, event_id, name, properties, occurred_at, receive_time)
SELECT $1, {_USER_ID_SQL.format(i="1 + (g * 48271) % $5")}, 'e' || g,
       (ARRAY{list(EVENT_NAMES)!r})[1 + g % {len(EVENT_NAMES)}],
       (ARRAY(SELECT jsonb_build_object('amount', k + 0.99, 'sku', 'SKU-' || k)
              FROM generate_series(0, 99) AS k))[1 + (g % 100)::int],
       $2::timestamptz - make_interval(mins => ((g * 7) % ({HISTORY_DAYS} * 1440))::int), $2
FROM generate_series($3::bigint, $4::bigint) AS g
"""

_EVENT_INDEXES = {
    "events_user_time": (
        "CREATE INDEX events_user_time ON events (app_id, user_id, occurred_at DESC) INCLUDE (name)"
    ),
    "events_name_time": (
        "CREATE INDEX events_name_time ON events (app_id, name, occurred_at) INCLUDE (user_id)"
    ),
}

#: The expression indexes docs/segments.md recommends for attributes that segments filter on;
#: the one on ``plan`` also covers the attributes, so counts led by it are index-only.
_ATTRIBUTE_INDEXES = (
    "CREATE INDEX users_attr_plan ON users (app_id, (attributes->>'plan')) INCLUDE (attributes)",
    "CREATE INDEX users_attr_age ON users (app_id, ((attributes->>'age')::float8))",
)


async def load_dataset(
    dsn: str,
    app_id: str,
    *,
    users: int,
    events: int,
    now: datetime,
    log: Callable[[str], None] = lambda _: None,
) -> None:
    """Write the benchmark's users, fields, subscriptions and events into a migrated database."""
    conn = await asyncpg.connect(dsn)
    try:
        with Stopwatch() as step:
            await conn.execute(_USERS_SQL, app_id, now, users)
            await conn.executemany(
                "INSERT INTO customer_fields (app_id, name, type) VALUES ($1, $2, $3)",
                [(app_id, name, kind) for name, kind in _FIELDS.items()],
            )
            await conn.execute(_SUBSCRIPTIONS_SQL, app_id, users)
        log(f"  users and subscriptions: {step.seconds:.0f} s")
        months = {events_store.month_of(now - timedelta(days=d)) for d in range(HISTORY_DAYS + 31)}
        await events_store.ensure_month_partitions(conn, months)
        for name in _EVENT_INDEXES:
            await conn.execute(f"DROP INDEX {name}")
    finally:
        await conn.close()
    # Two sessions, one per core: generation is CPU-bound on the server.
    half = events // 2

    async def insert(start: int, end: int) -> None:
        worker = await asyncpg.connect(dsn)
        try:
            step = 2_000_000
            for low in range(start, end + 1, step):
                await worker.execute(_EVENTS_SQL, app_id, now, low, min(low + step - 1, end), users)
        finally:
            await worker.close()

    with Stopwatch() as step:
        await asyncio.gather(insert(1, half), insert(half + 1, events))
    log(f"  events: {step.seconds:.0f} s")
    with Stopwatch() as step:
        await asyncio.gather(*(_run(dsn, ddl) for ddl in _EVENT_INDEXES.values()))
        await asyncio.gather(*(_run(dsn, ddl) for ddl in _ATTRIBUTE_INDEXES))
    log(f"  indexes: {step.seconds:.0f} s")
    with Stopwatch() as step:
        await asyncio.gather(
            _run(dsn, "VACUUM ANALYZE users"),
            _run(dsn, "VACUUM ANALYZE subscriptions"),
            _run(dsn, "VACUUM ANALYZE events"),
        )
    log(f"  vacuum: {step.seconds:.0f} s")


async def _run(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _create_app(channel: grpc.aio.Channel) -> tuple[str, tuple[tuple[str, str], ...]]:
    apps: Any = apps_service_pb2_grpc.AppsServiceStub(channel)
    admin = (("authorization", f"Bearer {ADMIN_KEY}"),)
    app = await apps.CreateApp(
        apps_service_pb2.CreateAppRequest(app=app_pb2.App(display_name="segments bench")),
        metadata=admin,
    )
    key = await apps.CreateApiKey(
        apps_service_pb2.CreateApiKeyRequest(app_id=app.app_id, scope=app_pb2.API_KEY_SCOPE_SERVER),
        metadata=admin,
    )
    return str(app.app_id), (("authorization", f"Bearer {key.secret}"),)


def _attr(field: str, op: Any, *values: user_pb2.AttributeValue) -> sp.Condition:
    return sp.Condition(
        attribute=sp.AttributeCondition(field=field, operator=op, values=list(values))
    )


def _s(text: str) -> user_pb2.AttributeValue:
    return user_pb2.AttributeValue(string_value=text)


def _n(number: float) -> user_pb2.AttributeValue:
    return user_pb2.AttributeValue(number_value=number)


def _all(*conditions: sp.Condition) -> sp.Condition:
    return sp.Condition(all=sp.ConditionList(conditions=list(conditions)))


def _window(days: int) -> duration_pb2.Duration:
    span = duration_pb2.Duration()
    span.FromTimedelta(timedelta(days=days))
    return span


ATTRIBUTE_ONLY = _all(
    _attr("attributes.plan", Op.OPERATOR_EQUALS, _s("gold")),
    _attr("attributes.age", Op.OPERATOR_GREATER_OR_EQUAL, _n(30)),
)
ATTRIBUTE_AND_EVENTS = _all(
    _attr("attributes.plan", Op.OPERATOR_IN, _s("gold"), _s("pro")),
    sp.Condition(
        event=sp.EventCondition(
            name="purchase",
            count=2,
            count_operator=sp.COUNT_OPERATOR_AT_LEAST,
            within_last=_window(30),
        )
    ),
)
HALF = _attr("attributes.age", Op.OPERATOR_GREATER_OR_EQUAL, _n(49))
#: Segments the lag and re-evaluation runs keep up to date (besides HALF).
STANDING = {
    "gold": _attr("attributes.plan", Op.OPERATOR_EQUALS, _s("gold")),
    "gold_30": ATTRIBUTE_ONLY,
    "active_buyers": ATTRIBUTE_AND_EVENTS,
    "reachable": sp.Condition(
        subscription=sp.SubscriptionCondition(type=subscription_pb2.SUBSCRIPTION_TYPE_EMAIL)
    ),
}


async def _median_ms(stub: Any, metadata: Any, condition: sp.Condition) -> tuple[float, int]:
    request = sp.CountSegmentRequest(condition=condition)
    counted = await stub.CountSegment(request, metadata=metadata)  # warm-up
    times = []
    for _ in range(COUNT_RUNS):
        with Stopwatch() as sw:
            await stub.CountSegment(request, metadata=metadata)
        times.append(sw.seconds * 1000)
    return statistics.median(times), int(counted.count)


@contextlib.asynccontextmanager
async def _identity(ctx: Context, dsn: str, **env: str) -> AsyncIterator[ServiceProcess]:
    service = await start_service(
        "identity",
        database_url=dsn,
        kafka_bootstrap=ctx.stack.kafka_bootstrap,
        admin_key=ADMIN_KEY,
        env={"TIDINGS_LOG_LEVEL": "WARNING", **env},
    )
    try:
        await service.wait_serving(within=120)
        yield service
    finally:
        await service.stop(within=30)


@benchmark("identity.segments")
async def segments(ctx: Context) -> list[Figure]:
    """Count, materialise, re-evaluate and fact lag over 1M users and 20M events."""
    users = ctx.sized(tiny=10_000, full=1_000_000)
    events = ctx.sized(tiny=200_000, full=20_000_000)
    now = datetime.now(UTC)
    figures: list[Figure] = []
    async with ctx.scratch_database() as dsn:
        # Phase 1 without the outbox relay: the setup's million entry facts are not the
        # subject, and would flood the shared broker.
        async with (
            _identity(ctx, dsn, TIDINGS_RUN_OUTBOX_RELAY="false") as service,
            grpc.aio.insecure_channel(service.grpc_target) as channel,
        ):
            app_id, metadata = await _create_app(channel)
            with Stopwatch() as load:
                await load_dataset(dsn, app_id, users=users, events=events, now=now, log=ctx.log)
            ctx.log(f"  loaded {users:,} users and {events:,} events in {load.seconds:.0f} s")
            stub: Any = identity_service_pb2_grpc.IdentityServiceStub(channel)
            attr_ms, attr_count = await _median_ms(stub, metadata, ATTRIBUTE_ONLY)
            events_ms, events_count = await _median_ms(stub, metadata, ATTRIBUTE_AND_EVENTS)
            ctx.log(
                f"  count: attributes {attr_ms:.0f} ms ({attr_count:,} users), "
                f"attributes + events {events_ms:.0f} ms ({events_count:,} users)"
            )
            with Stopwatch() as materialise:
                half = await stub.CreateSegment(
                    sp.CreateSegmentRequest(
                        segment=sp.Segment(display_name="half", condition=HALF)
                    ),
                    metadata=metadata,
                    timeout=600,
                )
            ctx.log(
                f"  materialised {half.member_count:,} members of {users:,} users "
                f"in {materialise.seconds:.1f} s"
            )
            standing = {}
            for name, condition in STANDING.items():
                standing[name] = await stub.CreateSegment(
                    sp.CreateSegmentRequest(
                        segment=sp.Segment(display_name=name, condition=condition)
                    ),
                    metadata=metadata,
                    timeout=600,
                )
        figures += [
            Figure("identity.segment_count_attr_ms", attr_ms, "ms", target=200),
            Figure("identity.segment_count_events_ms", events_ms, "ms", target=1500),
            Figure("identity.segment_materialise_1m_s", materialise.seconds, "s", target=10),
        ]
        await _discard_setup_facts(dsn)
        reevaluate_ms = await _reevaluate_p99(dsn, app_id, users)
        ctx.log(f"  one user's re-evaluation p99 {reevaluate_ms:.1f} ms")
        figures.append(Figure("identity.segment_reevaluate_p99_ms", reevaluate_ms, "ms", target=10))
        async with _identity(ctx, dsn) as service:
            lag_ms, facts = await _fact_lag_p99(
                ctx, service, app_id, metadata, users, standing["gold"].segment_id, dsn
            )
        ctx.log(f"  {facts:,} segment facts, change to fact p99 {lag_ms:.0f} ms")
        figures.append(Figure("identity.segment_fact_lag_p99_ms", lag_ms, "ms", target=1000))
    return figures


async def _discard_setup_facts(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("DELETE FROM outbox")
        await conn.execute("DELETE FROM segment_dirty_users")
        await conn.execute("VACUUM ANALYZE segment_members")
    finally:
        await conn.close()


async def _reevaluate_p99(dsn: str, app_id: str, users: int) -> float:
    """p99 ms of the maintainer's unit of work for one user, right after a change to it."""
    pool = await create_pool(dsn, min_size=1, max_size=1)
    rng = random.Random(7)
    times: list[float] = []
    try:
        async with pool.acquire() as conn:
            for n in range(REEVALUATE_USERS):
                user_id = user_uuid(rng.randint(1, users))
                plan = "gold" if n % 2 else "silver"
                await conn.execute(
                    "UPDATE users SET attributes = attributes "
                    "|| jsonb_build_object('plan', $3::text) WHERE app_id = $1 AND user_id = $2",
                    app_id,
                    user_id,
                    plan,
                )
                with Stopwatch() as sw:
                    async with conn.transaction():
                        await segment_maintainer.reevaluate(
                            conn, app_id, [user_id], at=datetime.now(UTC)
                        )
                times.append(sw.seconds * 1000)
            await conn.execute("DELETE FROM outbox")
    finally:
        await pool.close()
    return percentile(times[10:], 99)


async def _gold_users(dsn: str, app_id: str, chosen: list[int]) -> dict[int, bool]:
    """Whether each of the chosen users' plan is "gold" now."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT user_id, attributes->>'plan' = 'gold' AS gold FROM users "
            "WHERE app_id = $1 AND user_id = ANY($2::uuid[])",
            app_id,
            [user_uuid(i) for i in chosen],
        )
    finally:
        await conn.close()
    by_id = {row["user_id"]: bool(row["gold"]) for row in rows}
    return {i: by_id[user_uuid(i)] for i in chosen}


class _FactWatch:
    """Reads ``identity.changes`` from its end and matches the facts about one segment with
    the changes expected to cause them (per user, in order)."""

    def __init__(self, bootstrap: str, app_id: str, segment_id: str, isolation: str) -> None:
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level=isolation
        )
        self.bootstrap = bootstrap
        self.app_id = app_id
        self.segment_id = segment_id
        self.waiting: dict[str, list[float]] = {}
        self.lags: list[float] = []

    async def start(self) -> None:
        await self.consumer.start()
        partitions = await partitions_of(self.bootstrap, IDENTITY_CHANGES.name)
        tps = [TopicPartition(IDENTITY_CHANGES.name, p) for p in partitions]
        self.consumer.assign(tps)
        for tp, offset in (await self.consumer.end_offsets(tps)).items():
            self.consumer.seek(tp, offset)

    def expect(self, user_id: str, sent: float) -> None:
        self.waiting.setdefault(user_id, []).append(sent)

    @property
    def missing(self) -> int:
        return sum(len(queue) for queue in self.waiting.values())

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set() or self.missing:
            batches = await self.consumer.getmany(timeout_ms=100)
            arrived = time.monotonic()
            for records in batches.values():
                for record in records:
                    if record.value is None:
                        continue
                    change = IDENTITY_CHANGES.decode(record.value)
                    if change.app_id == self.app_id and change.segment_id == self.segment_id:
                        queue = self.waiting.get(change.user_id)
                        if queue:
                            self.lags.append((arrived - queue.pop(0)) * 1000)


async def _fact_lag_p99(
    ctx: Context,
    service: ServiceProcess,
    app_id: str,
    metadata: Any,
    users: int,
    gold_id: str,
    dsn: str,
) -> tuple[float, int]:
    """Changes at :data:`LAG_RATE`/s that set users' plan; p99 ms from the call of each change
    that moves a user into or out of the "gold" segment to that fact's arrival.

    Every such change has exactly one fact about "gold" (each user changes once), so each fact
    is matched with the change that caused it. A change that gets no fact fails the benchmark.

    The figure reads the topic ``read_uncommitted``: the broker is shared, and a process of
    another test or benchmark killed in the middle of a Kafka transaction on
    ``identity.changes`` holds every ``read_committed`` reader of that partition back until
    the broker times the transaction out (10 s), which would measure other people's crashes.
    The same run's ``read_committed`` figure is logged next to it.
    """
    seconds = 2.0 if users < 100_000 else 10.0
    watches = {
        isolation: _FactWatch(ctx.stack.kafka_bootstrap, app_id, gold_id, isolation)
        for isolation in ("read_uncommitted", "read_committed")
    }
    try:
        for watch in watches.values():
            await watch.start()
        async with grpc.aio.insecure_channel(service.grpc_target) as channel:
            stub: Any = identity_service_pb2_grpc.IdentityServiceStub(channel)
            stop = asyncio.Event()
            readers = [asyncio.create_task(watch.run(stop)) for watch in watches.values()]
            rng = random.Random(11)
            calls = int(seconds * LAG_RATE / LAG_BATCH)
            interval = LAG_BATCH / LAG_RATE
            # Each user changes once: two changes of one user in flight could commit in either
            # order, and the maintainer rightly publishes only the net change of a user whose
            # changes it picks up together.
            chosen = rng.sample(range(1, users + 1), calls * LAG_BATCH)
            gold = await _gold_users(dsn, app_id, chosen)
            start = time.monotonic()
            pending: list[asyncio.Future[Any]] = []
            for n in range(calls):
                await asyncio.sleep(max(0.0, start + n * interval - time.monotonic()))
                batch = chosen[n * LAG_BATCH : (n + 1) * LAG_BATCH]
                request = identity_service_pb2.BatchUpsertUsersRequest()
                now = time.monotonic()
                for i in batch:
                    to_gold = rng.random() < 0.5
                    item = request.requests.add(ref=UserRef(external_id=f"u{i}"))
                    item.user.attributes["plan"].string_value = "gold" if to_gold else "free"
                    if to_gold != gold[i]:
                        gold[i] = to_gold
                        for watch in watches.values():
                            watch.expect(str(user_uuid(i)), now)
                pending.append(
                    asyncio.ensure_future(stub.BatchUpsertUsers(request, metadata=metadata))
                )
            await asyncio.gather(*pending)
            stop.set()
            done, _ = await asyncio.wait(readers, timeout=60)
            for task in done:
                task.result()
            if len(done) < len(readers):
                missing = {name: watch.missing for name, watch in watches.items()}
                raise AssertionError(f"segment facts never arrived: {missing}")
    finally:
        for watch in watches.values():
            await watch.consumer.stop()
    lags = watches["read_uncommitted"].lags
    committed = watches["read_committed"].lags
    ctx.log(
        f"  fact lag p50 {percentile(lags, 50):.0f} ms, max {max(lags):.0f} ms; "
        f"read_committed p50 {percentile(committed, 50):.0f} ms, "
        f"p99 {percentile(committed, 99):.0f} ms"
    )
    metrics = {
        line.split()[0]: float(line.split()[1])
        for line in (await service.metrics()).splitlines()
        if line.startswith("identity_segment_lag_seconds_")
    }
    if metrics.get("identity_segment_lag_seconds_count"):
        mean_ms = (
            metrics["identity_segment_lag_seconds_sum"]
            / metrics["identity_segment_lag_seconds_count"]
            * 1000
        )
        ctx.log(f"  of which change to membership commit: mean {mean_ms:.0f} ms")
    return percentile(lags, 99), len(lags)
