"""The worker's consumer group on ``delivery.requests``, and where a new group starts.

Every replica of one delivery database joins the group ``delivery.workers.<instance id>`` and
gets a share of the 12 partitions. A brand-new group (a new deployment, a test database) starts
at the records written since its database was created, not at the topic's beginning: records
from before cannot be for it (its apps did not exist here), and reading the whole retention of a
shared broker would delay its first send by minutes. The first replica to start commits those
offsets for the group; later ones find them committed.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from services.delivery.worker import Worker
from services.runtime.app import ServiceContext
from services.runtime.kafka import DELIVERY_REQUESTS, BatchConsumer

__all__ = ["group_id", "run_worker", "start_group_at"]

log = logging.getLogger(__name__)

CONSUMER = "delivery.workers"
#: Slack for clock differences between the database and the broker.
_SLACK = timedelta(minutes=1)


async def group_id(ctx: ServiceContext) -> str:
    """The consumer group of this database's workers."""
    instance = await ctx.pool.fetchval("SELECT id FROM outbox_instance")
    return f"{CONSUMER}.{instance}"


async def start_group_at(bootstrap: str, topic: str, group: str, since: datetime) -> None:
    """Commit, for a group that has no offsets yet, the first offsets at or after ``since``."""
    # A consumer knows the partitions of assigned topics only: ask an admin client.
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="delivery-worker-setup")
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    tps = [TopicPartition(topic, int(p["partition"])) for p in described.get("partitions", [])]
    if not tps:
        return
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        consumer.assign(tps)
        for tp in tps:
            if await consumer.committed(tp) is not None:
                return  # initialised already (an earlier start, or another replica)
        found = await consumer.offsets_for_times({tp: int(since.timestamp() * 1000) for tp in tps})
        ends = await consumer.end_offsets(tps)
        offsets = {tp: (found[tp].offset if found.get(tp) else ends[tp]) for tp in tps}
        try:
            await consumer.commit(offsets)
        except KafkaError as exc:  # a live member joined meanwhile: it has positions already
            log.warning("could not set the start offsets of %s: %r", group, exc)
        else:
            log.info("consumer group %s starts at %s", group, since.isoformat())
    finally:
        await consumer.stop()


async def run_worker(ctx: ServiceContext, worker: Worker) -> None:
    """Background task: consume ``delivery.requests`` until cancelled.

    Raises:
        HandlerFailedError: A batch kept failing (identity down for long, say); the runtime
            restarts the task, and the batch is processed again.
    """
    group = await group_id(ctx)
    created = await ctx.pool.fetchval(
        "SELECT min(applied_at) FROM schema_migrations WHERE component = 'delivery'"
    )
    if created is not None:
        await start_group_at(
            ctx.settings.kafka_bootstrap, DELIVERY_REQUESTS.name, group, created - _SLACK
        )
    settings = ctx.settings
    consumer = BatchConsumer(
        settings.kafka_bootstrap,
        DELIVERY_REQUESTS,
        worker.handle,
        group_id=group,
        service="delivery",
        client_id="delivery-worker",
        max_batch=int(getattr(settings, "worker_batch", 2000)),
        retries=5,
        retry_backoff=0.5,
    )
    async with consumer:
        await consumer.run()
