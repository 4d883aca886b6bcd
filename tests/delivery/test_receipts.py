"""Receipts (pure): stable event ids, and the receipt of a fact."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from google.protobuf import timestamp_pb2
from tidings.delivery.v1 import message_pb2
from tidings.events.v1.delivery_receipt_pb2 import DeliveryReceipt

from services.delivery import receipts


def test_event_ids_are_the_uuid5_they_always_were() -> None:
    for name in ("a:3:", f"{uuid.uuid4()}:9:r2", "é:1:x"):
        assert receipts.event_id(name) == str(uuid.uuid5(receipts._NAMESPACE, name))


def test_a_fact_makes_its_receipt() -> None:
    message_id = uuid.uuid4()
    for at in (
        datetime(2026, 11, 24, 9, 1, 2, 345678, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 500000, tzinfo=UTC),
    ):
        fact = receipts.Fact(
            app_id="a",
            message_id=message_id,
            user_id="u",
            status=message_pb2.MESSAGE_STATUS_DISMISSED,
            time=at,
            journey_id="j",
            journey_node_id="n",
            nth="0",
        )
        receipt = fact.receipt()
        expected = timestamp_pb2.Timestamp()
        expected.FromDatetime(at)
        assert receipt.occurred_at == expected
        assert receipt.status == DeliveryReceipt.STATUS_DISMISSED
        assert (receipt.journey_id, receipt.journey_node_id) == ("j", "n")
        assert receipt.event_id == str(uuid.uuid5(receipts._NAMESPACE, f"{message_id}:10:0"))
