"""Receipts on ``delivery.receipts`` and timeline entries, written with the change they record.

Every status a message reaches is one ``message_events`` row and one ``DeliveryReceipt`` in the
outbox, in the same transaction as the ledger change: the fact is published exactly once if the
change commits, never if it rolls back. A receipt's ``event_id`` is derived from the message,
the status and the attempt, so consumers deduplicate replays by it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime

from tidings.delivery.v1 import message_pb2
from tidings.events.v1.delivery_receipt_pb2 import DeliveryReceipt

from services.delivery import messages_store
from services.delivery.ids import uuid5_text
from services.runtime import outbox
from services.runtime.db import DBConnection
from services.runtime.kafka import DELIVERY_RECEIPTS

__all__ = ["RECEIPT_STATUS", "Fact", "event_id", "record_facts"]

_NAMESPACE = uuid.UUID("6f1d2c2e-8a53-4a0e-9d0b-8f7f2a1c9e51")


def event_id(name: str) -> str:
    """The receipt id of a (message, status, repeat) name: a UUIDv5, stable across replays."""
    return uuid5_text(_NAMESPACE, name)


#: Message status -> receipt status.
RECEIPT_STATUS: dict[int, DeliveryReceipt.Status.ValueType] = {
    message_pb2.MESSAGE_STATUS_QUEUED: DeliveryReceipt.STATUS_QUEUED,
    message_pb2.MESSAGE_STATUS_DEFERRED: DeliveryReceipt.STATUS_DEFERRED,
    message_pb2.MESSAGE_STATUS_SENT: DeliveryReceipt.STATUS_SENT,
    message_pb2.MESSAGE_STATUS_DELIVERED: DeliveryReceipt.STATUS_DELIVERED,
    message_pb2.MESSAGE_STATUS_FAILED: DeliveryReceipt.STATUS_FAILED,
    message_pb2.MESSAGE_STATUS_OPENED: DeliveryReceipt.STATUS_OPENED,
    message_pb2.MESSAGE_STATUS_CLICKED: DeliveryReceipt.STATUS_CLICKED,
    message_pb2.MESSAGE_STATUS_UNSUBSCRIBED: DeliveryReceipt.STATUS_UNSUBSCRIBED,
    message_pb2.MESSAGE_STATUS_BOUNCED: DeliveryReceipt.STATUS_BOUNCED,
    message_pb2.MESSAGE_STATUS_DISMISSED: DeliveryReceipt.STATUS_DISMISSED,
}


@dataclass(frozen=True, slots=True)
class Fact:
    """One status a message reached: a timeline entry and a receipt."""

    app_id: str
    message_id: uuid.UUID
    user_id: str
    status: int
    time: datetime
    reason: str = ""
    detail: str = ""
    channel: str = ""
    subscription_id: str = ""
    idempotency_key: str = ""
    broadcast_id: str = ""
    journey_id: str = ""
    journey_node_id: str = ""
    token_invalid: bool = False
    url: str = ""
    #: Distinguishes repeats of one status (attempt number, click count).
    nth: str = field(default="")

    def receipt(self) -> DeliveryReceipt:
        """The receipt of this fact."""
        receipt = DeliveryReceipt(
            event_id=event_id(f"{self.message_id}:{self.status}:{self.nth}"),
            app_id=self.app_id,
            user_id=self.user_id,
            message_id=str(self.message_id),
            status=RECEIPT_STATUS[self.status],
            subscription_id=self.subscription_id,
            token_invalid=self.token_invalid,
            detail=self.detail[:500],
            idempotency_key=self.idempotency_key,
            journey_id=self.journey_id,
            journey_node_id=self.journey_node_id,
            channel=self.channel,
            broadcast_id=self.broadcast_id,
            reason=self.reason,
            url=self.url[:2000],
        )
        # Timestamp.FromDatetime is pure Python and shows at thousands of receipts a second.
        micros = round(self.time.timestamp() * 1_000_000)
        receipt.occurred_at.seconds, remainder = divmod(micros, 1_000_000)
        receipt.occurred_at.nanos = remainder * 1000
        return receipt


async def record_facts(conn: DBConnection, facts: list[Fact]) -> None:
    """Write the timeline entries and enqueue the receipts (inside the caller's transaction)."""
    if not facts:
        return
    await messages_store.insert_events(
        conn,
        [(f.app_id, f.message_id, f.status, f.reason, f.detail, f.time) for f in facts],
    )
    await outbox.enqueue_many(
        conn,
        DELIVERY_RECEIPTS,
        [(f.user_id or str(f.message_id), f.receipt()) for f in facts],
    )
