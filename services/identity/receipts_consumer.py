"""Identity's consumer of ``delivery.receipts``: dead tokens disable their subscriptions.

When a provider says a token or address is dead (APNs 410 Unregistered, FCM UNREGISTERED, a
hard bounce: a receipt with ``token_invalid``), the subscription it went to is disabled with the
provider's reason as ``disabled_reason``, and ``SUBSCRIPTION_DEACTIVATED`` is published, in one
transaction. Every other receipt is ignored here.

* Idempotent: the receipts' event ids are claimed in the inbox in the same transaction, so a
  redelivered receipt has no second effect (and no second change fact).
* Receipts naming an app or subscription identity does not know (erased, or another
  environment's) are skipped, as are subscriptions already disabled.
* A verdict older than the token is stale: if the device presented the token again (registered
  it again, or rotated to a new one) after the failed send, the subscription stays enabled, as
  APNs documents for its 410 timestamp.
* The consumer group is per database (``identity.receipts.<outbox instance id>``), so a test
  database or a reset dev stack never shares offsets with another identity deployment on the
  same broker; every replica of one deployment joins the same group.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import asyncpg
from prometheus_client import Counter
from tidings.events.v1.delivery_receipt_pb2 import DeliveryReceipt

from services.identity import changes
from services.identity import subscriptions_store as store
from services.identity.events_consumer import start_time
from services.identity.subscriptions import subscription_fact
from services.runtime.app import ServiceContext
from services.runtime.inbox import claim_new
from services.runtime.kafka import DELIVERY_RECEIPTS, BatchConsumer, Record, start_new_group_at

__all__ = ["CONSUMER", "apply_receipts", "dead_tokens", "group_id", "run_receipts_consumer"]

#: The inbox scope of this consumer (its dedup namespace).
CONSUMER = "identity.receipts"
#: ``disabled_reason`` when the receipt gives no detail.
DEFAULT_REASON = "token_invalid"
_MAX_REASON_LENGTH = 200


def _event_id(record: Record[DeliveryReceipt]) -> str:
    # A receipt without an id still gets a stable one: its position in the topic.
    return record.value.event_id or f"{record.topic}:{record.partition}:{record.offset}"


def dead_tokens(records: Sequence[Record[DeliveryReceipt]]) -> list[tuple[str, store.DeadToken]]:
    """The receipts that declare a token dead, as ``(event id, verdict)`` pairs.

    Receipts without ``token_invalid``, without an app, or whose subscription id is not a UUID
    are left out.
    """
    result = []
    for record in records:
        receipt = record.value
        if not receipt.token_invalid or not receipt.app_id:
            continue
        try:
            subscription_id = uuid.UUID(receipt.subscription_id)
        except ValueError:
            continue
        if receipt.HasField("occurred_at"):
            occurred_at = receipt.occurred_at.ToDatetime(tzinfo=UTC)
        else:
            occurred_at = datetime.fromtimestamp(record.timestamp_ms / 1000, UTC)
        verdict = store.DeadToken(
            app_id=receipt.app_id,
            subscription_id=subscription_id,
            reason=(receipt.detail or DEFAULT_REASON)[:_MAX_REASON_LENGTH],
            occurred_at=occurred_at,
        )
        result.append((_event_id(record), verdict))
    return result


async def apply_receipts(
    pool: asyncpg.Pool, records: Sequence[Record[DeliveryReceipt]], at: datetime
) -> list[store.Subscription]:
    """Disable the subscriptions the receipts declare dead; one transaction per batch.

    Returns:
        The subscriptions disabled now (none for receipts applied before).
    """
    verdicts = dead_tokens(records)
    if not verdicts:
        return []
    async with pool.acquire() as conn, conn.transaction():
        fresh = await claim_new(conn, CONSUMER, [event_id for event_id, _ in verdicts])
        disabled = await store.disable_dead_tokens(
            conn, [verdict for event_id, verdict in verdicts if event_id in fresh], at
        )
        await changes.publish(
            conn,
            [
                subscription_fact(changes.Kind.KIND_SUBSCRIPTION_DEACTIVATED, s, at, ["enabled"])
                for s in disabled
            ],
        )
    return disabled


async def group_id(pool: asyncpg.Pool) -> str:
    """The consumer group of this database's identity deployment."""
    instance = await pool.fetchval("SELECT id FROM outbox_instance")
    return f"{CONSUMER}.{instance}"


async def run_receipts_consumer(ctx: ServiceContext) -> None:
    """Background task: consume ``delivery.receipts`` until cancelled.

    Raises:
        HandlerFailedError: A batch kept failing; the process exits and a restart retries it.
    """
    pool, clock = ctx.pool, ctx.clock
    disabled_total = Counter(
        "identity_dead_tokens_disabled_total",
        "Subscriptions disabled because a delivery receipt declared their token dead.",
        registry=ctx.metrics.registry,
    )

    async def handle(records: Sequence[Record[DeliveryReceipt]]) -> None:
        disabled = await apply_receipts(pool, records, clock())
        if disabled:
            disabled_total.inc(len(disabled))
            ctx.log.info(
                "disabled %d subscription(s) with dead tokens",
                len(disabled),
                extra={"subscriptions": [str(s.subscription_id) for s in disabled]},
            )

    group = await group_id(pool)
    await start_new_group_at(
        ctx.settings.kafka_bootstrap, DELIVERY_RECEIPTS.name, group, await start_time(pool, clock())
    )
    consumer = BatchConsumer(
        ctx.settings.kafka_bootstrap,
        DELIVERY_RECEIPTS,
        handle,
        group_id=group,
        service="identity",
        client_id="identity-receipts",
    )
    async with consumer:
        await consumer.run()
