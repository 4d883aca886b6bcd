"""Journey engine benchmarks, through real identity and journey processes on scratch databases.

* ``journey.entries_per_s``: an all-contacts journey whose first node is a send, activated over
  N contacts (100,000 full): from ActivateJourney until the N-th send request of the journey is
  read from ``delivery.requests`` (so it covers the audience job paging through identity's
  ListUsers, entry, the engine's claim and step, the outbox and its relay). Limit: the raw
  Kafka ceiling.
* ``journey.timer_lag_p99_ms``: customers waiting at a delay whose timers come due at a steady
  5,000/s (seeded straight into the database, untimed); lag = when the engine stepped the
  customer minus the timer's due time (``path_steps.exit_time - wake_at``), p99.
* ``journey.timer_burst_1m_s``: 1,000,000 timers due at the same instant, drained (every
  customer stepped out of the delay and the journey); limit = the same count at the raw claim
  ceiling (``ceiling.timer_claims_per_s``), in seconds.
* ``journey.activation_1m_peak_rss_mb``: the journey process's peak RSS while it activates a
  journey over 1,000,000 contacts (the audience is streamed page by page; the first node is a
  delay, so the figure is the loader's and the engine's memory, not Kafka's).

Timer benchmarks need no identity: their journeys and customers are rows written directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc.aio
from aiokafka import AIOKafkaConsumer, TopicPartition
from tidings.journey.v1 import journey_pb2 as jpb
from tidings.journey.v1 import journey_service_pb2 as pb
from tidings.journey.v1 import journey_service_pb2_grpc

from bench.context import Context
from bench.figure import Figure
from bench.identity import ADMIN_KEY, _create_app
from bench.measure import peak_rss_mb, percentile, reset_peak_rss
from bench.registry import benchmark
from services.runtime.kafka import DELIVERY_REQUESTS
from tests.delivery.sink import Sink
from tests.e2e.processes import ServiceProcess, start_service

TIMER_RATE = 5_000
#: Journey processes entering the all-contacts audience.
ENTRY_REPLICAS = 2
#: Engine processes draining the burst.
BURST_REPLICAS = 2


def _definition(first: jpb.Node, entry: jpb.Entry) -> jpb.JourneyDefinition:
    return jpb.JourneyDefinition(
        entry=entry,
        start_node_id=first.node_id,
        nodes=[first, jpb.Node(node_id="end", exit=jpb.ExitNode())],
    )


def _send_first() -> jpb.JourneyDefinition:
    node = jpb.Node(node_id="send", send=jpb.SendNode(template_id="tpl", channels=["ios_push"]))
    node.next["next"] = "end"
    return _definition(node, jpb.Entry(all_contacts=jpb.Entry.AllContacts()))


def _delay_first(entry: jpb.Entry) -> jpb.JourneyDefinition:
    node = jpb.Node(node_id="wait", delay=jpb.DelayNode())
    node.delay.duration.FromTimedelta(timedelta(days=1))
    node.next["next"] = "end"
    return _definition(node, entry)


def _webhook_after_delay(url: str) -> jpb.JourneyDefinition:
    """A delay, then a webhook node calling ``url`` (keyed per customer), then the end."""
    journey = _delay_first(jpb.Entry(customer_list=jpb.Entry.CustomerList()))
    journey.nodes[0].next["next"] = "hook"
    hook = journey.nodes.add(
        node_id="hook",
        webhook=jpb.WebhookNode(
            url=url, body='{"user": "{{ user.user_id }}"}', secret="bench-secret"
        ),
    )
    hook.webhook.headers["Idempotency-Key"] = "{{ user.user_id }}"
    hook.next["success"] = "end"
    hook.next["failure"] = "end"
    return journey


async def _journey(
    ctx: Context, dsn: str, identity: ServiceProcess | None, *, wait: bool = True, **env: str
) -> ServiceProcess:
    settings = {
        "TIDINGS_LOG_LEVEL": "WARNING",
        "TIDINGS_IDENTITY_TARGET": identity.grpc_target if identity else "127.0.0.1:1",
        "TIDINGS_DELIVERY_TARGET": "",
        "TIDINGS_ENGINE_IDLE_WAIT": "0.02",
    }
    settings.update({f"TIDINGS_{k.upper()}": v for k, v in env.items()})
    service = await start_service(
        "journey",
        database_url=dsn,
        kafka_bootstrap=ctx.stack.kafka_bootstrap,
        admin_key=ADMIN_KEY,
        env=settings,
    )
    if wait:
        await service.wait_serving(within=60)
    return service


@contextlib.asynccontextmanager
async def _identity_with_users(
    ctx: Context, count: int, user_ids: list[uuid.UUID] | None = None
) -> AsyncIterator[tuple[ServiceProcess, str, str]]:
    """Identity on a scratch database with an app of ``count`` users (written directly), with
    ``user_ids`` as their ids when given."""
    async with ctx.scratch_database() as dsn:
        service = await start_service(
            "identity",
            database_url=dsn,
            kafka_bootstrap=ctx.stack.kafka_bootstrap,
            admin_key=ADMIN_KEY,
            env={"TIDINGS_LOG_LEVEL": "WARNING"},
        )
        try:
            await service.wait_serving(within=60)
            async with grpc.aio.insecure_channel(service.grpc_target) as channel:
                app_id, key = await _create_app(channel)
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute(
                    """
                    INSERT INTO users (app_id, user_id, create_time, update_time)
                    SELECT $1, COALESCE(($3::uuid[])[g], gen_random_uuid()), t, t
                    FROM (SELECT g, now() - interval '1 day' + g * interval '1 microsecond' AS t
                          FROM generate_series(1, $2) AS g) AS s
                    """,
                    app_id,
                    count,
                    user_ids or [],
                )
                await conn.execute("VACUUM ANALYZE users")
            finally:
                await conn.close()
            yield service, app_id, key
        finally:
            await service.stop()


async def _count_sends(ctx: Context, journey_id: str, count: int, start_offsets: Any) -> float:
    """Read ``delivery.requests`` from ``start_offsets`` until ``count`` requests of the
    journey arrived; returns when (perf_counter)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=ctx.stack.kafka_bootstrap,
        enable_auto_commit=False,
        isolation_level="read_committed",
        fetch_max_bytes=64 * 1024 * 1024,
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    await consumer.start()
    try:
        consumer.assign(list(start_offsets))
        for tp, offset in start_offsets.items():
            consumer.seek(tp, offset)
        seen: set[str] = set()
        needle = journey_id.encode()
        deadline = time.monotonic() + 600
        while len(seen) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(seen)} of {count} send requests arrived")
            batches = await consumer.getmany(timeout_ms=200, max_records=20_000)
            for records in batches.values():
                for record in records:
                    if record.value is not None and needle in record.value:
                        request = DELIVERY_REQUESTS.decode(record.value)
                        if request.journey_id == journey_id:
                            seen.add(request.idempotency_key)
        return time.perf_counter()
    finally:
        await consumer.stop()


async def _end_offsets(ctx: Context) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=ctx.stack.kafka_bootstrap)
    await consumer.start()
    try:
        tps = [
            TopicPartition(DELIVERY_REQUESTS.name, p) for p in range(DELIVERY_REQUESTS.partitions)
        ]
        return dict(await consumer.end_offsets(tps))
    finally:
        await consumer.stop()


@benchmark("journey.entries_per_s", needs=("ceiling.kafka_msgs_per_s",))
async def entries_per_s(ctx: Context) -> Figure:
    """All-contacts journey with a send first: activation to the last send request on Kafka."""
    count = ctx.sized(tiny=3_000, full=100_000)
    async with (
        _identity_with_users(ctx, count) as (identity, _app_id, key),
        ctx.scratch_database() as dsn,
    ):
        journey = await _journey(ctx, dsn, identity)
        # More replicas share the audience pages and the claims.
        others = [await _journey(ctx, dsn, identity) for _ in range(ENTRY_REPLICAS - 1)]
        try:
            metadata = (("authorization", f"Bearer {key}"),)
            async with grpc.aio.insecure_channel(journey.grpc_target) as channel:
                stub: Any = journey_service_pb2_grpc.JourneyServiceStub(channel)
                created = await stub.CreateJourney(
                    pb.CreateJourneyRequest(
                        journey=jpb.Journey(display_name="bench", definition=_send_first())
                    ),
                    metadata=metadata,
                )
                offsets = await _end_offsets(ctx)
                reader = asyncio.create_task(_count_sends(ctx, created.journey_id, count, offsets))
                start = time.perf_counter()
                await stub.ActivateJourney(
                    pb.ActivateJourneyRequest(journey_id=created.journey_id),
                    metadata=metadata,
                )
                end = await reader
        finally:
            for replica in [journey, *others]:
                await replica.stop()
    seconds = end - start
    ctx.log(f"  {count:,} customers entered and on delivery.requests in {seconds:.2f} s")
    return Figure(
        "journey.entries_per_s",
        count / seconds,
        "entries/s",
        limit=ctx.value("ceiling.kafka_msgs_per_s"),
        target=20_000,
    )


async def _migrate(ctx: Context, dsn: str) -> None:
    migrate = await start_service(
        "journey",
        database_url=dsn,
        kafka_bootstrap=ctx.stack.kafka_bootstrap,
        admin_key=ADMIN_KEY,
        args=("migrate",),
    )
    if await migrate.wait_exit() != 0:
        raise RuntimeError(f"journey migrate failed: {migrate.log_text()[-2000:]}")


async def _seed_waiting(
    dsn: str,
    count: int,
    first_due: datetime,
    rate: float | None,
    *,
    app_id: str = "bench-app",
    journey: jpb.JourneyDefinition | None = None,
    user_ids: list[uuid.UUID] | None = None,
) -> tuple[str, uuid.UUID]:
    """An active journey (a delay first, then the end unless ``journey`` says otherwise) with
    ``count`` customers (``user_ids`` when given) waiting at the delay, due from ``first_due`` at
    ``rate`` per second (all at once when None). Written straight into the journey database."""
    journey_id = uuid.uuid4()
    journey = journey or _delay_first(jpb.Entry(customer_list=jpb.Entry.CustomerList()))
    definition = journey.SerializeToString()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            """
            INSERT INTO journeys (app_id, journey_id, display_name, state, latest_version,
                                  active_version, create_time, update_time)
            VALUES ($1, $2, 'timers', 'active', 1, 1, now(), now())
            """,
            app_id,
            journey_id,
        )
        await conn.execute(
            """
            INSERT INTO journey_versions (app_id, journey_id, version, definition, create_time,
                                          activate_time)
            VALUES ($1, $2, 1, $3, now(), now())
            """,
            app_id,
            journey_id,
            definition,
        )
        step = 1.0 / rate if rate else 0.0
        await conn.execute(
            """
            CREATE TABLE bench_due AS
            SELECT COALESCE(($4::uuid[])[g], gen_random_uuid()) AS user_id,
                   $1::timestamptz + (g - 1) * make_interval(secs => $2) AS wake_at
            FROM generate_series(1, $3) AS g
            """,
            first_due,
            step,
            count,
            user_ids or [],
        )
        await conn.execute(
            """
            INSERT INTO instances (app_id, journey_id, user_id, visit, version, node_id, status,
                                   waiting_for, wake_at, seq, enter_time, node_enter_time,
                                   trigger_id)
            SELECT $1, $2, user_id, 1, 1, 'wait', 'waiting', 'timer', wake_at, 1,
                   wake_at - interval '1 day', wake_at - interval '1 day', 'bench'
            FROM bench_due
            """,
            app_id,
            journey_id,
        )
        await conn.execute(
            """
            INSERT INTO path_steps (app_id, journey_id, user_id, visit, seq, node_id, enter_time)
            SELECT $1, $2, user_id, 1, 1, 'wait', wake_at - interval '1 day' FROM bench_due
            """,
            app_id,
            journey_id,
        )
        await conn.execute("VACUUM ANALYZE instances")
        await conn.execute("VACUUM ANALYZE path_steps")
    finally:
        await conn.close()
    return app_id, journey_id


async def _wait_drained(dsn: str, app_id: str, journey_id: uuid.UUID, within: float) -> float:
    """Poll until no customer of the journey is inside; returns when (perf_counter).

    Each poll asks whether anyone is inside through the index of customers inside
    (``instances_user``, in its order, first row only): a ``count(*)`` over a million rows is
    a parallel scan of the whole table, up to a second of CPU per poll, taken from the engine
    the figure measures."""
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + within
        while True:
            inside = await conn.fetchval(
                """
                SELECT user_id FROM instances
                WHERE app_id = $1 AND status IN ('active', 'waiting') AND journey_id = $2
                ORDER BY app_id, user_id
                LIMIT 1
                """,
                app_id,
                journey_id,
            )
            if inside is None:
                return time.perf_counter()
            if time.monotonic() > deadline:
                left = await conn.fetchval(
                    "SELECT count(*) FROM instances WHERE journey_id = $1"
                    " AND status IN ('active', 'waiting')",
                    journey_id,
                )
                raise TimeoutError(f"{left} customers still inside")
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


@benchmark("journey.timer_lag_p99_ms")
async def timer_lag_p99_ms(ctx: Context) -> Figure:
    """Timers due at a steady 5,000/s: p99 of (stepped at - due at)."""
    count = ctx.sized(tiny=2_500, full=50_000)
    async with ctx.scratch_database() as dsn:
        journey = await _journey(ctx, dsn, None)
        try:
            # Due from a few seconds from now, so seeding is over before the first comes due.
            first_due = datetime.now(UTC) + timedelta(seconds=8)
            app_id, journey_id = await _seed_waiting(dsn, count, first_due, TIMER_RATE)
            await _wait_drained(dsn, app_id, journey_id, within=count / TIMER_RATE + 120)
        finally:
            await journey.stop()
        conn = await asyncpg.connect(dsn)
        try:
            lags = await conn.fetch(
                """
                SELECT extract(epoch FROM p.exit_time - d.wake_at) * 1000 AS lag_ms
                FROM path_steps p JOIN bench_due d USING (user_id)
                WHERE p.node_id = 'wait'
                """
            )
        finally:
            await conn.close()
    values = [float(r["lag_ms"]) for r in lags]
    if len(values) != count:
        raise AssertionError(f"{len(values)} of {count} timers fired")
    ctx.log(
        f"  {count:,} timers at {TIMER_RATE}/s: lag p50 {percentile(values, 50):.0f} ms,"
        f" p99 {percentile(values, 99):.0f} ms, max {max(values):.0f} ms"
    )
    return Figure("journey.timer_lag_p99_ms", percentile(values, 99), "ms", target=1000.0)


@benchmark("journey.timer_burst_1m_s", needs=("ceiling.timer_claims_per_s",))
async def timer_burst_1m_s(ctx: Context) -> Figure:
    """1,000,000 timers due at once: seconds until every customer was stepped."""
    count = ctx.sized(tiny=20_000, full=1_000_000)
    async with ctx.scratch_database() as dsn:
        await _migrate(ctx, dsn)
        # Seeded before the engine starts: the burst is due when it comes up.
        app_id, journey_id = await _seed_waiting(
            dsn, count, datetime.now(UTC) - timedelta(minutes=1), None
        )
        start = time.perf_counter()
        # Two replicas, as a deployment scales the engine: they share the claims (SKIP LOCKED).
        replicas = await asyncio.gather(
            *(_journey(ctx, dsn, None, wait=False) for _ in range(BURST_REPLICAS))
        )
        try:
            # From the first replica serving: that one starts draining at once.
            await replicas[0].wait_serving(within=60)
            ready = time.perf_counter()
            for journey in replicas[1:]:
                await journey.wait_serving(within=60)
            end = await _wait_drained(dsn, app_id, journey_id, within=900)
        finally:
            for journey in replicas:
                await journey.stop()
    seconds = end - ready
    ctx.log(
        f"  {count:,} due timers drained in {seconds:.2f} s"
        f" (process start {ready - start:.1f} s not counted)"
    )
    return Figure(
        "journey.timer_burst_1m_s",
        seconds,
        "s",
        limit=count / ctx.value("ceiling.timer_claims_per_s"),
        target=60.0,
    )


@benchmark("journey.webhook_calls_per_s")
async def webhook_calls_per_s(ctx: Context) -> Figure:
    """Customers whose timers came due stepped through a webhook node: calls/s at the endpoint."""
    count = ctx.sized(tiny=1_000, full=20_000)
    user_ids = [uuid.uuid4() for _ in range(count)]
    async with (
        Sink(keep=False) as sink,
        _identity_with_users(ctx, count, user_ids) as (identity, app_id, _key),
        ctx.scratch_database() as dsn,
    ):
        await _migrate(ctx, dsn)
        # Seeded before the engine starts: every customer is due at the webhook when it comes up.
        _, journey_id = await _seed_waiting(
            dsn,
            count,
            datetime.now(UTC) - timedelta(minutes=1),
            None,
            app_id=app_id,
            journey=_webhook_after_delay(f"{sink.url}/hook"),
            user_ids=user_ids,
        )
        journey = await _journey(ctx, dsn, identity, wait=False, webhook_allow_private="true")
        try:
            await journey.wait_serving(within=60)
            ready = time.perf_counter()
            await sink.wait_for(count, within=600)
            end = time.perf_counter()
            await _wait_drained(dsn, app_id, journey_id, within=120)
        finally:
            await journey.stop()
    if len(sink.keys) != count or sink.duplicates:
        raise AssertionError(
            f"{len(sink.keys)} of {count} customers called, {sink.duplicates} twice"
        )
    seconds = end - ready
    ctx.log(f"  {count:,} webhook calls in {seconds:.2f} s over {sink.connections} connections")
    return Figure("journey.webhook_calls_per_s", count / seconds, "calls/s")


@benchmark("journey.activation_1m_peak_rss_mb")
async def activation_peak_rss(ctx: Context) -> Figure:
    """Peak RSS of the journey process activating a journey over 1,000,000 contacts."""
    count = ctx.sized(tiny=5_000, full=1_000_000)
    async with (
        _identity_with_users(ctx, count) as (identity, _app_id, key),
        ctx.scratch_database() as dsn,
    ):
        journey = await _journey(ctx, dsn, identity)
        try:
            reset_peak_rss(journey.pid)
            metadata = (("authorization", f"Bearer {key}"),)
            async with grpc.aio.insecure_channel(journey.grpc_target) as channel:
                stub: Any = journey_service_pb2_grpc.JourneyServiceStub(channel)
                created = await stub.CreateJourney(
                    pb.CreateJourneyRequest(
                        journey=jpb.Journey(
                            display_name="big",
                            definition=_delay_first(
                                jpb.Entry(all_contacts=jpb.Entry.AllContacts())
                            ),
                        )
                    ),
                    metadata=metadata,
                )
                start = time.perf_counter()
                await stub.ActivateJourney(
                    pb.ActivateJourneyRequest(journey_id=created.journey_id),
                    metadata=metadata,
                )
                deadline = time.monotonic() + 1800
                while True:
                    got = await stub.GetJourney(
                        pb.GetJourneyRequest(journey_id=created.journey_id),
                        metadata=metadata,
                    )
                    if got.audience.done:
                        break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"audience at {got.audience.scanned}")
                    await asyncio.sleep(0.5)
            await _wait_all_waiting(dsn, count)
            seconds = time.perf_counter() - start
            peak = peak_rss_mb(journey.pid)
        finally:
            await journey.stop()
    if got.audience.entered != count:
        raise AssertionError(f"{got.audience.entered} of {count} entered")
    ctx.log(f"  {count:,} contacts entered and stepped in {seconds:.1f} s, peak RSS {peak:.0f} MiB")
    return Figure("journey.activation_1m_peak_rss_mb", peak, "MiB", target=500.0)


async def _wait_all_waiting(dsn: str, count: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + 1800
        while True:
            waiting = await conn.fetchval("SELECT count(*) FROM instances WHERE status = 'waiting'")
            if waiting >= count:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{waiting} of {count} customers stepped")
            await asyncio.sleep(0.5)
    finally:
        await conn.close()
