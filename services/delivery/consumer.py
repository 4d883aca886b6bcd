"""The worker's consumer group on ``delivery.requests``, and where a new group starts.

Every replica of one delivery database joins the group ``delivery.workers.<instance id>`` and
gets a share of the 12 partitions. A brand-new group (a new deployment, a test database) starts
at the records written since its database was created, not at the topic's beginning: records
from before cannot be for it (its apps did not exist here), and reading the whole retention of a
shared broker would delay its first send by minutes. The first replica to start commits those
offsets for the group; later ones find them committed.

On every rebalance the worker learns how many of the partitions it owns and takes that share
of each provider rate limit (:mod:`services.delivery.rate_limit`).
"""

from __future__ import annotations

import logging
from datetime import timedelta

from services.delivery.worker import Worker
from services.runtime.app import ServiceContext
from services.runtime.kafka import DELIVERY_REQUESTS, BatchConsumer, start_new_group_at

__all__ = ["group_id", "run_worker", "start_group_at_creation"]

log = logging.getLogger(__name__)

CONSUMER = "delivery.workers"
#: Slack for clock differences between the database and the broker.
_SLACK = timedelta(minutes=1)


async def group_id(ctx: ServiceContext) -> str:
    """The consumer group of this database's workers."""
    instance = await ctx.pool.fetchval("SELECT id FROM outbox_instance")
    return f"{CONSUMER}.{instance}"


async def start_group_at_creation(ctx: ServiceContext, topic: str, group: str) -> None:
    """Start a brand-new ``group`` of ``topic`` at the records written since this database was
    created (an existing group keeps its committed offsets)."""
    created = await ctx.pool.fetchval(
        "SELECT min(applied_at) FROM schema_migrations WHERE component = 'delivery'"
    )
    if created is not None:
        await start_new_group_at(ctx.settings.kafka_bootstrap, topic, group, created - _SLACK)


async def run_worker(ctx: ServiceContext, worker: Worker) -> None:
    """Background task: consume ``delivery.requests`` until cancelled.

    Raises:
        HandlerFailedError: A batch kept failing (identity down for long, say); the runtime
            restarts the task, and the batch is processed again.
    """
    group = await group_id(ctx)
    await start_group_at_creation(ctx, DELIVERY_REQUESTS.name, group)
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
        on_partitions=worker.set_partitions,  # each worker's share of the rate limits
    )
    async with consumer:
        await consumer.run()
