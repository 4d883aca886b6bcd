"""Workers as a consumer group of real processes: the work is split, nothing is done twice, a
worker SIGKILLed in the middle of a batch never causes a second provider call for a key, and a
channel's rate limit holds for the group, not per worker."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import asyncpg
import grpc.aio
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from tidings.delivery.v1 import broadcast_pb2, channel_pb2, delivery_service_pb2_grpc
from tidings.delivery.v1 import delivery_service_pb2 as dpb
from tidings.identity.v1 import identity_service_pb2 as ipb
from tidings.identity.v1 import identity_service_pb2_grpc, user_pb2

from tests.conftest import KAFKA_BOOTSTRAP, temporary_database
from tests.delivery.sink import Sink
from tests.delivery.support import by_id, delivery_env, ext, inline, struct, webhook
from tests.e2e.processes import ServiceProcess, start_service
from tests.identity.conftest import TestApp
from tests.polling import eventually

B = broadcast_pb2.Broadcast


async def _users(identity: object, app: TestApp, count: int) -> list[str]:
    stub = identity
    requests = [
        ipb.UpsertUserRequest(ref=ext(f"w-{i}-{time.time_ns()}"), user=user_pb2.User())
        for i in range(count)
    ]
    response = await stub.BatchUpsertUsers(  # type: ignore[attr-defined]
        ipb.BatchUpsertUsersRequest(requests=requests), metadata=app.server
    )
    return [r.user.user_id for r in response.results]


async def _group_members(group: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA_BOOTSTRAP)
    await admin.start()
    try:
        [response] = await admin.describe_consumer_groups([group])
        # groups: (error_code, group, state, protocol_type, protocol, members)
        [(_, _, state, _, _, members)] = response.groups
        return len(members) if state == "Stable" else 0
    finally:
        await admin.close()


async def _workers(
    stack: AsyncExitStack, identity_target: str, dsn: str, count: int, **env: str
) -> list[ServiceProcess]:
    processes = []
    for _ in range(count):
        environment, _ = delivery_env(identity_target, **env)
        service = await start_service("delivery", database_url=dsn, env=environment)
        stack.push_async_callback(service.kill)
        processes.append(service)
    for service in processes:
        await service.wait_serving()
    conn = await asyncpg.connect(dsn)
    try:
        instance = await conn.fetchval("SELECT id FROM outbox_instance")
    finally:
        await conn.close()
    group = f"delivery.workers.{instance}"
    await eventually(
        lambda: _group_members(group),
        lambda members: members == count,
        within=60,
        interval=0.5,
        what="the workers forming one group",
    )
    return processes


async def _sent_by(service: ServiceProcess) -> float:
    text = await service.metrics()
    match = re.search(r'^delivery_messages_total\{outcome="sent"\} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


async def _broadcast(
    delivery: object, app: TestApp, sink: Sink, user_ids: list[str], *, rate: float = 0
) -> str:
    stub = delivery
    await stub.UpdateChannelConfig(  # type: ignore[attr-defined]
        dpb.UpdateChannelConfigRequest(
            channel_config=channel_pb2.ChannelConfig(
                channel=channel_pb2.CHANNEL_WEBHOOK,
                credentials=struct({"signing_secret": "x" * 20, "allow_loopback": True}),
                rate_limit_per_second=rate,
            )
        ),
        metadata=app.server,
    )
    refs = [by_id(u) for u in user_ids]
    created = await stub.Broadcast(  # type: ignore[attr-defined]
        dpb.BroadcastRequest(
            broadcast=B(
                audience=broadcast_pb2.Audience(users=broadcast_pb2.Audience.UserList(refs=refs)),
                spec=inline(channel_pb2.CHANNEL_WEBHOOK, webhook(f"{sink.url}/w", body="{}")),
            )
        ),
        metadata=app.server,
    )
    return str(created.broadcast_id)


async def _until_settled(
    delivery: object, app: TestApp, broadcast_id: str, total: int, within: float = 90
) -> broadcast_pb2.Broadcast:
    async def current() -> broadcast_pb2.Broadcast:
        return await delivery.GetBroadcast(  # type: ignore[attr-defined,no-any-return]
            dpb.GetBroadcastRequest(broadcast_id=broadcast_id), metadata=app.server
        )

    return await eventually(
        current,
        lambda found: found.sent_count + found.failed_count >= total,
        within=within,
        interval=0.3,
        what="the broadcast settled",
    )


@pytest.fixture
async def worker_db() -> AsyncIterator[str]:
    async with temporary_database() as dsn:
        yield dsn


async def test_two_workers_split_the_work_and_send_each_message_once(
    identity_service: ServiceProcess, worker_db: str, app: TestApp
) -> None:
    total = 400
    async with AsyncExitStack() as stack, Sink(keep=False) as sink:
        first, second = await _workers(stack, identity_service.grpc_target, worker_db, 2)
        async with (
            grpc.aio.insecure_channel(identity_service.grpc_target) as identity_channel,
            grpc.aio.insecure_channel(first.grpc_target) as channel,
        ):
            identity = identity_service_pb2_grpc.IdentityServiceStub(identity_channel)
            delivery = delivery_service_pb2_grpc.DeliveryServiceStub(channel)
            user_ids = await _users(identity, app, total)
            broadcast_id = await _broadcast(delivery, app, sink, user_ids)
            done = await _until_settled(delivery, app, broadcast_id, total)
        assert (done.sent_count, done.failed_count) == (total, 0)
        assert sink.count == total
        assert len(sink.keys) == total
        assert sink.duplicates == 0
        by_first, by_second = await _sent_by(first), await _sent_by(second)
        assert by_first + by_second == total
        assert by_first > 0, (by_first, by_second)
        assert by_second > 0, (by_first, by_second)


async def test_a_worker_killed_mid_batch_resends_its_webhook_calls_with_the_same_key(
    identity_service: ServiceProcess, worker_db: str, app: TestApp
) -> None:
    """Webhooks are resend-safe (the receiver drops a repeated ``Idempotency-Key``): the calls
    a killed worker had in flight are made again with the same key, nothing is lost, no key
    is called more than twice, and only the calls that were in flight are repeated."""
    total = 300
    window = 40
    # Slow answers keep a window of calls in flight when the worker dies.
    env = {"TIDINGS_SEND_CONCURRENCY": str(window), "TIDINGS_STUCK_AFTER_SECONDS": "4"}
    async with AsyncExitStack() as stack, Sink(keep=False, delay=2.0) as sink:
        [doomed] = await _workers(stack, identity_service.grpc_target, worker_db, 1, **env)
        async with (
            grpc.aio.insecure_channel(identity_service.grpc_target) as identity_channel,
            grpc.aio.insecure_channel(doomed.grpc_target) as channel,
        ):
            identity = identity_service_pb2_grpc.IdentityServiceStub(identity_channel)
            delivery = delivery_service_pb2_grpc.DeliveryServiceStub(channel)
            user_ids = await _users(identity, app, total)
            broadcast_id = await _broadcast(delivery, app, sink, user_ids)
            # Its whole window of calls is at the endpoint, unanswered for 2 s: SIGKILL now.
            await sink.wait_for(window, within=60)
            doomed.process.send_signal(signal.SIGKILL)
            await doomed.process.wait()
            called_before = dict(sink.keys)
        conn = await asyncpg.connect(worker_db)
        try:
            claimed = await conn.fetch(
                "SELECT idempotency_key FROM messages WHERE state = 'sending'"
            )
        finally:
            await conn.close()
        # A new worker takes over the uncommitted records (redelivered by Kafka).
        [heir] = await _workers(stack, identity_service.grpc_target, worker_db, 1, **env)
        async with grpc.aio.insecure_channel(heir.grpc_target) as channel:
            delivery = delivery_service_pb2_grpc.DeliveryServiceStub(channel)
            done = await _until_settled(delivery, app, broadcast_id, total, within=120)
        conn = await asyncpg.connect(worker_db)
        try:
            rows = await conn.fetch("SELECT state, count(*) AS n FROM messages GROUP BY state")
            states = {row["state"]: row["n"] for row in rows}
            resent = {
                row["idempotency_key"]
                for row in await conn.fetch(
                    "SELECT m.idempotency_key FROM messages m JOIN message_events e "
                    "USING (app_id, message_id) WHERE e.reason = 'OUTCOME_UNKNOWN' "
                    "AND e.status = 2"
                )
            }
        finally:
            await conn.close()
    assert 0 < len(called_before) < total
    # A claim is a call in flight: no more rows were claimed than calls can be under way,
    # and each of them had reached the endpoint.
    in_flight = {row["idempotency_key"] for row in claimed}
    assert 0 < len(in_flight) <= window
    assert in_flight <= set(called_before)
    assert states.get("sending", 0) == 0
    assert (done.sent_count, done.failed_count) == (total, 0)
    assert len(sink.keys) == total
    # Exactly the calls in flight at the kill were made a second time, with the same key.
    assert resent == in_flight
    assert {key for key, n in sink.keys.items() if n > 1} == in_flight
    assert max(sink.keys.values()) == 2


async def _rate_limited_run(
    identity_service: ServiceProcess, dsn: str, app: TestApp, workers: int, rate: int, total: int
) -> float:
    """Broadcast ``total`` webhook messages on a channel limited to ``rate`` calls/s through
    ``workers`` workers; the rate the endpoint saw after the first second's burst."""
    async with AsyncExitStack() as stack, Sink() as sink:
        first, *_ = await _workers(stack, identity_service.grpc_target, dsn, workers)
        async with (
            grpc.aio.insecure_channel(identity_service.grpc_target) as identity_channel,
            grpc.aio.insecure_channel(first.grpc_target) as channel,
        ):
            identity = identity_service_pb2_grpc.IdentityServiceStub(identity_channel)
            delivery = delivery_service_pb2_grpc.DeliveryServiceStub(channel)
            user_ids = await _users(identity, app, total)
            broadcast_id = await _broadcast(delivery, app, sink, user_ids, rate=rate)
            done = await _until_settled(delivery, app, broadcast_id, total)
    assert (done.sent_count, done.failed_count) == (total, 0)
    times = sorted(request.time for request in sink.received)
    assert len(times) == total
    # Each worker's bucket starts with a second of its tokens: measure after that burst.
    return (total - rate) / (times[-1] - times[rate - 1])


async def test_two_workers_share_a_channel_rate_limit(
    identity_service: ServiceProcess, worker_db: str, app: TestApp
) -> None:
    """Each worker takes its share of the partitions' share of the rate: together they stay
    at the channel's rate (without sharing, two workers would reach twice of it)."""
    rate = 20
    seen = await _rate_limited_run(identity_service, worker_db, app, 2, rate, 5 * rate)
    assert seen <= rate * 1.25, seen


async def test_one_worker_alone_uses_the_whole_rate_limit(
    identity_service: ServiceProcess, worker_db: str, app: TestApp
) -> None:
    rate = 20
    seen = await _rate_limited_run(identity_service, worker_db, app, 1, rate, 5 * rate)
    assert rate * 0.7 <= seen <= rate * 1.25, seen
