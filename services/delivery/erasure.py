"""GDPR erasure: when identity deletes a user, delivery forgets their messages.

Identity publishes ``user.deleted`` on ``identity.changes``; this consumer deletes the user's
message rows and timelines (rendered in-app content, parked requests with their trigger data,
provider error details). A send still on ``delivery.requests`` for that user is never made:
the worker asks identity for the recipient, and a deleted user is not found. Deleting is
idempotent, so a redelivered batch needs no inbox.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence

from tidings.events.v1.identity_change_pb2 import IdentityChange

from services.delivery import messages_store
from services.delivery.consumer import start_group_at_creation
from services.runtime.app import ServiceContext
from services.runtime.kafka import IDENTITY_CHANGES, BatchConsumer, Record

__all__ = ["handle_changes", "run_erasure_consumer"]

log = logging.getLogger(__name__)

CONSUMER = "delivery.erasures"


async def handle_changes(ctx: ServiceContext, records: Sequence[Record[IdentityChange]]) -> None:
    """Purge the messages of every user deleted in ``records``."""
    deleted: dict[str, list[str]] = defaultdict(list)
    for record in records:
        change = record.value
        if change.kind == IdentityChange.KIND_USER_DELETED and change.user_id:
            deleted[change.app_id].append(change.user_id)
    if not deleted:
        return
    async with ctx.pool.acquire() as conn, conn.transaction():
        for app_id, user_ids in deleted.items():
            count = await messages_store.purge_users(conn, app_id, user_ids)
            log.info("erased %d messages of %d deleted users", count, len(user_ids))


async def run_erasure_consumer(ctx: ServiceContext) -> None:
    """Background task: consume ``identity.changes`` until cancelled.

    A new group starts at the changes written since this database was created (as the
    workers' group does): users deleted before cannot have messages here.
    """
    instance = await ctx.pool.fetchval("SELECT id FROM outbox_instance")
    group = f"{CONSUMER}.{instance}"
    await start_group_at_creation(ctx, IDENTITY_CHANGES.name, group)

    async def handle(records: Sequence[Record[IdentityChange]]) -> None:
        await handle_changes(ctx, records)

    consumer = BatchConsumer(
        ctx.settings.kafka_bootstrap,
        IDENTITY_CHANGES,
        handle,
        group_id=group,
        service="delivery",
        client_id="delivery-erasures",
        max_batch=1000,
        retries=5,
        retry_backoff=0.5,
    )
    async with consumer:
        await consumer.run()
