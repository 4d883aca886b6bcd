"""Delivery benchmarks: a broadcast end to end, its latency at a sustainable rate, and the memory
of a 1,000,000-user fan-out.

``delivery.broadcast`` starts identity and delivery as real processes (each on a scratch
database, delivery running its worker, scheduler and fan-out in-process as deployed), writes N
users into identity's database (setup, not timed), configures a webhook channel pointed at a
local sink (this process) and measures:

* ``delivery.broadcast_msgs_per_s``: an all-users broadcast, from the Broadcast call until the
  sink has every message: fan-out through identity's ListUsers, ``delivery.requests``, the
  worker (BatchGetUsers per poll, policy, render, ledger, the webhook call, receipts). The sink
  counts every idempotency key: a duplicate or a missing message fails the benchmark. Its
  limit, ``ceiling.kafka_delivery_msgs_per_s``, is a bare aiokafka producer to a consumer in
  another process with messages of the same size as a fan-out record, measured in this run.
* ``delivery.broadcast_p99_ms``: Send calls of 100 users each at half that rate for a few
  seconds; the latency of each message is the sink's arrival time minus the request time the
  webhook carries (``{{ message.requested_at_ms }}`` in a header).
* ``delivery.broadcast_1m_peak_rss_mb``: a second delivery process (fan-out only, no worker)
  receives a 1,000,000-row CSV broadcast streamed in 1 MiB chunks; its peak RSS (VmHWM) while
  it enqueues every row is the figure (the audience is never held in memory).

Everything shares the machine's two cores (Kafka, Postgres, both services, the sink), so the
figures are what one box does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import grpc.aio
from google.protobuf import struct_pb2, timestamp_pb2
from tidings.delivery.v1 import (
    broadcast_pb2,
    channel_pb2,
    delivery_service_pb2,
    delivery_service_pb2_grpc,
    message_pb2,
    template_pb2,
)
from tidings.events.v1.send_request_pb2 import SendRequest
from tidings.identity.v1.user_ref_pb2 import UserRef

from bench.ceiling.child import read_line, stop_child
from bench.ceiling.kafka import _producer, _start_consumer, _warm_up
from bench.config import Size
from bench.context import Context
from bench.figure import Figure
from bench.identity import ADMIN_KEY, _create_app
from bench.measure import peak_rss_mb, percentile, reset_peak_rss
from bench.registry import benchmark
from tests.delivery.sink import Sink
from tests.e2e.processes import ServiceProcess, free_port, start_service

#: Delivery processes (replicas on one database, each running a worker of the group). One:
#: on two cores a second replica only adds contention (measured: 1.2k vs 1.5k msgs/s).
REPLICAS = 1
#: Send calls of the latency run carry this many users each.
USERS_PER_SEND = 100
LATENCY_SECONDS = 8.0
DONE_TIMEOUT_S = 600.0
CSV_CHUNK = 1024 * 1024
SECRET = "bench-webhook-signing-secret"


def _spec(sink: Sink) -> message_pb2.MessageSpec:
    content = template_pb2.MessageContent(
        webhook=template_pb2.WebhookContent(
            method="POST",
            url=f"{sink.url}/hook",
            headers={"X-Requested-Ms": "{{ message.requested_at_ms }}"},
            body='{"user": "{{ user.user_id }}", "greeting": "{{ user.first_name | default: '
            "'there' }}\"}",
        )
    )
    return message_pb2.MessageSpec(
        options=[message_pb2.SendOption(channel=channel_pb2.CHANNEL_WEBHOOK, content=content)]
    )


def _record_size() -> int:
    """Bytes of one broadcast fan-out record, for the Kafka ceiling of the same size."""
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    record = SendRequest(
        event_id=str(uuid.uuid4()),
        app_id="app_0123456789abcdef",
        user_id=str(uuid.uuid4()),
        idempotency_key=f"broadcast:{uuid.uuid4()}:{uuid.uuid4()}",
        message_id=str(uuid.uuid4()),
        broadcast_id=str(uuid.uuid4()),
        occurred_at=stamp,
    )
    return len(record.SerializeToString())


async def _kafka_ceiling(ctx: Context, count: int, size: int) -> float:
    """Msgs/s of a bare producer to a consumer in another process, ``size``-byte messages."""
    payload = b"x" * size
    keys = [str(uuid.uuid4()).encode() for _ in range(10_000)]
    async with ctx.scratch_topic(partitions=12) as topic:
        producer = _producer(ctx.stack.kafka_bootstrap)
        await producer.start()
        try:
            partitions = await _warm_up(producer, topic)
            consumer = await _start_consumer(ctx, topic, len(partitions), count)
            try:
                loop = asyncio.get_running_loop()
                first_send = loop.time()
                acks = [
                    await producer.send(topic, payload, key=keys[i % len(keys)])
                    for i in range(count)
                ]
                await asyncio.gather(*acks)
                async with asyncio.timeout(DONE_TIMEOUT_S):
                    kind, _, stamp = (await read_line(consumer)).partition(" ")
                if kind != "done":
                    raise RuntimeError(f"unexpected line from the consumer: {kind!r}")
                return count / (float(stamp) - first_send)
            finally:
                await stop_child(consumer)
        finally:
            await producer.stop()


@contextlib.asynccontextmanager
async def _service(
    ctx: Context, name: str, dsn: str, env: dict[str, str] | None = None
) -> AsyncIterator[ServiceProcess]:
    service = await start_service(
        name,
        database_url=dsn,
        kafka_bootstrap=ctx.stack.kafka_bootstrap,
        admin_key=ADMIN_KEY,
        env={"TIDINGS_LOG_LEVEL": "WARNING", **(env or {})},
    )
    try:
        await service.wait_serving(within=90)
        yield service
    finally:
        with contextlib.suppress(Exception):
            await service.stop()


def _delivery_env(identity: ServiceProcess, **extra: str) -> dict[str, str]:
    port = free_port()
    return {
        "TIDINGS_IDENTITY_TARGET": identity.grpc_target,
        "TIDINGS_TRACKING_HOST": "127.0.0.1",
        "TIDINGS_TRACKING_PORT": str(port),
        "TIDINGS_TRACKING_BASE_URL": f"http://127.0.0.1:{port}",
        "TIDINGS_DB_POOL_MAX": "20",
        **extra,
    }


async def _insert_users(dsn: str, app_id: str, count: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO users (app_id, user_id) SELECT $1, gen_random_uuid() "
            "FROM generate_series(1, $2)",
            app_id,
            count,
        )
        await conn.execute("ANALYZE users")
    finally:
        await conn.close()


async def _configure(stub: Any, metadata: Any, sink: Sink) -> None:
    credentials = struct_pb2.Struct()
    credentials.update({"signing_secret": SECRET, "allow_loopback": True})
    await stub.UpdateChannelConfig(
        delivery_service_pb2.UpdateChannelConfigRequest(
            channel_config=channel_pb2.ChannelConfig(
                channel=channel_pb2.CHANNEL_WEBHOOK, credentials=credentials
            )
        ),
        metadata=metadata,
    )


async def _until(sink: Sink, count: int, what: str) -> None:
    deadline = time.monotonic() + DONE_TIMEOUT_S
    while len(sink.keys) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: the sink got {len(sink.keys):,} of {count:,} messages")
        await asyncio.sleep(0.05)


async def _latency_run(
    ctx: Context, stub: Any, metadata: Any, sink: Sink, user_ids: list[str], rate: float
) -> list[float]:
    """Send calls at ``rate`` messages/s for a few seconds; returns the latencies (ms)."""
    calls_per_s = max(1.0, rate / USERS_PER_SEND)
    calls = max(5, int(calls_per_s * ctx.sized(tiny=2, full=int(LATENCY_SECONDS))))
    spec = _spec(sink)
    sink.latencies_ms.clear()
    before = len(sink.keys)
    started = time.monotonic()
    pending: list[asyncio.Future[Any]] = []
    for call in range(calls):
        await asyncio.sleep(max(0.0, started + call / calls_per_s - time.monotonic()))
        users = [
            UserRef(user_id=user_ids[(call * USERS_PER_SEND + i) % len(user_ids)])
            for i in range(USERS_PER_SEND)
        ]
        pending.append(
            asyncio.ensure_future(
                stub.Send(
                    delivery_service_pb2.SendRequest(users=users, spec=spec), metadata=metadata
                )
            )
        )
    await asyncio.gather(*pending)
    await _until(sink, before + calls * USERS_PER_SEND, "latency run")
    return list(sink.latencies_ms)


async def _csv_rss(ctx: Context, identity: ServiceProcess, app_id: str, key: str) -> float:
    """Peak RSS (MiB) of a fan-out-only delivery process enqueueing a streamed CSV broadcast."""
    rows = ctx.sized(tiny=20_000, full=1_000_000)
    async with (
        ctx.scratch_database() as dsn,
        _service(
            ctx,
            "delivery",
            dsn,
            _delivery_env(identity, TIDINGS_RUN_WORKER="false", TIDINGS_RUN_SCHEDULER="false"),
        ) as delivery,
    ):
        metadata = (("authorization", f"Bearer {key}"),)
        async with grpc.aio.insecure_channel(delivery.grpc_target) as channel:
            stub: Any = delivery_service_pb2_grpc.DeliveryServiceStub(channel)
            reset_peak_rss(delivery.pid)
            base = peak_rss_mb(delivery.pid)

            async def upload() -> AsyncIterator[delivery_service_pb2.BroadcastCsvRequest]:
                spec = message_pb2.MessageSpec(
                    options=[
                        message_pb2.SendOption(
                            channel=channel_pb2.CHANNEL_WEBHOOK,
                            content=template_pb2.MessageContent(
                                webhook=template_pb2.WebhookContent(url="https://example.com/h")
                            ),
                        )
                    ]
                )
                yield delivery_service_pb2.BroadcastCsvRequest(
                    options=delivery_service_pb2.BroadcastCsvOptions(
                        broadcast=broadcast_pb2.Broadcast(spec=spec), ref_column="user_id"
                    )
                )
                chunk: list[str] = ["user_id\n"]
                size = 0
                for _ in range(rows):
                    line = f"{uuid.uuid4()}\n"
                    chunk.append(line)
                    size += len(line)
                    if size >= CSV_CHUNK - 64:
                        yield delivery_service_pb2.BroadcastCsvRequest(
                            chunk="".join(chunk).encode()
                        )
                        chunk, size = [], 0
                if chunk:
                    yield delivery_service_pb2.BroadcastCsvRequest(chunk="".join(chunk).encode())

            started = time.monotonic()
            done = await stub.BroadcastCsv(upload(), metadata=metadata, timeout=DONE_TIMEOUT_S)
            elapsed = time.monotonic() - started
            peak = peak_rss_mb(delivery.pid)
    if done.enqueued_count != rows:
        raise AssertionError(f"CSV broadcast enqueued {done.enqueued_count:,} of {rows:,}")
    ctx.log(
        f"  {rows:,}-row CSV broadcast enqueued in {elapsed:.1f} s; RSS {base:.0f} -> peak "
        f"{peak:.0f} MiB"
    )
    return peak


def _cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _database_cpu_seconds(database: str) -> float:
    """CPU used so far by the PostgreSQL backends serving ``database`` (its connections)."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                if f" {database} ".encode() not in cmdline.read():
                    continue
            total += _cpu_seconds(int(entry))
        except OSError:
            continue
    return total


@benchmark("delivery.broadcast")
async def broadcast(ctx: Context) -> list[Figure]:
    """Broadcast msgs/s to a webhook sink (0 lost, 0 duplicated), p99 latency, 1M fan-out RSS."""
    count = ctx.sized(tiny=2_000, full=100_000)
    size = _record_size()
    ceiling = await _kafka_ceiling(ctx, count, size)
    ctx.log(f"  Kafka ceiling with {size}-byte records: {ceiling:,.0f} msgs/s")
    async with (
        ctx.scratch_database() as identity_dsn,
        _service(ctx, "identity", identity_dsn) as identity,
    ):
        async with grpc.aio.insecure_channel(identity.grpc_target) as identity_channel:
            app_id, key = await _create_app(identity_channel)
        await _insert_users(identity_dsn, app_id, count)
        conn = await asyncpg.connect(identity_dsn)
        try:
            user_ids = [
                str(row["user_id"])
                for row in await conn.fetch(
                    "SELECT user_id FROM users WHERE app_id = $1 LIMIT 20000", app_id
                )
            ]
        finally:
            await conn.close()
        metadata = (("authorization", f"Bearer {key}"),)
        async with (
            Sink(keep=False, latency_header="x-requested-ms") as sink,
            ctx.scratch_database() as delivery_dsn,
            contextlib.AsyncExitStack() as replicas,
        ):
            # Replicas of one deployment: their workers share the partitions.
            processes = [
                await replicas.enter_async_context(
                    _service(ctx, "delivery", delivery_dsn, _delivery_env(identity))
                )
                for _ in range(REPLICAS)
            ]
            channel = await replicas.enter_async_context(
                grpc.aio.insecure_channel(processes[0].grpc_target)
            )
            stub: Any = delivery_service_pb2_grpc.DeliveryServiceStub(channel)
            await _configure(stub, metadata, sink)
            # Warm-up (untimed): identity key minted, connections, prepared statements.
            await _latency_run(ctx, stub, metadata, sink, user_ids[:USERS_PER_SEND], 100)
            sink.keys.clear()
            database = delivery_dsn.rsplit("/", 1)[1].split("?", 1)[0]
            cpu_before = [_cpu_seconds(p.pid) for p in processes]
            db_cpu_before = _database_cpu_seconds(database)
            started = time.monotonic()
            created = await stub.Broadcast(
                delivery_service_pb2.BroadcastRequest(
                    broadcast=broadcast_pb2.Broadcast(
                        audience=broadcast_pb2.Audience(all_users=True), spec=_spec(sink)
                    )
                ),
                metadata=metadata,
            )
            await _until(sink, count, "broadcast")
            elapsed = time.monotonic() - started
            rate = count / elapsed
            await asyncio.sleep(0.5 if ctx.size is Size.TINY else 2.0)  # late duplicates show
            final = await stub.GetBroadcast(
                delivery_service_pb2.GetBroadcastRequest(broadcast_id=created.broadcast_id),
                metadata=metadata,
            )
            if sink.duplicates or len(sink.keys) != count or final.sent_count != count:
                raise AssertionError(
                    f"broadcast of {count:,}: {len(sink.keys):,} distinct at the sink, "
                    f"{sink.duplicates} duplicates, {final.sent_count:,} recorded sent"
                )
            ctx.log(f"  {count:,} messages broadcast in {elapsed:.1f} s, 0 lost, 0 duplicated")
            # Under contention the rate says little; CPU per message is what a change moves.
            worker_cpu = sum(_cpu_seconds(p.pid) for p in processes) - sum(cpu_before)
            db_cpu = _database_cpu_seconds(database) - db_cpu_before
            ctx.log(
                f"  CPU per message: delivery {worker_cpu / count * 1e6:,.0f} us, "
                f"its PostgreSQL backends {db_cpu / count * 1e6:,.0f} us"
            )
            sink.keys.clear()
            latencies = await _latency_run(ctx, stub, metadata, sink, user_ids, rate / 2)
            if sink.duplicates:
                raise AssertionError(f"{sink.duplicates} duplicates in the latency run")
            p99 = percentile(latencies, 99)
            ctx.log(
                f"  latency at {rate / 2:,.0f} msgs/s: p50 {percentile(latencies, 50):.0f} ms, "
                f"p99 {p99:.0f} ms over {len(latencies):,} messages"
            )
        peak = await _csv_rss(ctx, identity, app_id, key)
    return [
        Figure("ceiling.kafka_delivery_msgs_per_s", ceiling, "msgs/s"),
        Figure("delivery.broadcast_msgs_per_s", rate, "msgs/s", limit=ceiling, target=10_000),
        Figure("delivery.broadcast_p99_ms", p99, "ms", target=1000.0),
        Figure("delivery.broadcast_1m_peak_rss_mb", peak, "MiB", target=500.0),
    ]
